"""Maia 100's mx9 / mx6 weights as stored: sign + magnitude elements, 1-bit micro-exponents, shared exponent bytes.

``smx_encode(x, mantissa_bits, axis)`` splits ``formats.mx.fake_quant_smx``'s numbers into their fields (blocks of
16 along ``axis``, sub-blocks of 2); ``SmxWeight.dequantize()`` rebuilds them bit for bit (signed zeros and NaN
blocks included): ``value = (+-M) * 2^(E - micro - (m - 1))`` with the biased shared exponent byte ``E + 127``
(255 marks a NaN block).  Packed bytes (``formats.packing`` layout): mx9 one sign+magnitude byte per element
(sign in bit 7); mx6 two 4-bit magnitudes per byte plus the signs eight per byte; micro-exponents eight per byte
for both; one shared-exponent byte per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maia_onnx.formats.mx import E8M0_BIAS, E8M0_NAN, SMX_BLOCK_SIZE, SMX_SUB_BLOCK
from maia_onnx.formats.packing import BlockLayout, layout, pack_bits, pack_nibbles

SMX_MANTISSA_BITS = {"mx9": 7, "mx6": 4}


@dataclass
class SmxWeight:
    """One mx9/mx6 weight: ``[pre, blocks, sub-blocks, 2, post]`` elements, per sub-block micro bits, per block exponents."""

    mantissa_bits: int
    layout: BlockLayout
    magnitudes: np.ndarray  # uint8 M in [0, 2^m - 1], [pre, blocks, nsub, 2, post]
    signs: np.ndarray  # bool, same shape
    micro: np.ndarray  # uint8 0/1, [pre, blocks, nsub, 1, post]
    shared: np.ndarray  # uint8 biased exponent (255: NaN block), [pre, blocks, 1, 1, post]

    def steps(self) -> np.ndarray:
        """float32 grid step of every sub-block: 2^(E - micro - (m - 1)), NaN in NaN blocks."""
        return step_table(self.mantissa_bits)[self.shared.astype(np.int32) * 2 + self.micro]

    def signed_magnitudes(self) -> np.ndarray:
        mag = self.magnitudes.astype(np.float32)
        return np.where(self.signs, -mag, mag)  # -0.0 where a negative value rounded to zero

    def dequantize(self) -> np.ndarray:
        out = self.signed_magnitudes() * self.steps()
        lay = self.layout
        return lay.from_blocked(out.reshape(lay.blocked_shape))

    # ------------------------------------------------------------------ packed bytes
    def packed_elements(self) -> np.ndarray:
        """mx9: sign-magnitude bytes; mx6: magnitudes two per byte (the signs are :meth:`packed_signs`)."""
        if self.mantissa_bits == 7:
            return (self.magnitudes | (self.signs.astype(np.uint8) << 7)).reshape(-1)
        return pack_nibbles(self.magnitudes)

    def packed_signs(self) -> np.ndarray:
        return pack_bits(self.signs)

    def packed_micro(self) -> np.ndarray:
        return pack_bits(self.micro)

    @property
    def nbytes(self) -> int:
        signs = self.packed_signs().nbytes if self.mantissa_bits != 7 else 0
        return self.packed_elements().nbytes + signs + self.packed_micro().nbytes + self.shared.nbytes


def step_table(mantissa_bits: int) -> np.ndarray:
    """``[512]`` float32 indexed by ``2 * shared_byte + micro``: the sub-block's grid step (NaN for byte 255)."""
    code = np.arange(512) // 2
    micro = np.arange(512) % 2
    with np.errstate(over="ignore"):
        table = np.ldexp(np.float32(1.0), code - E8M0_BIAS - micro - (mantissa_bits - 1)).astype(np.float32)
    table[code == E8M0_NAN] = np.nan
    return table


def sign_magnitude_table() -> np.ndarray:
    """mx9 byte (sign in bit 7, 7-bit magnitude) -> its signed float32 value (-0.0 for 0x80)."""
    b = np.arange(256)
    mag = (b & 0x7F).astype(np.float32)
    return np.where(b >= 0x80, -mag, mag).astype(np.float32)


def smx_encode(x: np.ndarray, mantissa_bits: int, axis: int = -1, block_size: int = SMX_BLOCK_SIZE) -> SmxWeight:
    """The stored fields of ``fake_quant_smx(x, mantissa_bits, axis, block_size)`` (same arithmetic, float32)."""
    if block_size % SMX_SUB_BLOCK:
        raise ValueError(f"block_size {block_size} must be a multiple of sub_block {SMX_SUB_BLOCK}")
    x = np.asarray(x, dtype=np.float32)
    lay = layout(x.shape, axis, block_size)
    nsub = block_size // SMX_SUB_BLOCK
    xs = lay.to_blocked(x).reshape(lay.pre, lay.blocks, nsub, SMX_SUB_BLOCK, lay.post)
    mag_in = np.abs(xs)
    with np.errstate(invalid="ignore"):
        sub_amax = np.max(mag_in, axis=3, keepdims=True)  # [pre, blocks, nsub, 1, post]
        block_amax = np.max(sub_amax, axis=2, keepdims=True)  # [pre, blocks, 1, 1, post]
    finite = np.isfinite(block_amax)
    _, e = np.frexp(np.where(finite & (block_amax > 0), block_amax, np.float32(1.0)))
    shared = np.clip(e.astype(np.int32) - 1, -E8M0_BIAS, E8M0_BIAS)
    shared = np.where(block_amax > 0, shared, 0)
    with np.errstate(invalid="ignore"):
        micro = (~(sub_amax >= np.ldexp(np.float32(1.0), shared))).astype(np.uint8)
    step = np.ldexp(np.float32(1.0), shared - micro - (mantissa_bits - 1)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        mag = np.minimum(np.rint(mag_in / step), np.float32(2**mantissa_bits - 1))
    mag = np.where(np.isfinite(mag), mag, 0).astype(np.uint8)
    codes = np.where(finite, shared + E8M0_BIAS, E8M0_NAN).astype(np.uint8)
    return SmxWeight(mantissa_bits, lay, mag, np.signbit(xs), micro, codes)
