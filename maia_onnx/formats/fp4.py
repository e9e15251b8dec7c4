"""4-bit weights as stored: FP4 E2M1 codes with MXFP4 (E8M0, block 32) or NVFP4-style (FP8 E4M3 block 16 times
one FP32 tensor scale) block scales.

``Fp4Weight`` holds a tensor's E2M1 codes packed two per byte (the layout of ``formats.packing``, what the ORT
form stores) and its scale codes; ``codes`` unpacks them on demand.  Its ``dequantize()`` is the reference every
ONNX form (FLOAT4E2M1 + DequantizeLinear, or packed bytes decoded by lookup tables) must equal bit for bit:
``value = E2M1(code) * scale`` with ``scale = 2^(e - 127)`` (MXFP4) or ``scale = E4M3(code) * tensor_scale``
(fp4-e4m3), both products in float32.

``quantize_fp4`` rounds to nearest (the numbers ``formats.gptq``'s quantizers produce); ``encode_fp4`` takes
values and scales chosen elsewhere (GPTQ) as given and refuses anything that is not exactly representable.
``quantize_fp4`` and ``Fp4Weight.signal_noise`` walk the tensor in chunks of whole blocks (``CHUNK_ELEMENTS``),
so a multi-GB memory-mapped model is quantized with temporaries of one chunk, not of its largest tensor; a
read-only memory-mapped source (external data) has its pages given back as each chunk is done with them.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from maia_onnx.formats.fp8 import cast_fp8_saturate
from maia_onnx.formats.mx import E8M0_BIAS, E8M0_NAN, e8m0_to_float, floor_log2, mx_quantize, saturate_cast
from maia_onnx.formats.packing import E2M1_VALUES, BlockLayout, layout, pack_nibbles, unpack_nibbles

FP4_KINDS = {"mxfp4": 32, "fp4-e4m3": 16}  # kind -> default block size
E2M1_MAX = 6.0
E4M3_MAX = 448.0
CHUNK_ELEMENTS = 1 << 22  # elements per chunk: float32 temporaries of ~16 MB each
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


class Fp4Weight:
    """One 4-bit weight: E2M1 codes ``[pre, blocks, block, post]``, stored packed, and scale codes
    ``[pre, blocks, 1, post]``.

    ``Fp4Weight(kind, layout, codes, scale_codes, tensor_scale)`` takes the codes one per byte (uint8 < 16, zero in
    the padding) and packs them; ``from_packed`` takes the bytes as ``packed()`` returns them.
    """

    def __init__(self, kind: str, layout: BlockLayout, codes: np.ndarray, scale_codes: np.ndarray,
                 tensor_scale: np.float32 = np.float32(1.0)):
        self.kind = kind  # "mxfp4" | "fp4-e4m3"
        self.layout = layout
        self.scale_codes = scale_codes  # uint8: biased E8M0 exponents (mxfp4) or FLOAT8E4M3FN bit patterns (fp4-e4m3)
        self.tensor_scale = tensor_scale  # fp4-e4m3's FP32 per-tensor scale (1 for mxfp4)
        self.codes = codes

    @classmethod
    def from_packed(cls, kind: str, layout: BlockLayout, packed: np.ndarray, scale_codes: np.ndarray,
                    tensor_scale: np.float32 = np.float32(1.0)) -> Fp4Weight:
        weight = cls.__new__(cls)
        weight.kind, weight.layout, weight.scale_codes, weight.tensor_scale = kind, layout, scale_codes, tensor_scale
        packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
        if packed.size != -(-weight.count // 2):
            raise ValueError(f"{packed.size} packed bytes do not hold {weight.count} 4-bit codes")
        weight._packed = packed
        return weight

    @property
    def count(self) -> int:
        """Codes stored, padding included: ``pre * blocks * block * post``."""
        return int(np.prod(self.layout.blocked_shape, dtype=np.int64))

    @property
    def codes(self) -> np.ndarray:
        """uint8 E2M1 codes (bit 3 = sign) ``[pre, blocks, block, post]``, zero in the padding, unpacked per read."""
        return unpack_nibbles(self._packed, self.count).reshape(self.layout.blocked_shape)

    @codes.setter
    def codes(self, codes: np.ndarray) -> None:
        codes = np.asarray(codes, dtype=np.uint8)
        if codes.size != self.count:
            raise ValueError(f"{codes.size} codes for a {self.kind} weight of blocked shape "
                             f"{self.layout.blocked_shape}")
        self._packed = pack_nibbles(codes)

    def __repr__(self) -> str:
        return f"Fp4Weight({self.kind!r}, {self.layout!r}, tensor_scale={self.tensor_scale!r})"

    def block_scales(self) -> np.ndarray:
        """float32 ``[pre, blocks, 1, post]``: what each block's elements are multiplied by."""
        return self._block_scales(self.scale_codes)

    def _block_scales(self, scale_codes: np.ndarray) -> np.ndarray:
        if self.kind == "mxfp4":
            return e8m0_to_float(scale_codes)
        return _E4M3_VALUES[scale_codes] * np.float32(self.tensor_scale)

    def dequantize(self) -> np.ndarray:
        return self.layout.from_blocked(E2M1_VALUES[self.codes] * self.block_scales())

    def signal_noise(self, reference: np.ndarray, max_elements: int = CHUNK_ELEMENTS) -> tuple[float, float]:
        """``(sum reference^2, sum (reference - dequantize())^2)`` over the tensor's own elements, one chunk of
        dequantized values at a time (float32 dot products per chunk, like the other formats' SQNR)."""
        lay = self.layout
        x3 = np.asarray(reference, dtype=np.float32).reshape(lay.pre, lay.length, lay.post)
        pages = _MappedPages(x3)
        signal = noise = 0.0
        for p0, p1, b0, b1 in _chunks(lay, max_elements):
            start, n = _chunk_span(lay, p0, p1, b0, b1)
            codes = unpack_nibbles(_nibble_bytes(self._packed, start, n), n + start % 2)[start % 2:]
            approx = E2M1_VALUES[codes.reshape(p1 - p0, b1 - b0, lay.block, lay.post)]
            approx *= self._block_scales(self.scale_codes[p0:p1, b0:b1])
            ref = _source_part(x3, lay, p0, p1, b0, b1)
            d = ref - approx.reshape(p1 - p0, -1, lay.post)[:, : ref.shape[1]]
            r, d = ref.reshape(-1), d.reshape(-1)
            signal += float(np.dot(r, r))
            noise += float(np.dot(d, d))
            pages.drop(ref)
            del ref, r  # no view of a memory-mapped reference may outlive the call
        return signal, noise

    def packed(self) -> np.ndarray:
        """The codes two per byte in the layout's flattened order (what the ORT form stores)."""
        return self._packed

    def elements(self) -> np.ndarray:
        """The codes as ``ml_dtypes.float4_e2m1fn`` in the tensor's own shape (the standard form's initializer)."""
        return self.layout.from_blocked(self.codes).view(ml_dtypes.float4_e2m1fn)

    def onnx_scale_codes(self) -> np.ndarray:
        """Scale codes in ONNX's blocked layout (the tensor's shape with the block axis cut to ``blocks``)."""
        return self.layout.scales_to_onnx(self.scale_codes)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed elements + one scale byte per block (+ 4 for the tensor scale)."""
        return self._packed.nbytes + self.scale_codes.nbytes + (4 if self.kind == "fp4-e4m3" else 0)


def _check_kind(kind: str) -> None:
    if kind not in FP4_KINDS:
        raise ValueError(f"unknown 4-bit format {kind!r}: choose one of {', '.join(FP4_KINDS)}")


def _chunks(lay: BlockLayout, max_elements: int) -> Iterator[tuple[int, int, int, int]]:
    """``(p0, p1, b0, b1)``: pieces ``[p0:p1, b0:b1]`` of ``[pre, blocks]`` of about ``max_elements`` (at least one
    block) that run through the blocked tensor in its flat order: whole ``pre`` rows when one fits, else slices of
    one row's blocks."""
    unit = lay.block * lay.post
    row = lay.blocks * unit
    if not (lay.pre and row):  # an empty tensor: nothing to read or write
        return
    if row <= max_elements:
        step = max(1, max_elements // row)
        for p0 in range(0, lay.pre, step):
            yield p0, min(p0 + step, lay.pre), 0, lay.blocks
        return
    step = max(1, max_elements // unit)
    for p in range(lay.pre):
        for b0 in range(0, lay.blocks, step):
            yield p, p + 1, b0, min(b0 + step, lay.blocks)


def _chunk_span(lay: BlockLayout, p0: int, p1: int, b0: int, b1: int) -> tuple[int, int]:
    """Flat offset and element count of a chunk in the blocked layout."""
    unit = lay.block * lay.post
    return (p0 * lay.blocks + b0) * unit, (p1 - p0) * (b1 - b0) * unit


def _nibble_bytes(packed: np.ndarray, start: int, n: int) -> np.ndarray:
    """The bytes that hold codes ``[start, start + n)``."""
    return packed[start // 2 : (start + n + 1) // 2]


def _put_nibbles(packed: np.ndarray, start: int, codes: np.ndarray) -> None:
    """Write ``codes`` at flat code offset ``start`` into ``packed`` (zero-initialised; a chunk may start or end
    mid-byte when a block row holds an odd number of codes, so those bytes are OR-ed, not assigned)."""
    codes = codes.reshape(-1)
    if start % 2 and codes.size:
        packed[start // 2] |= codes[0] << 4
        codes, start = codes[1:], start + 1
    whole = codes.size - codes.size % 2
    packed[start // 2 : (start + whole) // 2] = codes[0:whole:2] | (codes[1:whole:2] << 4)
    if codes.size % 2:
        packed[(start + whole) // 2] |= codes[-1]


def _source_part(x3: np.ndarray, lay: BlockLayout, p0: int, p1: int, b0: int, b1: int) -> np.ndarray:
    """The elements of chunk ``[p0:p1, b0:b1]`` in ``x`` seen as ``[pre, length, post]`` (no padding)."""
    return x3[p0:p1, b0 * lay.block : min(b1 * lay.block, lay.length)]


def _as_blocks(part: np.ndarray, lay: BlockLayout) -> np.ndarray:
    """A ``_source_part`` as ``[p, b, block, post]``, zero-padded like ``lay.to_blocked``; a view when whole."""
    pad = -part.shape[1] % lay.block
    if pad:
        part = np.pad(part, ((0, 0), (0, pad), (0, 0)))
    return part.reshape(part.shape[0], part.shape[1] // lay.block, lay.block, lay.post)


class _MappedPages:
    """Gives back the pages of a read-only memory-mapped array (an ``onnx_ir.ExternalTensor``'s data) as each chunk
    is done with them, so reading a tensor chunk by chunk keeps about one chunk of its file resident instead of the
    whole tensor (a 262 MB lm_head).  The file is unchanged, so a later read faults the pages back in from the page
    cache.  Arrays that are not a read-only mapping are left alone: dropping their pages would lose data."""

    def __init__(self, x: np.ndarray):
        self.mapping = None
        base = x
        while isinstance(base, np.ndarray):
            base = base.base
        mapping = base.obj if isinstance(base, memoryview) else base
        if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or mapping.closed:
            return
        with memoryview(mapping) as view:
            if not view.readonly:  # ACCESS_COPY / ACCESS_WRITE: written pages must stay
                return
        first = np.frombuffer(mapping, np.uint8, count=1)
        self.start = first.ctypes.data
        del first  # a buffer export would keep the mapping from being closed
        self.mapping = mapping

    def drop(self, part: np.ndarray) -> None:
        """Drop the whole pages under ``part`` (C-contiguous slices only; partial pages stay for the neighbours)."""
        if self.mapping is None or self.mapping.closed or not part.flags.c_contiguous or not part.size:
            return
        lo = part.ctypes.data - self.start
        hi = lo + part.nbytes
        lo = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = hi // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            try:
                self.mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):  # only a hint: keep going with the pages resident
                pass


def e2m1_codes(v: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even E2M1 codes of ``v`` (already divided by its scale), saturating at +-6."""
    return saturate_cast(v, ml_dtypes.float4_e2m1fn, E2M1_MAX).view(np.uint8)


def tensor_scale_e4m3(x: np.ndarray, max_elements: int = CHUNK_ELEMENTS) -> np.float32:
    """fp4-e4m3's FP32 tensor scale: brings the block scales (amax / 6) into E4M3's range (<= 448)."""
    flat = np.ravel(x)
    if not flat.size:
        return np.float32(1.0)
    pages = _MappedPages(flat)
    maxima = []
    for i in range(0, flat.size, max_elements):
        part = flat[i : i + max_elements]
        maxima.append(np.max(np.abs(part)))
        pages.drop(part)
    del flat, part
    # the max of the chunk maxima: the same number (max is exact, NaN propagates) without a full |x| copy
    amax = float(np.max(maxima))
    return np.float32(amax / (E2M1_MAX * E4M3_MAX)) if amax > 0 else np.float32(1.0)


def quantize_fp4(x: np.ndarray, kind: str, axis: int, block_size: int | None = None,
                 tensor_scale: float | None = None, max_elements: int = CHUNK_ELEMENTS) -> Fp4Weight:
    """Round-to-nearest 4-bit quantization of ``x`` in blocks along ``axis``, ``max_elements`` at a time (each block
    is rounded on its own, so the chunking does not change a bit)."""
    _check_kind(kind)
    x = np.asarray(x, dtype=np.float32)
    lay = layout(x.shape, axis, block_size or FP4_KINDS[kind])
    x3 = x.reshape(lay.pre, lay.length, lay.post)
    pages = _MappedPages(x3)
    packed = np.zeros(-(-int(np.prod(lay.blocked_shape, dtype=np.int64)) // 2), np.uint8)
    scale_codes = np.empty(lay.scale_shape, np.uint8)
    g = np.float32(1.0)
    if kind == "fp4-e4m3":  # the tensor scale needs the whole tensor's amax before any block is rounded
        g = np.float32(tensor_scale_e4m3(x, max_elements) if tensor_scale is None else tensor_scale)
    for p0, p1, b0, b1 in _chunks(lay, max_elements):
        part = _source_part(x3, lay, p0, p1, b0, b1)
        xb = _as_blocks(part, lay)
        if kind == "mxfp4":
            elems, exps = mx_quantize(xb, "mxfp4", axis=2, block_size=lay.block)
            codes, scale_codes[p0:p1, b0:b1] = elems.view(np.uint8), exps
        else:
            amax = np.max(np.abs(xb), axis=2, keepdims=True)
            # the same float32 steps as formats.gptq.fp4_e4m3_quantizer: E4M3(amax / (6 g)), then scale = E4M3 * g
            sc = cast_fp8_saturate(amax / (6.0 * g), "e4m3fn").view(np.uint8)
            scale = _E4M3_VALUES[sc] * g
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(scale > 0, xb / scale, np.float32(0.0))
            codes, scale_codes[p0:p1, b0:b1] = e2m1_codes(v), sc
            del v
        _put_nibbles(packed, _chunk_span(lay, p0, p1, b0, b1)[0], codes)
        pages.drop(part)
        del part, xb, codes  # no view of a memory-mapped source may outlive the call
    del x3, x
    return Fp4Weight.from_packed(kind, lay, packed, scale_codes, g)


def encode_fp4(values: np.ndarray, scales: np.ndarray, kind: str, axis: int, block_size: int | None = None,
               tensor_scale: float = 1.0) -> Fp4Weight:
    """Store ``values`` (each an E2M1 value times its block's scale, e.g. GPTQ's output) with the given ``scales``
    (float32, ONNX blocked layout); raises ``ValueError`` unless the stored weight dequantizes to exactly ``values``."""
    _check_kind(kind)
    values = np.asarray(values, dtype=np.float32)
    lay = layout(values.shape, axis, block_size or FP4_KINDS[kind])
    scale = lay.scales_from_onnx(np.asarray(scales, dtype=np.float32))
    g = np.float32(tensor_scale)
    if kind == "mxfp4":
        positive = scale > 0
        codes = np.where(positive, floor_log2(np.where(positive, scale, 1.0)) + E8M0_BIAS, 0)
        scale_codes = np.where(np.isnan(scale), E8M0_NAN, np.clip(codes, 0, 254)).astype(np.uint8)
    else:
        scale_codes = cast_fp8_saturate(scale / g, "e4m3fn").view(np.uint8)
    weight = Fp4Weight(kind, lay, np.zeros(lay.blocked_shape, np.uint8), scale_codes, g)
    stored = weight.block_scales()
    if not np.array_equal(stored, scale, equal_nan=True):
        bad = int(np.sum(stored != scale))
        raise ValueError(f"{bad} {kind} block scale(s) are not representable (first {scale[stored != scale][0]!r})")
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(stored > 0, lay.to_blocked(values) / stored, np.float32(0.0))
    weight.codes = e2m1_codes(v)
    back = weight.dequantize()
    if not np.array_equal(back, values, equal_nan=True):
        bad = ~((back == values) | (np.isnan(back) & np.isnan(values)))
        raise ValueError(f"{int(bad.sum())} value(s) are not an E2M1 value times their block scale "
                         f"(first {values[bad][0]!r})")
    return weight


def dequantize_onnx_fp4(packed: np.ndarray, shape, scale: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """ONNX's blocked ``DequantizeLinear`` of a FLOAT4E2M1 tensor given as its packed bytes (row-major, low nibble
    first) with float32 ``scale`` in the blocked layout (``axis`` cut to ceil(D / block_size)): E2M1 * scale."""
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape, dtype=np.int64))
    values = E2M1_VALUES[unpack_nibbles(packed, count)].reshape(shape)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.size == 1 and not block_size:
        return values * scale.reshape(())
    lay = layout(shape, axis, block_size or shape[axis % len(shape)])
    return lay.from_blocked(lay.to_blocked(values) * lay.scales_from_onnx(scale))
