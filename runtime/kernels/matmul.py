"""Dequant-fused matmul: ``a @ dequant(W)`` with FP8 or MX weights, FP32/BF16 activations, FP32 accumulation.

The weight ``W`` is ``[K, N]`` (ONNX MatMul's right operand) and is never materialised in a wider type:
each tile is decoded from its 1-byte codes in registers (the GPU's FP8 conversion instructions on CUDA).
Scales may be per-tensor, per-channel or blocked along either axis.  FP8 weights whose scale is constant
over a K tile (per-tensor, per-output-channel, blocked along K with the block a multiple of the K tile)
put the raw decoded codes into the dot product and scale the FP32 partial sums; MX weights multiply each
decoded code by its power-of-two block scale, which is exact.  With BF16 activations on a GPU both dots
run on BF16 tensor cores, exactly, because FP8/FP4/INT8 codes (times powers of two) are exact in BF16.
Other layouts scale each weight in FP32 before an IEEE FP32 dot.

References (``reference_fp8_matmul``, ``reference_mx_matmul``) are the formats' NumPy dequantization
followed by a float64 matmul.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from maia_onnx.formats.fp8 import _check_scale, get_fp8_format
from maia_onnx.formats.mx import mx_format
from maia_onnx.runtime.kernels._bits import decode_element, e8m0_factors, store_f32_or_bf16
from maia_onnx.runtime.kernels._launch import (
    BF16,
    TUNING,
    bf16_bits,
    interpreting,
    kernel_device,
    to_numpy,
    to_torch,
    torch_out_dtype,
)
from maia_onnx.runtime.kernels.mx import ELEMENTS


@triton.jit
def _weight_scale(s_ptr, kk, nn, mask, BSK, BSN, s_stride_k, s_stride_n,
                  SCALE_E8M0: tl.constexpr, LOG2_IMPLICIT: tl.constexpr):
    """Scale(s) for weight positions (kk, nn): float32 scales, or E8M0 bytes as two exact factors."""
    idx = (kk // BSK) * s_stride_k + (nn // BSN) * s_stride_n
    if SCALE_E8M0:
        e = tl.load(s_ptr + idx, mask=mask, other=127).to(tl.int32)
        s1, s2 = e8m0_factors(e, LOG2_IMPLICIT)
    else:
        s1 = tl.load(s_ptr + idx, mask=mask, other=1.0)
        s2 = s1 * 0.0 + 1.0
    return s1, s2


@triton.jit
def _dequant_matmul_kernel(a_ptr, w_ptr, s_ptr, c_ptr, M, N, K,
                           stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_cn,
                           BSK, BSN, s_stride_k, s_stride_n,
                           ELEM: tl.constexpr, SCALE_E8M0: tl.constexpr, LOG2_IMPLICIT: tl.constexpr,
                           POST_SCALE: tl.constexpr, SCALE_PER_K: tl.constexpr,
                           A_BF16: tl.constexpr, DOT_BF16: tl.constexpr, OUT_BF16: tl.constexpr, NATIVE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    # Grouped program order so consecutive programs share weight tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        a_off = rm[:, None] * stride_am + kk[None, :] * stride_ak
        if A_BF16:
            bits = tl.load(a_ptr + a_off, mask=a_mask, other=0).to(tl.int32) & 0xFFFF
            a = (bits << 16).to(tl.float32, bitcast=True)
        else:
            a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        codes = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=w_mask, other=0).to(tl.int32)
        w = decode_element(codes, ELEM, NATIVE)
        if POST_SCALE:
            if DOT_BF16:
                part = tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16), out_dtype=tl.float32)
            else:
                part = tl.dot(a, w, input_precision="ieee", out_dtype=tl.float32)
            if SCALE_PER_K:
                s1, s2 = _weight_scale(s_ptr, k0 + rn * 0, rn, n_ok, BSK, BSN, s_stride_k, s_stride_n,
                                       SCALE_E8M0, LOG2_IMPLICIT)
                acc += (part * s1[None, :]) * s2[None, :]
            else:
                acc += part
        else:
            s1, s2 = _weight_scale(s_ptr, kk[:, None], rn[None, :], w_mask, BSK, BSN, s_stride_k, s_stride_n,
                                   SCALE_E8M0, LOG2_IMPLICIT)
            if DOT_BF16:  # power-of-two (E8M0) scales: the scaled code is still exact in BF16
                acc += tl.dot(a.to(tl.bfloat16), ((w * s1) * s2).to(tl.bfloat16), out_dtype=tl.float32)
            else:
                acc += tl.dot(a, (w * s1) * s2, input_precision="ieee", out_dtype=tl.float32)
    if POST_SCALE and not SCALE_PER_K:
        s1, s2 = _weight_scale(s_ptr, rn * 0, rn, n_ok, BSK, BSN, s_stride_k, s_stride_n, SCALE_E8M0, LOG2_IMPLICIT)
        acc = (acc * s1[None, :]) * s2[None, :]
    c_off = rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    store_f32_or_bf16(c_ptr, c_off, acc, c_mask, OUT_BF16, NATIVE)


def _tiles(M: int, dot_bf16: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the problem; small tiles in the interpreter."""
    if interpreting():
        return 16, 32, 32, 4, 1
    if TUNING["matmul_tiles"] and M > 64:
        return tuple(TUNING["matmul_tiles"])
    if dot_bf16:
        if M <= 64:
            return 16 if M <= 16 else 64, 128, 128, 4, 4
        return 128, 128, 64, 8, 3
    return (32 if M <= 32 else 64), 64, 32, 4, 3


def _launch(a, codes, scale, elem, scale_e8m0, log2_implicit, bsk, bsn, s_stride_k, s_stride_n, out_dtype):
    """Shared host code: a [..., K] x codes [K, N] -> [..., N]."""
    import torch

    device = kernel_device()
    at = to_torch(a, device)
    if at.dtype not in (torch.float32, torch.bfloat16):
        at = at.to(torch.float32)
    K, N = codes.shape
    if at.shape[-1] != K:
        raise ValueError(f"activation inner dim {at.shape[-1]} does not match weight rows {K}")
    lead = at.shape[:-1]
    a2 = at.reshape(-1, K)
    M = a2.shape[0]
    a_bf16 = at.dtype == torch.bfloat16
    native = not interpreting()
    if scale_e8m0:
        # power-of-two scales multiply each decoded weight exactly: no post-scaling, any K tile
        post_scale = False
        dot_bf16 = a_bf16 and native
        block_m, block_n, block_k, warps, stages = _tiles(M, dot_bf16)
    else:
        # scale constant over a K tile: post-scale the partial sums (BF16 tensor cores when possible)
        block_m, block_n, block_k, warps, stages = _tiles(M, a_bf16 and native)
        if s_stride_k != 0 and bsk % block_k:
            block_k = next((t for t in (64, 32, 16) if t <= block_k and bsk % t == 0), block_k)
        post_scale = s_stride_k == 0 or bsk % block_k == 0
        dot_bf16 = post_scale and a_bf16 and native
        if not dot_bf16:
            block_m, block_n, block_k, warps, stages = _tiles(M, False)
            post_scale = s_stride_k == 0 or bsk % block_k == 0
    c = torch.empty((M, N), dtype=torch_out_dtype(out_dtype), device=device)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    if M and N:
        _dequant_matmul_kernel[grid](
            bf16_bits(a2), codes, scale, bf16_bits(c), M, N, K,
            a2.stride(0), a2.stride(1), codes.stride(0), codes.stride(1), c.stride(0), c.stride(1),
            bsk, bsn, s_stride_k, s_stride_n,
            ELEM=elem, SCALE_E8M0=scale_e8m0, LOG2_IMPLICIT=log2_implicit,
            POST_SCALE=post_scale, SCALE_PER_K=s_stride_k != 0,
            A_BF16=a_bf16, DOT_BF16=dot_bf16, OUT_BF16=c.dtype == torch.bfloat16, NATIVE=native,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
            num_warps=warps, num_stages=stages,
        )
    return c.reshape(*lead, N)


def _finish(c, numpy_in, out_dtype):
    import torch

    if not numpy_in:
        return c
    return to_numpy(c, BF16 if c.dtype == torch.bfloat16 else np.float32)


def fp8_matmul(a, w_q, scale, axis=None, block_size=None, fmt=None, out_dtype=np.float32):
    """``a @ dequantize_fp8(w_q, scale, axis, block_size)`` for FP8 weights ``[K, N]``; FP32 accumulation.

    ``scale``: scalar; 1-D along ``axis`` (1: per output channel, 0: per input row); or blocked along
    ``axis`` (0: ``[ceil(K/bs), N]``, the usual; 1: ``[K, ceil(N/bs)]``).  ``fmt`` is needed for uint8 codes.
    """
    import ml_dtypes
    import torch

    numpy_in = not isinstance(a, torch.Tensor)
    if fmt is None:
        qdtype = w_q.dtype if not isinstance(w_q, torch.Tensor) else None
        fmt = "e5m2" if qdtype == np.dtype(ml_dtypes.float8_e5m2) else "e4m3fn"
    f = get_fp8_format(fmt)
    device = kernel_device()
    wt = to_torch(w_q, device).view(torch.uint8)
    st = to_torch(scale, device, np.float32).to(torch.float32).contiguous()
    if wt.dim() != 2:
        raise ValueError(f"fp8_matmul needs a 2-D weight [K, N], got shape {tuple(wt.shape)}")
    K, N = wt.shape
    if block_size is not None and axis is None:
        axis = 0
    _check_scale(np.empty(tuple(st.shape), np.uint8), (K, N), axis, block_size)
    per_tensor = st.dim() == 0 or (axis is None and st.numel() == 1)
    if per_tensor:
        bsk, bsn, ssk, ssn = 1, 1, 0, 0
    elif block_size:
        if axis % 2 == 0:
            bsk, bsn, ssk, ssn = int(block_size), 1, N, 1
        else:
            bsk, bsn, ssk, ssn = 1, int(block_size), st.shape[1], 1
    elif axis % 2 == 1:
        bsk, bsn, ssk, ssn = 1, 1, 0, 1
    else:
        bsk, bsn, ssk, ssn = 1, 1, 1, 0
    c = _launch(a, wt, st, 1 if f.name == "e5m2" else 0, False, 0, bsk, bsn, ssk, ssn, out_dtype)
    return _finish(c, numpy_in, out_dtype)


def mx_matmul(a, elements, exps, fmt, axis=0, block_size=32, out_dtype=np.float32):
    """``a @ mx_dequantize(elements, exps, fmt, axis, block_size)`` for MX weights ``[K, N]``.

    ``axis=0`` (blocks along K, exps ``[ceil(K/bs), N]``) is the layout that post-scales partial sums.
    """
    import torch

    f = mx_format(fmt)
    elem, log2_implicit = ELEMENTS[f.name]
    numpy_in = not isinstance(a, torch.Tensor)
    device = kernel_device()
    et = to_torch(elements, device)
    et = et.view(torch.int8) if elem == 2 else et.view(torch.uint8)
    xt = to_torch(exps, device, np.uint8)
    if et.dim() != 2:
        raise ValueError(f"mx_matmul needs a 2-D weight [K, N], got shape {tuple(et.shape)}")
    K, N = et.shape
    axis %= 2
    expected = (-(-K // block_size), N) if axis == 0 else (K, -(-N // block_size))
    if tuple(xt.shape) != expected:
        raise ValueError(f"scale exponents of shape {tuple(xt.shape)} do not match {expected} for block {block_size}")
    if axis == 0:
        bsk, bsn, ssk, ssn = int(block_size), 1, N, 1
    else:
        bsk, bsn, ssk, ssn = 1, int(block_size), xt.shape[1], 1
    c = _launch(a, et, xt, elem, True, log2_implicit, bsk, bsn, ssk, ssn, out_dtype)
    return _finish(c, numpy_in, out_dtype)


def reference_fp8_matmul(a, w_q, scale, axis=None, block_size=None, fmt=None):
    """NumPy reference: the formats' dequantization, then a float64 matmul (returned as float64)."""
    from maia_onnx.formats.fp8 import dequantize_fp8

    w = dequantize_fp8(w_q, scale, axis, block_size, np.float32, fmt)
    return np.asarray(a, dtype=np.float64) @ w.astype(np.float64)


def reference_mx_matmul(a, elements, exps, fmt, axis=0, block_size=32):
    from maia_onnx.formats.mx import mx_dequantize

    w = mx_dequantize(elements, exps, fmt, axis, block_size, np.float32)
    return np.asarray(a, dtype=np.float64) @ w.astype(np.float64)
