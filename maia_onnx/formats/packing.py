"""Sub-byte packing of quantized weights and the lookup tables that decode them in an ONNX graph.

One layout for every packed weight: a tensor is viewed as ``[pre, L, post]`` with ``L`` its block axis, padded
with zero codes to ``Lp`` (whole blocks) and flattened row-major.  4-bit codes go two to a byte with the first
element in the low nibble (ONNX's FLOAT4E2M1 / INT4 packing); 1-bit fields (mx6 signs, mx9/mx6 micro-exponents)
go eight to a byte, first element in bit 0.  The tables turn a byte into the values it holds, so a graph decodes
with ``Gather(table, Cast(bytes, int32))``: exact, since every entry is the very float32 the NumPy reference
computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from maia_onnx.formats.mx import e8m0_to_float

E2M1_VALUES = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)  # code -> value


@dataclass(frozen=True)
class BlockLayout:
    """A tensor seen as ``[pre, length, post]`` blocked along ``length`` (``axis``) in blocks of ``block``."""

    shape: tuple[int, ...]
    axis: int
    block: int

    @property
    def pre(self) -> int:
        return int(np.prod(self.shape[: self.axis], dtype=np.int64))

    @property
    def length(self) -> int:
        return int(self.shape[self.axis])

    @property
    def post(self) -> int:
        return int(np.prod(self.shape[self.axis + 1:], dtype=np.int64))

    @property
    def blocks(self) -> int:
        return -(-self.length // self.block)

    @property
    def padded(self) -> int:
        return self.blocks * self.block

    @property
    def blocked_shape(self) -> tuple[int, int, int, int]:
        """``[pre, blocks, block, post]``: the elements; scales are ``[pre, blocks, 1, post]``."""
        return (self.pre, self.blocks, self.block, self.post)

    @property
    def scale_shape(self) -> tuple[int, int, int, int]:
        return (self.pre, self.blocks, 1, self.post)

    def to_blocked(self, x: np.ndarray) -> np.ndarray:
        """``x`` (of ``shape``) as ``[pre, blocks, block, post]``, zero-padded along the block axis."""
        x3 = np.asarray(x).reshape(self.pre, self.length, self.post)
        pad = self.padded - self.length
        if pad:
            x3 = np.pad(x3, ((0, 0), (0, pad), (0, 0)))
        return x3.reshape(self.blocked_shape)

    def from_blocked(self, xb: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_blocked` (drops the padding)."""
        x3 = np.asarray(xb).reshape(self.pre, self.padded, self.post)[:, : self.length]
        return x3.reshape(self.shape)

    def scales_to_onnx(self, scales: np.ndarray) -> np.ndarray:
        """``[pre, blocks, 1, post]`` scales in ONNX's blocked-quantization layout (shape with ``axis`` -> blocks)."""
        out = list(self.shape)
        out[self.axis] = self.blocks
        return np.asarray(scales).reshape(out)

    def scales_from_onnx(self, scales: np.ndarray) -> np.ndarray:
        return np.asarray(scales).reshape(self.scale_shape)


def layout(shape, axis: int, block: int) -> BlockLayout:
    shape = tuple(int(d) for d in shape)
    return BlockLayout(shape, axis % len(shape), int(block))


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (uint8 < 16, any shape) -> bytes, two per byte, first in the low nibble (odd count: zero pad)."""
    flat = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:count]


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """0/1 values (any shape) -> bytes, eight per byte, first in bit 0 (zero padded to whole bytes)."""
    return np.packbits(np.asarray(bits, dtype=bool).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, count: int) -> np.ndarray:
    return np.unpackbits(np.asarray(packed, dtype=np.uint8).reshape(-1), count=count, bitorder="little")


# ---------------------------------------------------------------------------------------------- decode tables
def nibble_pair_table(values: np.ndarray) -> np.ndarray:
    """``[256, 2]`` float32: byte -> (value of its low nibble, value of its high nibble), from 16 code values."""
    values = np.asarray(values, dtype=np.float32)
    b = np.arange(256)
    return np.stack([values[b & 0x0F], values[b >> 4]], axis=1).astype(np.float32)


def fp4_pair_table() -> np.ndarray:
    """Byte of two packed E2M1 codes -> their two float32 values."""
    return nibble_pair_table(E2M1_VALUES)


def magnitude_pair_table() -> np.ndarray:
    """Byte of two packed 4-bit magnitudes (mx6) -> the two magnitudes as float32."""
    return nibble_pair_table(np.arange(16, dtype=np.float32))


def bit_table(zero: float, one: float, dtype=np.float32) -> np.ndarray:
    """``[256, 8]``: byte -> its 8 bits (bit 0 first) mapped to ``zero`` / ``one``."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(bool)
    return np.where(bits, one, zero).astype(dtype)


def e8m0_table() -> np.ndarray:
    """Biased E8M0 exponent byte -> 2^(byte - 127) as float32 (255 -> NaN)."""
    return e8m0_to_float(np.arange(256, dtype=np.uint8))
