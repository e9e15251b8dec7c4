"""Benchmark: maia_onnx.runtime.InferenceSession (compiled, emulated Maia) vs plain ONNX Runtime CPU, interleaved.

Builds an FP8-quantized llama-tiny (export -> QuantizeFp8Pass), compiles it for maia100, and times both
sessions on the same inputs in one process, alternating runs so drift hits both alike. Reports the latency
ratio shim / plain (target <= 1.2x) for the default (embedded) and side-file compiles and the custom-op bridge.

    python scripts/bench_runtime.py [--runs 300] [--batch 1] [--seq 16] [--decode-past 64] [--model path.onnx]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build_quantized_llama(workdir: Path) -> Path:
    """llama-tiny exported and FP8-quantized (E4M3 weights per channel + calibrated static activation QDQ)."""
    import warnings

    from maia_onnx.export import export_builtin
    from maia_onnx.quantize import quantize_model

    fp32 = workdir / "llama-tiny.onnx"
    export_builtin("llama-tiny", fp32)
    out = workdir / "llama-tiny-fp8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random calibration inputs: fine for timing
        quantize_model(fp32, out, format="fp8-e4m3", show_progress=False, evaluate=False)
    return out


def interleaved(runners: dict, runs: int) -> dict[str, float]:
    """Median seconds per run of each runner, runs alternating between them."""
    times = {name: [] for name in runners}
    for fn in runners.values():  # warm-up
        for _ in range(10):
            fn()
    for _ in range(runs):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=16, help="prefill: seq tokens, no past")
    parser.add_argument("--decode-past", type=int, default=64, help="decode: 1 token after this many cached")
    parser.add_argument("--model", type=Path, default=None, help="a quantized model to use instead of building one")
    args = parser.parse_args()

    import onnx_ir as ir
    import onnxruntime as ort

    from maia_onnx.ortutil import make_inputs, session_options
    from maia_onnx.runtime import InferenceSession, session_options as bridge_options, to_ort_custom_op_model
    from maia_onnx.runtime.compile import compile_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = args.model or build_quantized_llama(tmp)
        embedded = compile_model(model_path, tmp / "ctx.onnx", device="maia100").path
        side = compile_model(model_path, tmp / "ctx_side.onnx", device="maia100", embed=False).path
        plain = ort.InferenceSession(str(model_path), session_options(), providers=["CPUExecutionProvider"])
        plain_opt = ort.InferenceSession(str(model_path), session_options(disable_optimizations=False), providers=["CPUExecutionProvider"])
        shim = InferenceSession(embedded, providers=["MaiaExecutionProvider", "CPUExecutionProvider"])
        shim_side = InferenceSession(side, providers=["MaiaExecutionProvider", "CPUExecutionProvider"])
        bridge = ort.InferenceSession(to_ort_custom_op_model(embedded).SerializeToString(), bridge_options(session_options()),
                                      providers=["CPUExecutionProvider"])
        names = [o.name for o in plain.get_outputs()]
        model = ir.load(model_path)
        for label, dims in (("prefill", {"batch": args.batch, "seq": args.seq, "past": 0}),
                            ("decode", {"batch": args.batch, "seq": 1, "past": args.decode_past})):
            feeds = make_inputs(model, seed=0, dims=dims)
            ref = plain.run(names, feeds)
            for sess in (shim, shim_side, bridge):
                got = sess.run(names, feeds)
                assert all(np.array_equal(a, b) for a, b in zip(ref, got)), "outputs differ from plain ORT"
            medians = interleaved({
                "plain ORT (ORT_DISABLE_ALL)": lambda: plain.run(names, feeds),
                "plain ORT (ORT_ENABLE_ALL)": lambda: plain_opt.run(names, feeds),
                "shim, embedded programs": lambda: shim.run(names, feeds),
                "shim, side file": lambda: shim_side.run(names, feeds),
                "plain ORT + custom-op bridge": lambda: bridge.run(names, feeds),
            }, args.runs)
            base = medians["plain ORT (ORT_DISABLE_ALL)"]
            print(f"\nFP8 llama-tiny {label} {dims}, {args.runs} interleaved runs, median (outputs bit-identical)")
            print(f"{'session':32s} {'ms/run':>8s} {'ratio':>6s}")
            for name, sec in medians.items():
                print(f"{name:32s} {sec * 1e3:8.3f} {sec / base:6.2f}")


if __name__ == "__main__":
    main()
