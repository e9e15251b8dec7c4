"""Triton FP8 (E4M3FN, E5M2) quantize and dequantize kernels, bit-exact with ``maia_onnx.formats.fp8``.

Same signatures as the NumPy reference: ``quantize_fp8(x, scale, fmt, axis, block_size)`` writes the codes
``saturate(RNE(x / scale))`` that the quantization passes store (float32 division, correctly rounded);
``dequantize_fp8(q, scale, axis, block_size, dtype, fmt)`` returns ``float32(q) * scale`` (float32 product,
then cast to the output dtype).  Scales are per-tensor (scalar), per-channel (1-D along ``axis``) or blocked
(x's shape with ``axis`` divided by ``block_size``, rounded up).  Inputs float32 or bfloat16; outputs
float32 or bfloat16.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from maia_onnx.formats.fp8 import _check_scale, get_fp8_format
from maia_onnx.runtime.kernels._bits import decode_element, encode_fp8, numpy_nan, store_f32_or_bf16
from maia_onnx.runtime.kernels._launch import (
    BF16,
    axis_layout,
    bf16_bits,
    TUNING,
    check_size,
    interpreting,
    kernel_device,
    to_numpy,
    to_torch,
    torch_out_dtype,
)

SCALE_TENSOR, SCALE_CHANNEL, SCALE_BLOCKED, SCALE_BLOCKED_LAST = 0, 1, 2, 3


@triton.jit
def scale_index(off, LENGTH, INNER, NBLOCKS, BS, MODE: tl.constexpr):
    """Flat index into the scale tensor for flat element offsets (tensor viewed as [outer, LENGTH, INNER]).

    MODE 0 per-tensor, 1 per-channel, 2 blocked, 3 blocked along the last axis with LENGTH % BS == 0
    (then the block number is simply off // BS: one shift when BS is a power of two).
    """
    if MODE == 0:
        idx = off * 0
    elif MODE == 3:
        idx = off // BS
    elif MODE == 1:
        idx = (off // INNER) % LENGTH
    else:
        a = (off // INNER) % LENGTH
        o = off // (LENGTH * INNER)
        idx = (o * NBLOCKS + a // BS) * INNER + off % INNER
    return idx


@triton.jit
def load_as_f32(ptr, off, mask, IN_BF16: tl.constexpr):
    """float32 load, or bfloat16 read as int16 bits and widened exactly."""
    if IN_BF16:
        bits = tl.load(ptr + off, mask=mask, other=0).to(tl.int32) & 0xFFFF
        x = (bits << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + off, mask=mask, other=0.0)
    return x


@triton.jit
def _quantize_fp8_kernel(x_ptr, s_ptr, q_ptr, n, LENGTH, INNER, NBLOCKS, BS,
                         SCALE_MODE: tl.constexpr, IN_BF16: tl.constexpr, E5M2: tl.constexpr,
                         NATIVE: tl.constexpr, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    x = load_as_f32(x_ptr, off, mask, IN_BF16)
    s = tl.load(s_ptr + scale_index(off, LENGTH, INNER, NBLOCKS, BS, SCALE_MODE), mask=mask, other=1.0)
    y = numpy_nan(tl.math.div_rn(x, s), x, s)
    code = encode_fp8(y, E5M2, 0x7F, 0xFF, NATIVE)
    tl.store(q_ptr + off, code.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_fp8_kernel(q_ptr, s_ptr, out_ptr, n, LENGTH, INNER, NBLOCKS, BS,
                           SCALE_MODE: tl.constexpr, E5M2: tl.constexpr, OUT_BF16: tl.constexpr,
                           NATIVE: tl.constexpr, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    b = tl.load(q_ptr + off, mask=mask, other=0).to(tl.int32)
    s = tl.load(s_ptr + scale_index(off, LENGTH, INNER, NBLOCKS, BS, SCALE_MODE), mask=mask, other=1.0)
    d = decode_element(b, 1 if E5M2 else 0, NATIVE)
    v = numpy_nan(d * s, d, s)
    store_f32_or_bf16(out_ptr, off, v, mask, OUT_BF16, NATIVE)


def _scale_plan(scale_shape, shape, axis, block_size):
    """(mode, layout args) for a scale of ``scale_shape`` on a tensor of ``shape`` (reference conventions)."""
    size = int(np.prod(scale_shape, dtype=np.int64))
    if len(scale_shape) == 0 or (axis is None and size == 1):
        return SCALE_TENSOR, (1, 1, 1, 1)
    axis = 0 if axis is None else axis
    if block_size:
        lay = axis_layout(shape, axis, int(block_size))
        mode = SCALE_BLOCKED_LAST if lay.inner == 1 and lay.length % lay.block == 0 else SCALE_BLOCKED
        return mode, (lay.length, lay.inner, lay.nblocks, lay.block)
    lay = axis_layout(shape, axis, 1)
    return SCALE_CHANNEL, (lay.length, lay.inner, lay.length, 1)


def _prepare(x, scale, axis, block_size):
    import torch

    device = kernel_device()
    xt = to_torch(x, device)
    st = to_torch(scale, device, np.float32).to(torch.float32)
    if block_size is not None and axis is None:
        axis = 0 if xt.dim() else None
    _check_scale(np.empty(tuple(st.shape), dtype=np.uint8), tuple(xt.shape), axis, block_size)
    check_size(xt.numel())
    return device, xt, st.contiguous(), _scale_plan(tuple(st.shape), tuple(xt.shape), axis, block_size)


def quantize_fp8(x, scale, fmt="e4m3fn", axis=None, block_size=None):
    """``saturate(RNE(x / scale))`` as FP8 codes: an ml_dtypes float8 array for NumPy input, uint8 tensor for torch."""
    import torch

    f = get_fp8_format(fmt)
    numpy_in = not isinstance(x, torch.Tensor)
    if numpy_in:
        x = np.asarray(x)
        if x.dtype != BF16:
            x = np.asarray(x, dtype=np.float32)
    device, xt, st, (mode, (length, inner, nblocks, bs)) = _prepare(x, scale, axis, block_size)
    in_bf16 = xt.dtype == torch.bfloat16
    if not in_bf16 and xt.dtype != torch.float32:
        xt = xt.to(torch.float32)
    q = torch.empty(xt.shape, dtype=torch.uint8, device=device)
    n = xt.numel()
    if n:
        block = TUNING["elementwise_block"]
        _quantize_fp8_kernel[(triton.cdiv(n, block),)](
            bf16_bits(xt), st, q, n, length, inner, nblocks, bs,
            SCALE_MODE=mode, IN_BF16=in_bf16, E5M2=f.name == "e5m2", NATIVE=not interpreting(), BLOCK=block,
            num_warps=TUNING["elementwise_warps"],
        )
    return to_numpy(q, f.np_dtype) if numpy_in else q


def dequantize_fp8(q, scale, axis=None, block_size=None, dtype=np.float32, fmt=None):
    """``float32(q) * scale`` cast to ``dtype`` (float32 or bfloat16); ``fmt`` required for uint8 codes."""
    import ml_dtypes
    import torch

    numpy_in = not isinstance(q, torch.Tensor)
    if fmt is None:
        qdtype = np.asarray(q).dtype if numpy_in else None
        if qdtype == np.dtype(ml_dtypes.float8_e5m2):
            fmt = "e5m2"
        elif qdtype == np.dtype(ml_dtypes.float8_e4m3fn):
            fmt = "e4m3fn"
        else:
            raise ValueError("dequantize_fp8 needs a float8 array (or fmt= for uint8 codes)")
    f = get_fp8_format(fmt)
    out_dtype = torch_out_dtype(dtype)
    device, qt, st, (mode, (length, inner, nblocks, bs)) = _prepare(q, scale, axis, block_size)
    out = torch.empty(qt.shape, dtype=out_dtype, device=device)
    n = qt.numel()
    if n:
        block = TUNING["elementwise_block"]
        _dequantize_fp8_kernel[(triton.cdiv(n, block),)](
            qt.view(torch.uint8), st, bf16_bits(out), n, length, inner, nblocks, bs,
            SCALE_MODE=mode, E5M2=f.name == "e5m2", OUT_BF16=out_dtype == torch.bfloat16,
            NATIVE=not interpreting(), BLOCK=block, num_warps=TUNING["elementwise_warps"],
        )
    return to_numpy(out, dtype if not isinstance(dtype, torch.dtype) else np.float32) if numpy_in else out
