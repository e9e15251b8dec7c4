"""FP8 (E4M3FN, E5M2) reference: fast saturating round-to-nearest-even quantize/dequantize with ONNX semantics.

Semantics follow ONNX ``QuantizeLinear``/``Cast(saturate=1)`` and ORT: ``q = saturate(RNE(x / scale))``;
values beyond the format's max (and +-Inf) become +-max, NaN stays NaN (sign kept), subnormals are exact.
A plain ``ml_dtypes`` ``astype`` turns out-of-range values into NaN and is slow, so the conversion here lets
the FPU do the rounding: with ``|x|`` clamped to the format max and ``E = max(exponent(|x|), emin)``, the
float32 sum ``2^(E + 23 - m) + |x|`` rounds ``|x|`` to nearest-even on the FP8 grid of binade ``E`` (m
mantissa bits; subnormals included, since ``E`` stops at emin); the sum's mantissa bits count FP8 steps
and its exponent gives the binade, so the FP8 code is the low byte of the sum plus the sum shifted right by
23 - m, minus a constant (integer steps: no float subnormal is ever produced, so flush-to-zero modes cannot
change the result).  About 10 SIMD ufunc passes over 4-byte lanes and 4 over bytes per cache-sized chunk, on
a small thread pool (numpy releases the GIL).  ``fp8_codes_reference`` is an
independent exact (float64 nearest-value search) implementation used to test it bit for bit.
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

_CHUNK = 1 << 18  # elements per inner step (1 MiB of fp32): few enough ufunc calls that 2 threads rarely wait on the GIL
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
def _decode_table(fmt_name: str) -> np.ndarray:
    fmt = get_fp8_format(fmt_name)
    return np.arange(256, dtype=np.uint8).view(fmt.np_dtype).astype(np.float32)


_local = threading.local()


class _Scratch:
    """Per-thread chunk buffers (and constant vectors: numpy's min/max against a scalar is not vectorized)."""

    def __init__(self, fmt: Fp8Format, n: int | None = None):
        n = n or _CHUNK
        self.abs_bits = np.empty(n, np.uint32)
        self.sum = np.empty(n, np.uint32)
        self.sign = np.empty(n, np.uint8)
        self.negative = np.empty(n, np.bool_)
        self.max_value = np.full(n, fmt.max, np.float32)
        self.min_normal_bits = np.full(n, 2.0 ** fmt.min_normal_exponent, np.float32).view(np.uint32)
        step_shift = 23 - fmt.mantissa_bits  # float32 exponent offset that makes one ulp one FP8 step
        self.step_bits = step_shift << 23
        self.step_shift = step_shift
        # code = steps + (E - emin) << m  ==  low byte of (sum + (sum >> step_shift)) - code_offset, see _codes_chunk
        self.code_offset = np.uint8(((127 + step_shift + fmt.min_normal_exponent) << fmt.mantissa_bits) & 0xFF)
        self.nan_code = fmt.nan_code


def _scratch(fmt: Fp8Format) -> _Scratch:
    cache = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    if fmt.name not in cache:
        cache[fmt.name] = _Scratch(fmt)
    return cache[fmt.name]


def _codes_chunk(values: np.ndarray, out: np.ndarray, fmt: Fp8Format) -> None:
    """FP8 codes of one chunk (<= _CHUNK) of float32 ``values`` into uint8 ``out`` (see module docstring).

    With ``a = min(|x|, max)``, ``base = 2^(E + 23 - m)`` (E = max(exponent(a), emin)) and
    ``sum = base + a`` rounded by the FPU: base has a zero mantissa and ``sum < 2 * base``, so the mantissa
    bits of ``sum`` are the FP8 steps above zero within binade E and ``sum >> (23 - m)`` is ``E' << m`` with
    E' = E + 127 + 23 - m.  The code is ``steps + ((E - emin) << m)``, which fits in 7 bits, so it is the low
    byte of ``sum + (sum >> (23 - m))`` minus a constant (mod 256; the exponent bits of ``sum`` sit above
    bit 7) -- no integer subtraction of the base; the offset and the sign are applied on bytes.
    """
    n = values.size
    sc = _scratch(fmt)
    u = values.view(np.uint32)
    a, total, sign = sc.abs_bits[:n], sc.sum[:n], sc.sign[:n]
    a_f, total_f = a.view(np.float32), total.view(np.float32)
    np.bitwise_and(u, 0x7FFFFFFF, out=a)
    has_nan = n and int(a.max()) > 0x7F800000  # a read-only reduction; the NaN mask is built only when needed
    np.minimum(a_f, sc.max_value[:n], out=a_f)  # saturate (+Inf too); NaN lanes are fixed below
    np.maximum(a, sc.min_normal_bits[:n], out=total)  # below emin the grid is the subnormal one
    np.bitwise_and(total, 0x7F800000, out=total)
    np.add(total, sc.step_bits, out=total)  # 2^(E + 23 - m): its ulp is the FP8 step of binade E
    with np.errstate(invalid="ignore", over="ignore"):
        np.add(total_f, a_f, out=total_f)  # the FPU rounds |x| to nearest-even here (integer steps: FTZ-proof)
    np.right_shift(total, sc.step_shift, out=a)
    np.add(a, total, out=a)
    np.copyto(out, a, casting="unsafe")  # the low byte
    np.subtract(out, sc.code_offset, out=out)
    if has_nan:
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        np.copyto(out, fmt.nan_code, where=nan)
    # the sign on bytes (a strided read of each float's top byte or a uint8 shift is ~5x slower than this)
    negative = sc.negative[:n]
    np.signbit(values, out=negative)  # -0.0 and -NaN included
    np.multiply(negative.view(np.uint8), np.uint8(0x80), out=sign)
    np.bitwise_or(out, sign, out=out)


_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    # inside one of our own workers run inline: waiting on the pool from the pool could deadlock
    if threading.current_thread().name.startswith("maia-fp8"):
        return 1
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
    flat = x.reshape(-1)
    flat_out = out.reshape(-1)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop, _CHUNK):
            j = min(i + _CHUNK, stop)
            _codes_chunk(flat[i:j], flat_out[i:j], fmt)

    _parallel_ranges(flat.size, work)
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

    def emit(start: int, values: np.ndarray) -> None:
        for i in range(0, values.size, _CHUNK):
            j = min(i + _CHUNK, values.size)
            _codes_chunk(values[i:j], flat_out[start + i : start + j], fmt)

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
    step = rows_per_chunk or max(1, (1 << 20) // row)
    if block_size and axis == 0:
        step = max(block_size, step // block_size * block_size)
    others = tuple(d for d in range(x.ndim) if d != axis) if axis is not None else None

    def reduce(r0: int) -> np.ndarray:
        # max and -min instead of abs().max(): no temporary, and fmax/fmin skip NaN
        chunk = np.asarray(x[r0 : r0 + step], dtype=np.float32)
        if axis is None:
            flat = chunk.reshape(-1)
            return np.float32(max(np.fmax.reduce(flat), -np.fmin.reduce(flat)))
        if block_size:
            starts = np.arange(0, chunk.shape[axis], block_size)
            return np.fmax(np.fmax.reduceat(chunk, starts, axis=axis), -np.fmin.reduceat(chunk, starts, axis=axis))
        return np.fmax(np.fmax.reduce(chunk, axis=others), -np.fmin.reduce(chunk, axis=others))

    starts_rows = list(range(0, x.shape[0], step))
    if x.size >= _PARALLEL_MIN and _threads() > 1 and len(starts_rows) > 1:
        parts = list(_get_pool().map(reduce, starts_rows))
    else:
        parts = [reduce(r0) for r0 in starts_rows]
    parts = [np.nan_to_num(np.asarray(p, np.float32), nan=0.0) for p in parts]
    if axis is None:
        return np.float32(max(float(p) for p in parts))
    if axis == 0:
        return np.concatenate(parts, axis=0).astype(np.float32)
    out = parts[0]
    for p in parts[1:]:
        if block_size:
            out = np.concatenate([out, p], axis=0)
        else:
            out = np.maximum(out, p)
    return out.astype(np.float32)
