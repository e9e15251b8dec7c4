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

from maia_onnx.formats.fp8 import cast_fp8_saturate

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
    """Split ``axis`` into ``(nblocks, block_size)`` in place (zero-padding a short last block).

    Returns an array of shape ``shape[:axis] + (nblocks, block_size) + shape[axis+1:]`` -- a view when no
    padding is needed, so no transpose copies -- and the original length of ``axis``.  Reducing over
    ``axis + 1`` gives the ONNX blocked-scale layout directly.
    """
    length = x.shape[axis]
    nblocks = -(-length // block_size)
    pad = nblocks * block_size - length
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = np.pad(x, widths)
    return x.reshape(x.shape[:axis] + (nblocks, block_size) + x.shape[axis + 1 :]), length


def _unblocked(xb: np.ndarray, axis: int, length: int) -> np.ndarray:
    x = xb.reshape(xb.shape[:axis] + (-1,) + xb.shape[axis + 2 :])
    if x.shape[axis] != length:
        x = np.take(x, np.arange(length), axis=axis)
    return x


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
    v = np.asarray(v)
    # Clipping float32 in float32 gives the float64 formula's bits with one float32 temporary instead of two
    # float64 ones: the bound is exact in float32 and a float32 value needs no rounding to reach float64, so the
    # cast into dtype rounds the same number once either way.  Anything else (float64 input, a bound float32
    # cannot hold) keeps float64.
    exact = float(np.float32(max_value)) == max_value
    work = np.float32 if v.dtype == np.float32 and exact else np.float64
    bound = work(max_value)
    return np.clip(v.astype(work, copy=False), -bound, bound).astype(dtype)


def mx_shared_exponents(x: np.ndarray, fmt: str | MxFormat, axis: int = -1, block_size: int = MX_BLOCK_SIZE) -> np.ndarray:
    """Biased E8M0 shared exponents (uint8), shape of ``x`` with ``axis`` reduced to ceil(D/block)."""
    f = mx_format(fmt)
    x = np.asarray(x, dtype=np.float32)
    axis = axis % x.ndim
    xb, _ = _blocked(x, axis, block_size)
    return _exps_of_blocks(xb, f, axis + 1)


def _exps_of_blocks(xb: np.ndarray, f: MxFormat, in_block_axis: int) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(xb), axis=in_block_axis)
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
    exps = _exps_of_blocks(xb, f, axis + 1)
    # Dividing by a power of two is exact in float32 (results stay below 2^(emax+1); anything that lands
    # in float32's subnormal range is far below the element's smallest step), so the only rounding is the
    # single saturating cast into the element type.
    inv_scale = np.ldexp(np.float32(1.0), (E8M0_BIAS - exps.astype(np.int32))).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = xb * np.expand_dims(inv_scale, axis + 1)
        if f.implicit_scale != 1.0:
            v *= np.float32(1.0 / f.implicit_scale)  # separately: 2^127 * 2^6 would overflow float32
    if f.is_int:
        v = np.where(np.isfinite(v), v, np.float32(0.0))  # int elements cannot hold NaN; the NaN scale carries it
        elems = np.clip(np.rint(v), -f.max_value, f.max_value).astype(f.element_dtype)
    elif f.element_dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        elems = cast_fp8_saturate(v, "e4m3fn" if f.element_dtype == ml_dtypes.float8_e4m3fn else "e5m2")
    else:
        elems = saturate_cast(v, f.element_dtype, f.max_value)
    return _unblocked(elems, axis, length), exps


def mx_scale_float(exps: np.ndarray, fmt: str | MxFormat, dtype=np.float32) -> np.ndarray:
    """Float scales that DequantizeLinear multiplies the stored elements by (2^-6 folded in for mxint8)."""
    f = mx_format(fmt)
    return (e8m0_to_float(exps, np.float64) * f.implicit_scale).astype(dtype)


_DECODE_TABLES: dict[np.dtype, np.ndarray] = {}


def _elements_to_float32(elements: np.ndarray) -> np.ndarray:
    """Element values as float32; FP8/FP4 through a 256-entry table (ml_dtypes' astype is slow on big tensors)."""
    dt = elements.dtype
    if dt.itemsize == 1 and dt in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2), np.dtype(ml_dtypes.float4_e2m1fn)):
        if dt not in _DECODE_TABLES:
            codes = np.arange(256 if dt != np.dtype(ml_dtypes.float4_e2m1fn) else 16, dtype=np.uint8)
            table = np.zeros(256, np.float32)
            table[: codes.size] = codes.view(dt).astype(np.float32)
            _DECODE_TABLES[dt] = table
        return np.take(_DECODE_TABLES[dt], elements.view(np.uint8))
    return elements.astype(np.float32)


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
    # float32 is exact here: element (<= 8 significant bits) times a power of two stays in float32 range
    eb, length = _blocked(_elements_to_float32(elements), axis, block_size)
    scale = np.expand_dims(mx_scale_float(exps, f, np.float32), axis + 1)
    return _unblocked(eb * scale, axis, length).astype(dtype, copy=False)


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
    nsub = block_size // sub_block
    xs = xb.reshape(xb.shape[: axis + 1] + (nsub, sub_block) + xb.shape[axis + 2 :])
    # float32 throughout: every step is a power of two (>= 2^-134, a float32 subnormal at worst), so
    # |x| / step and M * step are exact and np.rint is the only rounding
    mag_in = np.abs(xs)
    with np.errstate(invalid="ignore"):
        sub_amax = np.max(mag_in, axis=axis + 2)  # shape[:axis] + (nblocks, nsub) + rest
        block_amax = np.max(sub_amax, axis=axis + 1)  # shape[:axis] + (nblocks,) + rest
    finite = np.isfinite(block_amax)
    _, e = np.frexp(np.where(finite & (block_amax > 0), block_amax, np.float32(1.0)))
    shared = np.clip(e.astype(np.int32) - 1, -E8M0_BIAS, E8M0_BIAS)
    shared = np.expand_dims(np.where(block_amax > 0, shared, 0), axis + 1)
    with np.errstate(invalid="ignore"):
        # micro-exponent 1 when the sub-block sits below 2^E (NaN sub-block: 1, the block is NaN anyway)
        micro = (~(sub_amax >= np.ldexp(np.float32(1.0), shared))).astype(np.int32)
    step = np.expand_dims(np.ldexp(np.float32(1.0), shared - micro - (mantissa_bits - 1)).astype(np.float32), axis + 2)
    with np.errstate(invalid="ignore", over="ignore"):
        mag = np.minimum(np.rint(mag_in / step), np.float32(2**mantissa_bits - 1))
        out = np.copysign(mag * step, xs)
    if not finite.all():
        out = np.where(np.expand_dims(finite, (axis + 1, axis + 2)), out, np.float32(np.nan))
    out = out.reshape(xb.shape)
    return _unblocked(out, axis, length).astype(np.float32, copy=False)


def fake_quant_mx9(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Maia 100 MX9 fake quant: block 16, sub-blocks of 2 with 1-bit micro-exponents, sign + 7-bit mantissa."""
    return fake_quant_smx(x, 7, axis)


def fake_quant_mx6(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Maia 100 MX6 fake quant: block 16, sub-blocks of 2 with 1-bit micro-exponents, sign + 4-bit mantissa."""
    return fake_quant_smx(x, 4, axis)


SMX_FORMATS = {"mx9": fake_quant_mx9, "mx6": fake_quant_mx6}
