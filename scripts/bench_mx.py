"""Benchmark the MX / mx9 / mx6 formats and the FP8 KV cache: accuracy per format and family, quantisation speed
against the FP8 reference in the same process, the multi-GB llama-large conversion, and a 32-step decode.

    python scripts/bench_mx.py [--large] [--json out.json]

Figures go to docs/benchmarks.md.  Speed is reported as ratios to a reference run in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _benchutil import LARGE_MODEL as LARGE
from _benchutil import best_of, current_rss_bytes, max_rss_bytes

FORMATS = ["mxfp8-e4m3", "mxfp8-e5m2", "mxint8", "mxfp4", "mx9", "mx6"]


def accuracy(tmp: Path) -> list[dict]:
    from maia_onnx.export import export_builtin
    from maia_onnx.io import load_model
    from maia_onnx.ortutil import compare, make_inputs, run_model
    from maia_onnx.passes.quantize_mx import QuantizeMxPass

    rows = []
    for family in ("llama-tiny", "unet-tiny", "yolo-tiny"):
        path = tmp / f"{family}.onnx"
        export_builtin(family, path)
        fp32 = load_model(path)
        feeds = make_inputs(fp32, seed=0, dims={"batch": 1, "seq": 8, "past": 4, "*": 2})
        ref = run_model(fp32, feeds)
        for fmt in FORMATS:
            qp = QuantizeMxPass(fmt)
            result = qp(load_model(path))
            got = run_model(result.model, feeds)
            first = next(iter(ref))
            m = compare(ref[first], got[first])
            rows.append(
                {
                    "family": family,
                    "format": fmt,
                    "activations": qp.activations,
                    "weight_sqnr_db": round(float(np.mean([r.sqnr_db for r in result.layers])), 1),
                    "output": first,
                    "cosine": round(m["cosine"], 5),
                    "max_rel": round(m["max_rel"], 4),
                }
            )
            print(rows[-1], file=sys.stderr)
    return rows


def speed() -> list[dict]:
    from maia_onnx.formats import mx
    from maia_onnx.formats.fp8 import fp8_amax_scale, quantize_fp8

    w = np.random.default_rng(0).standard_normal((2048, 5632)).astype(np.float32)

    def timed(fn):
        return best_of(fn, repeat=3)

    def fp8_ref():
        scale = fp8_amax_scale(np.abs(w).max(axis=0))
        quantize_fp8(w, scale, "e4m3fn", axis=1)

    ref = timed(fp8_ref)
    rows = [{"op": "FP8 per-channel quantize_fp8 (reference)", "seconds": round(ref, 3), "ratio": 1.0}]
    for name, fn in [
        ("mx_quantize mxfp8-e4m3", lambda: mx.mx_quantize(w, "mxfp8-e4m3", axis=0)),
        ("mx_quantize mxint8", lambda: mx.mx_quantize(w, "mxint8", axis=0)),
        ("mx_quantize mxfp4", lambda: mx.mx_quantize(w, "mxfp4", axis=0)),
        ("fake_quant_mx9", lambda: mx.fake_quant_mx9(w, axis=0)),
        ("fake_quant_mx6", lambda: mx.fake_quant_mx6(w, axis=0)),
    ]:
        t = timed(fn)
        rows.append({"op": name, "seconds": round(t, 3), "ratio": round(t / ref, 2)})
        print(rows[-1], file=sys.stderr)
    return rows


def large(tmp: Path) -> list[dict]:
    """llama-large (3.4 GB FP32, external data): FP8 weight-only (reference) vs mxfp8-e4m3 weight-only, load+quantize+save."""
    import gc

    from maia_onnx.io import load_model, save_model
    from maia_onnx.passes.quantize_fp8 import QuantizeFp8Pass
    from maia_onnx.passes.quantize_mx import QuantizeMxPass

    rows = []
    for label, make in [
        ("FP8 e4m3 per-channel weights (reference)", lambda: QuantizeFp8Pass(weights_only=True)),
        ("mxfp8-e4m3 weights (ort form)", lambda: QuantizeMxPass("mxfp8-e4m3", activations=False)),
        ("mx9 fake-quant weights (FP32 out, lazy)", lambda: QuantizeMxPass("mx9")),
    ]:
        out = tmp / "large-out.onnx"
        rss_before = current_rss_bytes() / 2**20
        t0 = time.perf_counter()
        model = load_model(LARGE)
        p = make()
        model = p(model).model
        t_pass = time.perf_counter() - t0
        save_model(model, out, external_data=True)
        total = time.perf_counter() - t0
        size = out.stat().st_size + (out.with_name(out.name + ".data").stat().st_size if out.with_name(out.name + ".data").exists() else 0)
        rows.append({"run": label, "pass_seconds": round(t_pass, 1), "total_seconds": round(total, 1), "output_bytes": size,
                     "rss_mb_before": round(rss_before), "peak_rss_mb_so_far": round(max_rss_bytes() / 2**20)})
        print(rows[-1], file=sys.stderr)
        del model, p
        gc.collect()
        for f in tmp.glob("large-out.onnx*"):
            f.unlink()
    ref = rows[0]["total_seconds"]
    for r in rows:
        r["ratio"] = round(r["total_seconds"] / ref, 2)
    return rows


def decode(tmp: Path) -> list[dict]:
    import torch

    from maia_onnx.decode import DecoderSession, compare_decode
    from maia_onnx.export import export_spec
    from maia_onnx.io import load_model
    from maia_onnx.models import registry
    from maia_onnx.passes.kv_cache import KvCacheFp8Pass

    spec = registry.build("llama-tiny")
    module = spec.module.train()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(module.parameters(), lr=5e-3)
    past = [torch.zeros(16, 2, 0, 16) for _ in range(4)]
    for _ in range(300):
        ids = torch.randint(0, 64, (16, 5)).repeat(1, 5)
        logits = module(ids, *past)[0]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (logits[:, 5:-1].argmax(-1) == ids[:, 6:]).float().mean().item() == 1.0 and loss.item() < 1.0:
            break
    module.eval()
    path = tmp / "copy.onnx"
    export_spec(spec, path)
    pattern = np.array([[7, 42, 3, 19, 55], [11, 2, 60, 33, 8]])
    prompt = np.concatenate([pattern, pattern], axis=1)
    empty = {f"past_key_values.{i}.{k}": np.zeros((4, 2, 0, 16), np.float32) for i in range(2) for k in ("key", "value")}
    calib = [{"input_ids": np.tile(np.random.default_rng(1).integers(0, 64, (4, 5)), (1, 4)), **empty}]
    rows = []
    for fmt in ("fp8-e4m3", "fp8-e5m2"):
        for gran in ("tensor", "head"):
            model = load_model(path)
            KvCacheFp8Pass(fmt, gran, calib=calib)(model)
            r = compare_decode(DecoderSession(load_model(path)), DecoderSession(model), prompt, 32)
            rows.append(
                {
                    "kv_cache": fmt,
                    "scales": gran,
                    "token_agreement": r.token_agreement,
                    "free_running_agreement": r.free_running_agreement,
                    "min_cosine": round(r.min_cosine, 5),
                    "mean_cosine": round(r.mean_cosine, 6),
                    "cache_bytes_per_token": r.cache_bytes_per_token,
                }
            )
            print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--large", action="store_true", help=f"also convert {LARGE} (3.4 GB; a few minutes)")
    ap.add_argument("--json", help="write all figures here")
    ap.add_argument("--only", choices=["speed", "accuracy", "decode", "large"], help="run one section")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        wanted = {args.only} if args.only else {"speed", "accuracy", "decode"} | ({"large"} if args.large else set())
        for name, fn in (("speed", speed), ("accuracy", lambda: accuracy(tmp)), ("decode", lambda: decode(tmp))):
            if name in wanted:
                results[name] = fn()
        if "large" in wanted:
            if not LARGE.exists():
                sys.exit(f"{LARGE} missing: run scripts/make_large_models.py first")
            results["large"] = large(tmp)
    results["peak_rss_mb"] = round(max_rss_bytes() / 2**20)
    text = json.dumps(results, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
