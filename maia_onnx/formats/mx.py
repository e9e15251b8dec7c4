"""NumPy reference for block-scaled formats: OCP MX (mxfp8, mxint8, mxfp4 with E8M0 scales) and Maia mx9/mx6.

OCP Microscaling Formats (MX) v1.0: a block of ``block_size`` (32) elements along one axis shares a
power-of-two scale ``X = 2^(floor(log2(amax)) - emax_elem)`` stored as E8M0 (biased exponent, bias 127,
0xFF = NaN).  Elements are ``x / X`` rounded to nearest-even in the element type and SATURATED to its
max (plain ``ml_dtypes`` casts would turn overflow into NaN/inf).

- ``mxfp8-e4m3``: FLOAT8E4M3FN elements, emax 8, max 448
- ``mxfp8-e5m2``: FLOAT8E5M2 elements, emax 15, max 57344
- ``mxint8``: INT8 elements with an implicit 2^-6 scale (value = int8 * 2^-6, emax 0); clamped to +-127
- ``mxfp4``: FLOAT4E2M1 elements (0, 0.5, 1, 1.5, 2, 3, 4, 6), emax 2

Blocks run along ``axis``; when its length is not a multiple of ``block_size`` the last block is
short (ONNX blocked-quantization layout: the scale has ``ceil(D / block_size)`` entries on ``axis``).

Maia 100's shared-microexponent formats (Rouhani et al., "Shared Microexponents", arXiv 2302.08007):
a block of 16 shares an 8-bit exponent ``E = floor(log2 amax)``; each sub-block of 2 carries a 1-bit
micro-exponent that lowers its exponent to ``E - 1`` when both its values are below ``2^E``; each
element is sign + m-bit magnitude (no implicit bit) at that exponent:
``value = sign * M * 2^(e_sub - (m - 1))``, ``M`` in ``[0, 2^m - 1]``.  MX9: m = 7 (9 bits/element
on average), MX6: m = 4 (6 bits/element).  We provide them as fake quant (quantise-dequantise).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

E8M0_BIAS = 127
E8M0_NAN = 255
MX_BLOCK_SIZE = 32
SMX_BLOCK_SIZE = 16
SMX_SUB_BLOCK = 2


@dataclass(frozen=True)
class MxFormat:
    """An OCP MX element type: its storage dtype, largest exponent and largest magnitude."""

    name: str
    element_dtype: type  # numpy / ml_dtypes dtype of the stored elements
    emax: int  # exponent of the largest normal element (scale = 2^(floor(log2 amax) - emax))
    max_value: float  # largest element magnitude (in element units: int8 is counted in units of 2^-6)
    bits: int
    implicit_scale: float = 1.0  # mxint8: element value = stored int * 2^-6
    onnx_elem: str = ""  # ONNX data type name of the element in the standard form

    @property
    def is_int(self) -> bool:
        return np.issubdtype(np.dtype(self.element_dtype), np.integer)


MX_FORMATS: dict[str, MxFormat] = {
    "mxfp8-e4m3": MxFormat("mxfp8-e4m3", ml_dtypes.float8_e4m3fn, 8, 448.0, 8, onnx_elem="FLOAT8E4M3FN"),
    "mxfp8-e5m2": MxFormat("mxfp8-e5m2", ml_dtypes.float8_e5m2, 15, 57344.0, 8, onnx_elem="FLOAT8E5M2"),
    "mxint8": MxFormat("mxint8", np.int8, 0, 127.0, 8, implicit_scale=2.0**-6, onnx_elem="INT8"),
    "mxfp4": MxFormat("mxfp4", ml_dtypes.float4_e2m1fn, 2, 6.0, 4, onnx_elem="FLOAT4E2M1"),
}


def mx_format(fmt: str | MxFormat) -> MxFormat:
    if isinstance(fmt, MxFormat):
        return fmt
    try:
        return MX_FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown MX format {fmt!r}; choose one of {', '.join(MX_FORMATS)}") from None


def _blocked(x: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, int]:
    """Move ``axis`` last, zero-pad it to a multiple of ``block_size`` and split it into blocks.

    Returns an array of shape ``[..., nblocks, block_size]`` (other axes first, in order) and the
    original length of ``axis``.
    """
    x = np.moveaxis(x, axis, -1)
    length = x.shape[-1]
    nblocks = -(-length // block_size)
    pad = nblocks * block_size - length
    if pad:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), dtype=x.dtype)], axis=-1)
    return x.reshape(x.shape[:-1] + (nblocks, block_size)), length


def _unblocked(xb: np.ndarray, axis: int, length: int) -> np.ndarray:
    x = xb.reshape(xb.shape[:-2] + (-1,))[..., :length]
    return np.moveaxis(x, -1, axis)


def floor_log2(amax: np.ndarray) -> np.ndarray:
    """Exact floor(log2(a)) for positive finite a (via frexp: a = m * 2^e with m in [0.5, 1))."""
    _, e = np.frexp(np.asarray(amax, dtype=np.float64))
    return e.astype(np.int64) - 1


def e8m0_to_float(exps: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Decode biased E8M0 exponents to floats (255 -> NaN). 2^-127 is a float32 subnormal, still exact."""
    exps = np.asarray(exps, dtype=np.uint8)
    out = np.ldexp(np.ones(exps.shape, dtype=np.float64), exps.astype(np.int64) - E8M0_BIAS)
    out[exps == E8M0_NAN] = np.nan
    return out.astype(dtype)


def e8m0_to_ml_dtypes(exps: np.ndarray) -> np.ndarray:
    """Reinterpret biased exponent bytes as ``ml_dtypes.float8_e8m0fnu`` (same bits)."""
    return np.asarray(exps, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)


def saturate_cast(v: np.ndarray, dtype, max_value: float) -> np.ndarray:
    """Round-to-nearest-even into ``dtype`` with saturation to +-max_value; NaN stays NaN."""
    return np.clip(np.asarray(v, dtype=np.float64), -max_value, max_value).astype(dtype)


def mx_shared_exponents(x: np.ndarray, fmt: str | MxFormat, axis: int = -1, block_size: int = MX_BLOCK_SIZE) -> np.ndarray:
    """Biased E8M0 shared exponents (uint8), shape of ``x`` with ``axis`` reduced to ceil(D/block)."""
    f = mx_format(fmt)
    x = np.asarray(x, dtype=np.float32)
    axis = axis % x.ndim
    xb, _ = _blocked(x, axis, block_size)
    return np.moveaxis(_exps_of_blocks(xb, f), -1, axis)


def _exps_of_blocks(xb: np.ndarray, f: MxFormat) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(xb), axis=-1)
    finite = np.isfinite(amax)
    positive = finite & (amax > 0)
    unbiased = np.full(amax.shape, -E8M0_BIAS, dtype=np.int64)  # all-zero block: smallest scale
    unbiased[positive] = floor_log2(amax[positive]) - f.emax
    exps = np.clip(unbiased, -E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS
    exps[~finite] = E8M0_NAN  # a NaN/Inf anywhere in the block makes the whole block NaN (OCP MX 6.3)
    return exps.astype(np.uint8)


def mx_quantize(
    x: np.ndarray, fmt: str | MxFormat, axis: int = -1, block_size: int = MX_BLOCK_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Quantise to an OCP MX format: ``(elements, scale_exponents)``.

    ``elements`` has the shape of ``x`` and the element dtype (float8_e4m3fn, float8_e5m2, int8,
    float4_e2m1fn); ``scale_exponents`` are biased E8M0 codes (uint8) with ``axis`` reduced to
    ``ceil(D / block_size)``.  Dequantised value = element * implicit_scale * 2^(exp - 127).
    """
    f = mx_format(fmt)
    x = np.asarray(x, dtype=np.float32)
    axis = axis % x.ndim
    xb, length = _blocked(x, axis, block_size)
    exps = _exps_of_blocks(xb, f)
    # Dividing by a power of two is exact in float32 (results stay below 2^(emax+1); anything that lands
    # in float32's subnormal range is far below the element's smallest step), so the only rounding is the
    # single saturating cast into the element type.
    inv_scale = np.ldexp(np.float32(1.0), (E8M0_BIAS - exps.astype(np.int32))).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = xb * inv_scale[..., None]
        if f.implicit_scale != 1.0:
            v *= np.float32(1.0 / f.implicit_scale)  # separately: 2^127 * 2^6 would overflow float32
    if f.is_int:
        v = np.where(np.isfinite(v), v, np.float32(0.0))  # int elements cannot hold NaN; the NaN scale carries it
        elems = np.clip(np.rint(v), -f.max_value, f.max_value).astype(f.element_dtype)
    elif f.element_dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        from maia_onnx.formats.fp8 import cast_fp8_saturate

        elems = cast_fp8_saturate(v, "e4m3fn" if f.element_dtype == ml_dtypes.float8_e4m3fn else "e5m2")
    else:
        elems = saturate_cast(v, f.element_dtype, f.max_value)
    return _unblocked(elems, axis, length), np.moveaxis(exps, -1, axis)


def mx_scale_float(exps: np.ndarray, fmt: str | MxFormat, dtype=np.float32) -> np.ndarray:
    """Float scales that DequantizeLinear multiplies the stored elements by (2^-6 folded in for mxint8)."""
    f = mx_format(fmt)
    return (e8m0_to_float(exps, np.float64) * f.implicit_scale).astype(dtype)


def mx_dequantize(
    elements: np.ndarray,
    exps: np.ndarray,
    fmt: str | MxFormat,
    axis: int = -1,
    block_size: int = MX_BLOCK_SIZE,
    dtype=np.float32,
) -> np.ndarray:
    """Inverse of :func:`mx_quantize`: element * implicit_scale * 2^(exp - 127), NaN where exp is 0xFF."""
    f = mx_format(fmt)
    elements = np.asarray(elements)
    axis = axis % elements.ndim
    eb, length = _blocked(elements.astype(np.float64), axis, block_size)
    scale = np.moveaxis(mx_scale_float(exps, f, np.float64), axis, -1)[..., None]
    return _unblocked(eb * scale, axis, length).astype(dtype)


def fake_quant_mx(x: np.ndarray, fmt: str | MxFormat, axis: int = -1, block_size: int = MX_BLOCK_SIZE) -> np.ndarray:
    """Quantise-dequantise through an OCP MX format (float32 out)."""
    elems, exps = mx_quantize(x, fmt, axis, block_size)
    return mx_dequantize(elems, exps, fmt, axis, block_size)


def fake_quant_smx(
    x: np.ndarray,
    mantissa_bits: int,
    axis: int = -1,
    block_size: int = SMX_BLOCK_SIZE,
    sub_block: int = SMX_SUB_BLOCK,
) -> np.ndarray:
    """Shared-microexponent fake quant (Maia mx9: mantissa_bits=7, mx6: 4), float32 out.

    Block exponent E = floor(log2 amax_block) (8 bits, clamped to [-127, 127]); each sub-block's
    1-bit micro-exponent selects E or E-1 (E-1 when the sub-block's amax < 2^E); magnitudes are
    rounded to nearest-even on the grid 2^(e_sub - (m-1)) and saturated at (2^m - 1) grid steps.
    NaN/Inf in a block make the whole block NaN.
    """
    if block_size % sub_block:
        raise ValueError(f"block_size {block_size} must be a multiple of sub_block {sub_block}")
    x = np.asarray(x, dtype=np.float32)
    axis = axis % x.ndim
    xb, length = _blocked(x, axis, block_size)
    xs = xb.reshape(xb.shape[:-1] + (block_size // sub_block, sub_block)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        block_amax = np.max(np.abs(xs), axis=(-2, -1))
        sub_amax = np.max(np.abs(xs), axis=-1)
    finite = np.isfinite(block_amax)
    positive = finite & (block_amax > 0)
    shared = np.zeros(block_amax.shape, dtype=np.int64)
    shared[positive] = floor_log2(block_amax[positive])
    shared = np.clip(shared, -E8M0_BIAS, E8M0_BIAS)[..., None]
    with np.errstate(invalid="ignore"):
        micro = (np.nan_to_num(sub_amax, nan=np.inf) < np.ldexp(1.0, shared)).astype(np.int64)
    step = np.ldexp(1.0, shared - micro - (mantissa_bits - 1))[..., None]
    max_mag = float(2**mantissa_bits - 1)
    with np.errstate(invalid="ignore"):
        mag = np.minimum(np.rint(np.abs(xs) / step), max_mag)
    out = np.sign(xs) * mag * step
    out[~finite] = np.nan
    out = out.reshape(xb.shape)
    return _unblocked(out, axis, length).astype(np.float32)


def fake_quant_mx9(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Maia 100 MX9 fake quant: block 16, sub-blocks of 2 with 1-bit micro-exponents, sign + 7-bit mantissa."""
    return fake_quant_smx(x, 7, axis)


def fake_quant_mx6(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Maia 100 MX6 fake quant: block 16, sub-blocks of 2 with 1-bit micro-exponents, sign + 4-bit mantissa."""
    return fake_quant_smx(x, 4, axis)


SMX_FORMATS = {"mx9": fake_quant_mx9, "mx6": fake_quant_mx6}
ALL_BLOCK_FORMATS = tuple(MX_FORMATS) + tuple(SMX_FORMATS)
