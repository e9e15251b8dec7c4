"""FP8 (E4M3FN, E5M2) reference: fast saturating round-to-nearest-even quantize/dequantize with ONNX semantics.

Semantics follow ONNX ``QuantizeLinear``/``Cast(saturate=1)`` and ORT: ``q = saturate(RNE(x / scale))``;
values beyond the format's max (and +-Inf) become +-max, NaN stays NaN (sign kept), subnormals are exact.
A plain ``ml_dtypes`` ``astype`` turns out-of-range values into NaN and is slow, so the conversion here is
a 64 Ki-entry lookup table on the top 16 bits of each float32 with the low 16 bits "jammed" into the
table index's lowest bit (sticky bit).  For both formats the rounding position is at float32 mantissa bit
>= 19, so bit 16 is always a sticky bit and OR-ing "any of bits 0..15 set" into it gives the exact RNE
result (ties included).  Chunks stay in cache and run on a small thread pool (numpy releases the GIL).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import ml_dtypes
import numpy as np

__all__ = [
    "Fp8Format",
    "FP8_E4M3FN",
    "FP8_E5M2",
    "FP8_FORMATS",
    "get_fp8_format",
    "fp8_codes_reference",
    "float32_to_fp8_codes",
    "cast_fp8_saturate",
    "quantize_fp8",
    "dequantize_fp8",
    "fp8_amax_scale",
    "expand_scale",
    "amax_along",
]


@dataclass(frozen=True)
class Fp8Format:
    """An FP8 format: name, ml_dtypes type, ONNX data type name, exponent/mantissa layout and max."""

    name: str
    np_dtype: type
    onnx_type: str  # onnx.TensorProto / onnx_ir.DataType member name
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float
    max_code: int  # bit pattern of +max
    nan_code: int  # bit pattern of +NaN

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_normal_exponent - self.mantissa_bits)

    @property
    def ir_dtype(self):
        import onnx_ir as ir

        return getattr(ir.DataType, self.onnx_type)


FP8_E4M3FN = Fp8Format("e4m3fn", ml_dtypes.float8_e4m3fn, "FLOAT8E4M3FN", 4, 3, 7, 448.0, 0x7E, 0x7F)
FP8_E5M2 = Fp8Format("e5m2", ml_dtypes.float8_e5m2, "FLOAT8E5M2", 5, 2, 15, 57344.0, 0x7B, 0x7F)
FP8_FORMATS = {"e4m3fn": FP8_E4M3FN, "e4m3": FP8_E4M3FN, "e5m2": FP8_E5M2}

_CHUNK = 1 << 16  # elements per inner step: the fp32 chunk (256 KiB) and its temporaries stay in L2
_PARALLEL_MIN = 1 << 20  # below this many elements threads cost more than they save


def get_fp8_format(fmt: str | Fp8Format) -> Fp8Format:
    if isinstance(fmt, Fp8Format):
        return fmt
    key = str(fmt).lower().replace("fp8-", "").replace("fp8_", "").replace("float8_", "").replace("float8", "")
    if key not in FP8_FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r}; expected one of e4m3fn, e5m2")
    return FP8_FORMATS[key]


# --------------------------------------------------------------------------------------------------
# Reference rounding (exact, slow): nearest representable value, ties to the even code, saturating.
# --------------------------------------------------------------------------------------------------
def _positive_values(fmt: Fp8Format) -> tuple[np.ndarray, np.ndarray]:
    """All finite non-negative values of the format (ascending) and their codes."""
    codes = np.arange(0, fmt.max_code + 1, dtype=np.uint8)
    values = codes.view(fmt.np_dtype).astype(np.float64)
    return values, codes


def fp8_codes_reference(x: np.ndarray, fmt: str | Fp8Format = "e4m3fn") -> np.ndarray:
    """Exact saturating RNE float -> FP8 bit patterns (uint8), computed in float64 by nearest-value search.

    Independent of the fast path; used to build its table and to test it.
    """
    fmt = get_fp8_format(fmt)
    with np.errstate(invalid="ignore"):  # signalling NaN payloads warn on widening
        x = np.asarray(x, dtype=np.float64)
    values, codes = _positive_values(fmt)
    mag = np.abs(x)
    sign = np.signbit(x)
    clipped = np.minimum(np.nan_to_num(mag, nan=0.0, posinf=fmt.max), fmt.max)
    hi = np.clip(np.searchsorted(values, clipped, side="left"), 0, values.size - 1)
    lo = np.clip(hi - 1, 0, values.size - 1)
    d_hi = values[hi] - clipped
    d_lo = clipped - values[lo]
    # choose the nearer neighbour; on an exact tie the even code (mantissa LSB 0)
    pick_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (codes[lo] % 2 == 0))
    out = np.where(pick_lo, codes[lo], codes[hi]).astype(np.uint8)
    out = np.where(np.isnan(mag), np.uint8(fmt.nan_code), out)
    return (out | (sign.astype(np.uint8) << 7)).astype(np.uint8)


@lru_cache(maxsize=None)
def _table(fmt_name: str) -> np.ndarray:
    """FP8 code for every float32 top-16-bit pattern (with bit 16 acting as the sticky bit)."""
    fmt = get_fp8_format(fmt_name)
    hi = np.arange(1 << 16, dtype=np.uint32)
    as_f32 = (hi << np.uint32(16)).view(np.float32)
    return fp8_codes_reference(as_f32, fmt)


@lru_cache(maxsize=None)
def _decode_table(fmt_name: str) -> np.ndarray:
    fmt = get_fp8_format(fmt_name)
    return np.arange(256, dtype=np.uint8).view(fmt.np_dtype).astype(np.float32)


_local = threading.local()


def _scratch(n: int) -> np.ndarray:
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < n:
        buf = _local.buf = np.empty(max(n, _CHUNK), dtype=np.intp)
    return buf[:n]


def _codes_chunk(u32: np.ndarray, out: np.ndarray, table: np.ndarray) -> None:
    """out[i] = table[(u >> 16) | (u & 0xFFFF != 0)] for one cache-sized chunk of float32 bits."""
    idx = _scratch(u32.size)
    # (u & 0xFFFF) + 0xFFFF has bit 16 set iff any low bit is set; OR it in, then keep the top 16 bits.
    np.bitwise_and(u32, 0xFFFF, out=idx, casting="unsafe")
    idx += 0xFFFF
    np.bitwise_or(idx, u32, out=idx, casting="unsafe")
    idx >>= 16
    np.take(table, idx, out=out, mode="clip")


_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    return max(1, min(int(os.environ.get("MAIA_ONNX_THREADS", os.cpu_count() or 1)), 16))


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="maia-fp8")
    return _pool


def _parallel_ranges(n: int, fn) -> None:
    """Run fn(start, stop) over [0, n) split into one contiguous range per thread."""
    workers = _threads()
    if n < _PARALLEL_MIN or workers == 1:
        fn(0, n)
        return
    step = -(-n // workers)
    step = -(-step // _CHUNK) * _CHUNK
    futures = [_get_pool().submit(fn, s, min(s + step, n)) for s in range(0, n, step)]
    for f in futures:
        f.result()


def float32_to_fp8_codes(x: np.ndarray, fmt: str | Fp8Format = "e4m3fn", out: np.ndarray | None = None) -> np.ndarray:
    """Saturating RNE conversion of a float32 array to FP8 bit patterns (uint8), same shape."""
    fmt = get_fp8_format(fmt)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty(x.shape, dtype=np.uint8)
    u = x.reshape(-1).view(np.uint32)
    flat_out = out.reshape(-1)
    table = _table(fmt.name)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop, _CHUNK):
            j = min(i + _CHUNK, stop)
            _codes_chunk(u[i:j], flat_out[i:j], table)

    _parallel_ranges(u.size, work)
    return out


def cast_fp8_saturate(x: np.ndarray, fmt: str | Fp8Format = "e4m3fn") -> np.ndarray:
    """``Cast(to=FLOAT8*, saturate=1)``: returns an ml_dtypes float8 array (1 byte per element)."""
    fmt = get_fp8_format(fmt)
    return float32_to_fp8_codes(np.asarray(x, dtype=np.float32), fmt).view(fmt.np_dtype)


# --------------------------------------------------------------------------------------------------
# Scales: per-tensor (scalar), per-axis (1-D along ``axis``) or blocked (x's shape with ``axis`` / block).
# --------------------------------------------------------------------------------------------------
def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-D tensor")
    return axis % ndim


def expand_scale(scale: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """Scale broadcastable to ``shape`` (materialized only for blocked scales)."""
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 0 or scale.size == 1 and axis is None:
        return scale.reshape(())
    ndim = len(shape)
    axis = _normalize_axis(0 if axis is None else axis, ndim)
    if block_size:
        rep = np.repeat(scale, block_size, axis=axis)
        return np.take(rep, np.arange(shape[axis]), axis=axis)
    view = [1] * ndim
    view[axis] = shape[axis]
    return scale.reshape(view)


def _check_scale(scale: np.ndarray, shape: tuple[int, ...], axis: int | None, block_size: int | None) -> None:
    if scale.ndim == 0 or (axis is None and scale.size == 1):
        return
    ndim = len(shape)
    axis = _normalize_axis(0 if axis is None else axis, ndim)
    if block_size:
        expected = list(shape)
        expected[axis] = -(-shape[axis] // block_size)
        if tuple(scale.shape) != tuple(expected):
            raise ValueError(f"blocked scale shape {scale.shape} does not match {tuple(expected)} for block_size {block_size}")
    elif scale.shape != (shape[axis],):
        raise ValueError(f"per-axis scale shape {scale.shape} does not match axis {axis} of shape {shape}")


def _chunk_plan(shape: tuple[int, ...], axis: int | None, block_size: int | None):
    """View the tensor as (pre, A, post) and yield contiguous (p0, p1, a0, a1) pieces of ~_CHUNK elements."""
    if axis is None or len(shape) == 0:
        n = int(np.prod(shape, dtype=np.int64))
        return (1, max(n, 1), 1), [(0, 1, a, min(a + _CHUNK, n)) for a in range(0, max(n, 1), _CHUNK)] if n else []
    axis = _normalize_axis(axis, len(shape))
    pre = int(np.prod(shape[:axis], dtype=np.int64))
    a_len = shape[axis]
    post = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    row = a_len * post
    pieces = []
    if row >= _CHUNK or pre == 1:
        a_step = max(1, _CHUNK // max(post, 1))
        if block_size:
            a_step = max(block_size, a_step // block_size * block_size)
        for p in range(pre):
            for a in range(0, a_len, a_step):
                pieces.append((p, p + 1, a, min(a + a_step, a_len)))
    else:
        p_step = max(1, _CHUNK // max(row, 1))
        for p in range(0, pre, p_step):
            pieces.append((p, min(p + p_step, pre), 0, a_len))
    return (pre, a_len, post), pieces


def _scaled_pieces(x: np.ndarray, scale: np.ndarray, axis, block_size, fn) -> None:
    """Call fn(flat_start, x_piece / scale_piece as contiguous float32) for every piece, in parallel."""
    (pre, a_len, post), pieces = _chunk_plan(x.shape, axis, block_size)
    x3 = x.reshape(pre, a_len, post)
    per_tensor = scale.ndim == 0 or (axis is None and scale.size == 1)
    if per_tensor:
        s_scalar = np.float32(scale.reshape(()))
    elif block_size:
        s3 = scale.reshape(pre, -1, post)
    else:
        s3 = scale.reshape(1, a_len, 1)

    def work(lo: int, hi: int) -> None:
        tmp = np.empty(_CHUNK * 2, dtype=np.float32)
        for p0, p1, a0, a1 in pieces[lo:hi]:
            piece = x3[p0:p1, a0:a1, :]
            if per_tensor:
                s = s_scalar
            elif block_size:
                b0 = a0 // block_size
                b1 = -(-a1 // block_size)
                s = np.repeat(s3[p0:p1, b0:b1, :], block_size, axis=1)[:, a0 - b0 * block_size : a1 - b0 * block_size, :]
            else:
                s = s3[:, a0:a1, :]
            if piece.size > tmp.size:
                tmp = np.empty(piece.size, dtype=np.float32)
            buf = tmp[: piece.size].reshape(piece.shape)
            np.divide(piece, s, out=buf)
            fn((p0 * a_len + a0) * post, buf.reshape(-1))

    n_pieces = len(pieces)
    total = x.size
    workers = _threads()
    if total < _PARALLEL_MIN or workers == 1 or n_pieces < 2:
        work(0, n_pieces)
        return
    step = -(-n_pieces // workers)
    futures = [_get_pool().submit(work, s, min(s + step, n_pieces)) for s in range(0, n_pieces, step)]
    for f in futures:
        f.result()


def quantize_fp8(
    x: np.ndarray,
    scale: np.ndarray | float,
    fmt: str | Fp8Format = "e4m3fn",
    axis: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """ONNX QuantizeLinear to FP8: ``saturate(RNE(x / scale))`` as an ml_dtypes float8 array.

    ``scale`` is a scalar (per-tensor), 1-D along ``axis`` (per-channel) or, with ``block_size``, x's shape
    with ``axis`` divided by ``block_size`` (rounded up), as in ONNX blocked quantization.
    """
    fmt = get_fp8_format(fmt)
    x = np.ascontiguousarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    if block_size is not None and axis is None:
        axis = 0 if x.ndim else None
    _check_scale(scale, x.shape, axis, block_size)
    out = np.empty(x.shape, dtype=np.uint8)
    flat_out = out.reshape(-1)
    table = _table(fmt.name)

    def emit(start: int, values: np.ndarray) -> None:
        u = values.view(np.uint32)
        for i in range(0, u.size, _CHUNK):
            j = min(i + _CHUNK, u.size)
            _codes_chunk(u[i:j], flat_out[start + i : start + j], table)

    _scaled_pieces(x, scale, axis, block_size, emit)
    return out.view(fmt.np_dtype)


def dequantize_fp8(
    q: np.ndarray,
    scale: np.ndarray | float,
    axis: int | None = None,
    block_size: int | None = None,
    dtype=np.float32,
    fmt: str | Fp8Format | None = None,
) -> np.ndarray:
    """ONNX DequantizeLinear from FP8: ``float(q) * scale`` (``q`` an ml_dtypes float8 array, or uint8 with ``fmt``)."""
    q = np.asarray(q)
    if fmt is None:
        fmt = FP8_E5M2 if q.dtype == np.dtype(ml_dtypes.float8_e5m2) else FP8_E4M3FN
        if q.dtype not in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
            raise ValueError(f"dequantize_fp8 needs a float8 array (or fmt= for uint8 codes), got {q.dtype}")
    fmt = get_fp8_format(fmt)
    scale = np.asarray(scale, dtype=np.float32)
    if block_size is not None and axis is None:
        axis = 0
    _check_scale(scale, q.shape, axis, block_size)
    values = np.take(_decode_table(fmt.name), q.view(np.uint8))
    values *= expand_scale(scale, q.shape, axis, block_size)
    return values.astype(dtype, copy=False)


def fp8_amax_scale(amax: np.ndarray | float, fmt: str | Fp8Format = "e4m3fn") -> np.ndarray:
    """Scale mapping ``amax`` onto the format's max (amax/448 or amax/57344); zero/invalid amax gives scale 1."""
    fmt = get_fp8_format(fmt)
    amax = np.asarray(amax, dtype=np.float64)
    scale = amax / fmt.max
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    # keep the scale a normal float32: a denormal scale would overflow x/scale to Inf
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    return scale.astype(np.float32)


def amax_along(x: np.ndarray, axis: int | None = None, block_size: int | None = None, rows_per_chunk: int | None = None) -> np.ndarray:
    """max|x| per tensor (axis None), per index of ``axis``, or per block of ``block_size`` along ``axis``.

    Streams over the leading dimension so a memory-mapped weight is never copied whole (NaN ignored).
    The result has the scale layout ``quantize_fp8`` expects.
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.size == 0:
        return np.float32(np.nanmax(np.abs(x))) if x.size else np.float32(0.0)
    if axis is not None:
        axis = _normalize_axis(axis, x.ndim)
    row = int(np.prod(x.shape[1:], dtype=np.int64)) or 1
    step = rows_per_chunk or max(1, (1 << 22) // row)
    if block_size and axis == 0:
        step = max(block_size, step // block_size * block_size)
    parts = []
    for r0 in range(0, x.shape[0], step):
        chunk = np.abs(np.asarray(x[r0 : r0 + step], dtype=np.float32))
        chunk = np.nan_to_num(chunk, nan=0.0, posinf=np.float32(np.finfo(np.float32).max))
        if axis is None:
            parts.append(chunk.max())
        elif block_size:
            starts = np.arange(0, chunk.shape[axis], block_size)
            parts.append(np.maximum.reduceat(chunk, starts, axis=axis))
        else:
            others = tuple(d for d in range(chunk.ndim) if d != axis)
            parts.append(chunk.max(axis=others))
    if axis is None:
        return np.float32(max(parts))
    if axis == 0:
        return np.concatenate(parts, axis=0).astype(np.float32)
    out = parts[0]
    for p in parts[1:]:
        if block_size:
            out = np.concatenate([out, p], axis=0)
        else:
            out = np.maximum(out, p)
    return out.astype(np.float32)
