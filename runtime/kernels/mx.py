"""Triton OCP MX kernels (mxfp8-e4m3, mxfp8-e5m2, mxint8, mxfp4; E8M0 block scales), bit-exact with
``maia_onnx.formats.mx``.

``mx_quantize(x, fmt, axis=-1, block_size=32) -> (elements, scale_exponents)`` and
``mx_dequantize(elements, exps, fmt, axis, block_size, dtype)`` have the reference's signatures and
semantics: shared exponent ``floor(log2 amax) - emax`` (clamped, biased 127; a NaN/Inf anywhere in a block
gives 0xFF), elements ``x / 2^e`` rounded to nearest-even and saturated (mxint8: clamped to +-127 in units of
2^-6, NaN -> 0), last block short when the axis is not a multiple of the block.  FP4 elements are one
code per byte (``ml_dtypes.float4_e2m1fn``), as the reference returns them.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from maia_onnx.formats.mx import mx_format
from maia_onnx.runtime.kernels._bits import (
    decode_element,
    e8m0_factors,
    encode_fp4,
    encode_fp8,
    numpy_nan,
    pow2,
    round_int8,
    store_f32_or_bf16,
)
from maia_onnx.runtime.kernels._launch import (
    BF16,
    TUNING,
    axis_layout,
    bf16_bits,
    check_size,
    interpreting,
    kernel_device,
    to_numpy,
    to_torch,
    torch_out_dtype,
)
from maia_onnx.runtime.kernels.fp8 import load_as_f32, scale_index

# format name -> (element code, log2 of the implicit element scale)
ELEMENTS = {"mxfp8-e4m3": (0, 0), "mxfp8-e5m2": (1, 0), "mxint8": (2, -6), "mxfp4": (3, 0)}


@triton.jit
def encode_mx_element(v, ELEM: tl.constexpr, NATIVE: tl.constexpr):
    """Scaled value -> stored element code (int32), with the reference's NaN codes (FP8 through
    ``cast_fp8_saturate``: 0x7F/0xFF; FP4 through an ml_dtypes cast: 0x8 for +NaN, 0x0 for -NaN)."""
    if ELEM == 0:
        code = encode_fp8(v, False, 0x7F, 0xFF, NATIVE)
    elif ELEM == 1:
        code = encode_fp8(v, True, 0x7F, 0xFF, NATIVE)
    elif ELEM == 2:
        code = round_int8(v)
    else:
        code = encode_fp4(v)
    return code


@triton.jit
def _mx_quantize_kernel(x_ptr, e_ptr, exp_ptr, n_blocks, LENGTH, INNER, NBLOCKS,
                        BS: tl.constexpr, BS_POW2: tl.constexpr, CONTIGUOUS: tl.constexpr,
                        ELEM: tl.constexpr, EMAX: tl.constexpr, LOG2_IMPLICIT: tl.constexpr,
                        IN_BF16: tl.constexpr, NATIVE: tl.constexpr, G: tl.constexpr):
    # One row per block of BS elements along the axis; blocks are numbered in (outer, block, inner) order,
    # which is exactly the flat order of the scale tensor.
    g = tl.program_id(0) * G + tl.arange(0, G)
    j = tl.arange(0, BS_POW2)
    if CONTIGUOUS:  # axis is last and LENGTH % BS == 0: block g covers elements [g*BS, (g+1)*BS)
        addr = g[:, None] * BS + j[None, :]
        mask = (g[:, None] < n_blocks) & (j[None, :] < BS)
    else:
        o = g // (NBLOCKS * INNER)
        r = g % (NBLOCKS * INNER)
        a = (r // INNER)[:, None] * BS + j[None, :]
        addr = (o[:, None] * LENGTH + a) * INNER + (r % INNER)[:, None]
        mask = (g[:, None] < n_blocks) & (j[None, :] < BS) & (a < LENGTH)
    x = load_as_f32(x_ptr, addr, mask, IN_BF16)
    # For non-negative floats the bit patterns order like the values, and NaN/Inf sort above every
    # finite value: an integer max gives amax and flags non-finite blocks.
    max_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    biased = tl.minimum(tl.maximum((max_bits >> 23) - EMAX, 0), 254)
    exps = tl.where(max_bits >= 0x7F800000, 255, biased)
    # v = x / (2^(e-127) * implicit), by two exact power-of-two multiplies (2^-p may not fit one float32).
    p = exps - 127 + LOG2_IMPLICIT
    p1 = p >> 1
    s1 = pow2(-p1)[:, None]
    s2 = pow2(p1 - p)[:, None]
    v = numpy_nan((x * s1) * s2, x, s1)
    code = encode_mx_element(v, ELEM, NATIVE)
    if ELEM == 2:
        tl.store(e_ptr + addr, code.to(tl.int8), mask=mask)
    else:
        tl.store(e_ptr + addr, code.to(tl.uint8), mask=mask)
    tl.store(exp_ptr + g, exps.to(tl.uint8), mask=g < n_blocks)


@triton.jit
def _mx_dequantize_kernel(e_ptr, exp_ptr, out_ptr, n, LENGTH, INNER, NBLOCKS, BS,
                          ELEM: tl.constexpr, LOG2_IMPLICIT: tl.constexpr, OUT_BF16: tl.constexpr,
                          MODE: tl.constexpr, NATIVE: tl.constexpr, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    b = tl.load(e_ptr + off, mask=mask, other=0).to(tl.int32)
    e = tl.load(exp_ptr + scale_index(off, LENGTH, INNER, NBLOCKS, BS, MODE), mask=mask, other=127).to(tl.int32)
    d = decode_element(b, ELEM, NATIVE)
    s1, s2 = e8m0_factors(e, LOG2_IMPLICIT)
    v = numpy_nan((d * s1) * s2, d, s2)
    store_f32_or_bf16(out_ptr, off, v, mask, OUT_BF16, NATIVE)


def _element_spec(fmt):
    f = mx_format(fmt)
    elem, log2_implicit = ELEMENTS[f.name]
    return f, elem, log2_implicit


def mx_quantize(x, fmt, axis=-1, block_size=32):
    """``(elements, biased E8M0 exponents)``; NumPy in -> NumPy out (reference dtypes), torch in -> torch out."""
    import torch

    f, elem, log2_implicit = _element_spec(fmt)
    numpy_in = not isinstance(x, torch.Tensor)
    if numpy_in:
        x = np.asarray(x)
        if x.dtype != BF16:
            x = np.asarray(x, dtype=np.float32)
    device = kernel_device()
    xt = to_torch(x, device)
    in_bf16 = xt.dtype == torch.bfloat16
    if not in_bf16 and xt.dtype != torch.float32:
        xt = xt.to(torch.float32)
    check_size(xt.numel())
    lay = axis_layout(tuple(xt.shape), axis, int(block_size))
    exp_shape = list(xt.shape)
    exp_shape[axis % xt.dim()] = lay.nblocks
    elements = torch.empty(xt.shape, dtype=torch.int8 if elem == 2 else torch.uint8, device=device)
    exps = torch.empty(exp_shape, dtype=torch.uint8, device=device)
    n_blocks = lay.outer * lay.nblocks * lay.inner
    if n_blocks:
        bs_pow2 = triton.next_power_of_2(lay.block)
        g = max(1, TUNING["mx_elements_per_program"] // bs_pow2)
        _mx_quantize_kernel[(triton.cdiv(n_blocks, g),)](
            bf16_bits(xt), elements, exps, n_blocks, lay.length, lay.inner, lay.nblocks,
            BS=lay.block, BS_POW2=bs_pow2, CONTIGUOUS=lay.inner == 1 and lay.length % lay.block == 0,
            ELEM=elem, EMAX=f.emax, LOG2_IMPLICIT=log2_implicit, IN_BF16=in_bf16, NATIVE=not interpreting(), G=g,
            num_warps=TUNING["mx_warps"],
        )
    if numpy_in:
        return to_numpy(elements, f.element_dtype), to_numpy(exps, np.uint8)
    return elements, exps


def mx_dequantize(elements, exps, fmt, axis=-1, block_size=32, dtype=np.float32):
    """``element * implicit_scale * 2^(exp - 127)`` (NaN where exp is 0xFF) as float32 or bfloat16."""
    import torch

    f, elem, log2_implicit = _element_spec(fmt)
    numpy_in = not isinstance(elements, torch.Tensor)
    out_dtype = torch_out_dtype(dtype)
    device = kernel_device()
    et = to_torch(elements, device)
    xt = to_torch(exps, device, np.uint8)
    check_size(et.numel())
    lay = axis_layout(tuple(et.shape), axis, int(block_size))
    expected = list(et.shape)
    expected[axis % et.dim()] = lay.nblocks
    if list(xt.shape) != expected:
        raise ValueError(f"scale exponents of shape {tuple(xt.shape)} do not match {tuple(expected)} for block {block_size}")
    out = torch.empty(et.shape, dtype=out_dtype, device=device)
    n = et.numel()
    if n:
        block = TUNING["elementwise_block"]
        _mx_dequantize_kernel[(triton.cdiv(n, block),)](
            et.view(torch.int8) if elem == 2 else et.view(torch.uint8), xt, bf16_bits(out), n,
            lay.length, lay.inner, lay.nblocks, lay.block,
            ELEM=elem, LOG2_IMPLICIT=log2_implicit, OUT_BF16=out_dtype == torch.bfloat16,
            MODE=3 if lay.inner == 1 and lay.length % lay.block == 0 else 2, NATIVE=not interpreting(),
            BLOCK=block, num_warps=TUNING["elementwise_warps"],
        )
    return to_numpy(out, dtype if not isinstance(dtype, torch.dtype) else np.float32) if numpy_in else out
