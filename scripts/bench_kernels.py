#!/usr/bin/env python
"""Benchmark the Triton FP8/MX kernels on a CUDA GPU against the device's own copy bandwidth and torch BF16 matmul.

Every figure is a ratio against a reference measured in the same process: (de)quantization kernels as
achieved bandwidth (bytes read + written) over ``torch`` device-to-device copy bandwidth, the fused matmul
as TFLOP/s over ``torch.matmul`` in BF16 of the same shape.  Without a GPU (or Triton) it says so and exits 0.

    python scripts/bench_kernels.py [--rows 8192 --cols 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _no_gpu(reason: str) -> int:
    print(f"bench_kernels: {reason}; nothing to measure (run on a CUDA machine)")
    return 0


def _bench_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` timed with CUDA events (after warm-up)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]

def gpu_check() -> int:
    """Bit-exact comparison of every kernel with the NumPy reference on edge-case tensors, on this device."""
    import ml_dtypes
    import numpy as np

    from maia_onnx.formats import fp8 as rf
    from maia_onnx.formats import mx as rm
    from maia_onnx.runtime import kernels as K

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 70)) * np.exp2(rng.integers(-40, 40, (37, 70)))).astype(np.float32)
    x.reshape(-1)[:12] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -3e-42, 3.4e38, 464.0, 2.0**-10, 5.0]
    x[2, :] = 0
    x[3, :] = 1e-44
    bf16 = np.dtype(ml_dtypes.bfloat16)
    failures = 0

    def cmp(name, got, want):
        nonlocal failures
        g = np.ascontiguousarray(got)
        w = np.ascontiguousarray(want)
        u = {1: np.uint8, 2: np.uint16, 4: np.uint32}[w.dtype.itemsize]
        gb, wb = g.view(u).reshape(-1), w.view(u).reshape(-1)
        bad = np.flatnonzero(gb != wb)
        if bad.size or g.dtype != w.dtype:
            failures += 1
            print(f"MISMATCH {name}: {bad.size} of {wb.size}; idx {bad[:4]} got {[hex(v) for v in gb[bad[:4]]]} "
                  f"want {[hex(v) for v in wb[bad[:4]]]} dtype {g.dtype}/{w.dtype}")
        else:
            print(f"ok {name}")

    codes = np.arange(256 * 10, dtype=np.int64).astype(np.uint8).reshape(37 * 0 + 32, 80)
    for fmt in ("e4m3fn", "e5m2"):
        f = rf.get_fp8_format(fmt)
        for axis, bs in ((None, None), (1, None), (1, 32)):
            if axis is None:
                s = np.float32(0.37)
            elif bs is None:
                s = (rng.random(70) + 0.01).astype(np.float32)
            else:
                s = (rng.random((37, 3)) + 0.01).astype(np.float32)
            for dt in (np.float32, bf16):
                xin = x.astype(dt)
                cmp(f"quantize_fp8 {fmt} {axis} {bs} {dt}", K.quantize_fp8(xin, s, fmt, axis, bs),
                    rf.quantize_fp8(xin.astype(np.float32), s, fmt, axis, bs))
        q = codes.view(f.np_dtype)
        s = (rng.random(80) + 0.01).astype(np.float32)
        for dt in (np.float32, bf16):
            cmp(f"dequantize_fp8 {fmt} {dt}", K.dequantize_fp8(q, s, 1, None, dt), rf.dequantize_fp8(q, s, 1, None, dt))
    for fmt in rm.MX_FORMATS:
        for axis in (-1, 0):
            for dt in (np.float32, bf16):
                xin = x.astype(dt)
                ge, gs = K.mx_quantize(xin, fmt, axis)
                we, ws = rm.mx_quantize(xin.astype(np.float32), fmt, axis)
                cmp(f"mx_quantize exps {fmt} {axis} {dt}", gs, ws)
                cmp(f"mx_quantize elems {fmt} {axis} {dt}", ge, we)
                cmp(f"mx_dequantize {fmt} {axis} {dt}", K.mx_dequantize(we, ws, fmt, axis, 32, dt),
                    rm.mx_dequantize(we, ws, fmt, axis, 32, dt))
    print(f"gpu check: {failures} mismatching cases")
    return failures


def sweep(K, torch, dev) -> dict:
    """Try launch parameters on representative kernels; set the fastest in K's TUNING and return them."""
    from maia_onnx.runtime.kernels._launch import TUNING

    R, C = 8192, 16384
    x32 = torch.randn(R, C, device=dev)
    x16 = x32.to(torch.bfloat16)
    ch = torch.rand(C, device=dev) + 0.1
    q8 = K.quantize_fp8(x32, ch, "e4m3fn", axis=1)
    e4, s4 = K.mx_quantize(x32, "mxfp4", -1, 32)
    chosen = {}

    def best(key_values, fns):
        scores = []
        for values in key_values:
            TUNING.update(values)
            try:
                ms = sum(_bench_ms(fn, 3, 10) for fn in fns)
            except Exception as exc:  # a config may not compile (resources): skip it
                print(f"sweep {values}: {type(exc).__name__}")
                continue
            print(f"sweep {values}: {ms:.4f} ms")
            scores.append((ms, values))
        ms, values = min(scores, key=lambda t: t[0])
        TUNING.update(values)
        chosen.update(values)

    best([{"elementwise_block": b, "elementwise_warps": w} for b, w in
          ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16))],
         [lambda: K.quantize_fp8(x32, ch, "e4m3fn", 1), lambda: K.quantize_fp8(x16, ch, "e5m2", 1),
          lambda: K.dequantize_fp8(q8, ch, 1, None, torch.bfloat16, "e4m3fn"),
          lambda: K.dequantize_fp8(q8, ch, 1, None, torch.float32, "e4m3fn"),
          lambda: K.mx_dequantize(e4, s4, "mxfp4", -1, 32, torch.bfloat16)])
    best([{"mx_elements_per_program": e, "mx_warps": w} for e, w in ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8))],
         [lambda: K.mx_quantize(x16, "mxfp8-e4m3", -1, 32), lambda: K.mx_quantize(x32, "mxfp4", -1, 32)])
    M = Kd = N = 8192
    a = torch.randn(M, Kd, device=dev, dtype=torch.bfloat16)
    w = torch.randn(Kd, N, device=dev) * 0.05
    wsc = w.abs().amax(0) / 448
    wq = K.quantize_fp8(w, wsc, "e4m3fn", axis=1)
    me, mxs = K.mx_quantize(w, "mxfp8-e4m3", 0, 32)
    best([{"matmul_tiles": t} for t in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
                                       (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4))],
         [lambda: K.fp8_matmul(a, wq, wsc, 1, None, "e4m3fn"), lambda: K.mx_matmul(a, me, mxs, "mxfp8-e4m3", 0, 32)])
    print(f"sweep chosen: {chosen}")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=16384)
    parser.add_argument("--mm", default="8192x8192x8192,16x8192x8192", help="matmul shapes MxKxN, comma separated")
    parser.add_argument("--json", dest="json_path", help="write the figures as JSON here")
    parser.add_argument("--check", action="store_true", help="first compare every kernel bit for bit with the reference")
    parser.add_argument("--sweep", action="store_true", help="first try launch parameters and use the fastest")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _no_gpu("TRITON_INTERPRET=1 is set (interpreter timings mean nothing)")
    try:
        import torch
    except ImportError:
        return _no_gpu("torch is not installed")
    if not torch.cuda.is_available():
        return _no_gpu("no CUDA device")
    try:
        import triton  # noqa: F401
    except ImportError:
        return _no_gpu("triton is not installed (pip install maia-onnx[kernels])")

    from maia_onnx.runtime import kernels as K

    if args.check:
        gpu_check()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    chosen = sweep(K, torch, dev) if args.sweep else {}
    R, C = args.rows, args.cols
    n = R * C
    x32 = torch.randn(R, C, device=dev) * 3
    x16 = x32.to(torch.bfloat16)

    # Reference: device-to-device copy of the same float32 tensor (bytes read + written).
    dst = torch.empty_like(x32)
    copy_ms = _bench_ms(lambda: dst.copy_(x32))
    copy_gbs = 2 * n * 4 / copy_ms / 1e6
    dst = None  # free the copy target before the kernels' own buffers

    per_tensor = torch.tensor(0.01, device=dev)
    per_channel = torch.rand(C, device=dev) * 0.01 + 1e-3
    blocked = torch.rand(R, C // 32, device=dev) * 0.01 + 1e-3
    q8 = K.quantize_fp8(x32, per_channel, "e4m3fn", axis=1)
    mx_inputs = {fmt: K.mx_quantize(x32, fmt, -1, 32) for fmt in ("mxfp8-e4m3", "mxint8", "mxfp4")}
    nb = n // 32

    cases = [
        # name, fn, bytes moved
        ("quantize_fp8 f32->e4m3 per-tensor", lambda: K.quantize_fp8(x32, per_tensor, "e4m3fn"), 4 * n + n),
        ("quantize_fp8 f32->e4m3 per-channel", lambda: K.quantize_fp8(x32, per_channel, "e4m3fn", 1), 4 * n + n),
        ("quantize_fp8 f32->e4m3 blocked(32)", lambda: K.quantize_fp8(x32, blocked, "e4m3fn", 1, 32), 4 * n + n + 4 * nb),
        ("quantize_fp8 bf16->e5m2 per-tensor", lambda: K.quantize_fp8(x16, per_tensor, "e5m2"), 2 * n + n),
        ("dequantize_fp8 e4m3->f32 per-channel", lambda: K.dequantize_fp8(q8, per_channel, 1, None, torch.float32, "e4m3fn"), n + 4 * n),
        ("dequantize_fp8 e4m3->bf16 per-channel", lambda: K.dequantize_fp8(q8, per_channel, 1, None, torch.bfloat16, "e4m3fn"), n + 2 * n),
        ("dequantize_fp8 e4m3->f32 blocked(32)", lambda: K.dequantize_fp8(q8, blocked, 1, 32, torch.float32, "e4m3fn"), n + 4 * n + 4 * nb),
    ]
    for fmt, (elems, exps) in mx_inputs.items():
        cases.append((f"mx_quantize f32->{fmt}", lambda fmt=fmt: K.mx_quantize(x32, fmt, -1, 32), 4 * n + n + nb))
        cases.append((f"mx_quantize bf16->{fmt}", lambda fmt=fmt: K.mx_quantize(x16, fmt, -1, 32), 2 * n + n + nb))
        cases.append((f"mx_dequantize {fmt}->f32", lambda fmt=fmt, e=elems, s=exps: K.mx_dequantize(e, s, fmt, -1, 32, torch.float32), n + nb + 4 * n))
        cases.append((f"mx_dequantize {fmt}->bf16", lambda fmt=fmt, e=elems, s=exps: K.mx_dequantize(e, s, fmt, -1, 32, torch.bfloat16), n + nb + 2 * n))

    rows = []
    for name, fn, nbytes in cases:
        try:
            ms = _bench_ms(fn)
        except Exception as exc:  # keep measuring the others; the failure is reported in the table
            rows.append({"kernel": name, "ms": f"error: {type(exc).__name__}"})
            continue
        gbs = nbytes / ms / 1e6
        rows.append({"kernel": name, "ms": round(ms, 4), "GB/s": round(gbs, 1), "x_copy": round(gbs / copy_gbs, 3)})

    mm_rows = []
    for shape in args.mm.split(","):
        M, Kd, N = (int(v) for v in shape.lower().split("x"))
        a = torch.randn(M, Kd, device=dev, dtype=torch.bfloat16)
        w = torch.randn(Kd, N, device=dev) * 0.05
        w16 = w.to(torch.bfloat16)
        ch_scale = w.abs().amax(0) / 448
        wq = K.quantize_fp8(w, ch_scale, "e4m3fn", axis=1)
        me, mxs = K.mx_quantize(w, "mxfp8-e4m3", 0, 32)
        flops = 2 * M * Kd * N
        ref_ms = _bench_ms(lambda: torch.matmul(a, w16))
        ref_tf = flops / ref_ms / 1e9
        for name, fn, wbytes in (
            ("fp8_matmul e4m3 per-channel, bf16 act", lambda: K.fp8_matmul(a, wq, ch_scale, 1, None, "e4m3fn"), Kd * N),
            ("mx_matmul mxfp8-e4m3 (K-blocked), bf16 act", lambda: K.mx_matmul(a, me, mxs, "mxfp8-e4m3", 0, 32), Kd * N * 33 // 32),
        ):
            ms = _bench_ms(fn)
            tf = flops / ms / 1e9
            # the decode-sized case is bound by streaming the weight: report its bandwidth too
            gbs = (wbytes + 2 * M * Kd + 4 * M * N) / ms / 1e6
            mm_rows.append({"kernel": name, "shape": shape, "ms": round(ms, 4), "TFLOP/s": round(tf, 1),
                            "torch_bf16_TFLOP/s": round(ref_tf, 1), "x_torch_bf16": round(tf / ref_tf, 3),
                            "GB/s": round(gbs, 1), "x_copy": round(gbs / copy_gbs, 3)})
        # correctness spot check on the GPU against dequantize + torch matmul (fp32)
        ref = a.float() @ K.dequantize_fp8(wq, ch_scale, 1, None, torch.float32, "e4m3fn")
        got = K.fp8_matmul(a, wq, ch_scale, 1, None, "e4m3fn")
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        mm_rows[-2]["max_rel_err"] = rel

    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"copy bandwidth (torch D2D, read+write): {copy_gbs:.1f} GB/s; tensor {R}x{C}")
    from maia_onnx.report import print_table

    print_table(rows, ["kernel", "ms", "GB/s", "x_copy"], title="(de)quantization vs copy bandwidth")
    print_table(mm_rows, ["kernel", "shape", "ms", "TFLOP/s", "torch_bf16_TFLOP/s", "x_torch_bf16", "GB/s", "x_copy"],
                title="dequant-fused matmul vs torch BF16 matmul")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                       "copy_GBps": copy_gbs, "shape": [R, C], "tuning": chosen, "elementwise": rows,
                       "matmul": mm_rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
