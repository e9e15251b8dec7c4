"""4-bit weights as stored: FP4 E2M1 codes with MXFP4 (E8M0, block 32) or NVFP4-style (FP8 E4M3 block 16 times
one FP32 tensor scale) block scales.

``Fp4Weight`` holds a tensor's E2M1 codes and scale codes in the packed layout of ``formats.packing``; its
``dequantize()`` is the reference every ONNX form (FLOAT4E2M1 + DequantizeLinear, or packed bytes decoded by
lookup tables) must equal bit for bit: ``value = E2M1(code) * scale`` with ``scale = 2^(e - 127)`` (MXFP4) or
``scale = E4M3(code) * tensor_scale`` (fp4-e4m3), both products in float32.

``quantize_fp4`` rounds to nearest (the numbers ``formats.gptq``'s quantizers produce); ``encode_fp4`` takes
values and scales chosen elsewhere (GPTQ) as given and refuses anything that is not exactly representable.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from maia_onnx.formats.fp8 import cast_fp8_saturate
from maia_onnx.formats.mx import E8M0_BIAS, E8M0_NAN, e8m0_to_float, floor_log2, mx_quantize, saturate_cast
from maia_onnx.formats.packing import E2M1_VALUES, BlockLayout, layout, pack_nibbles, unpack_nibbles

FP4_KINDS = {"mxfp4": 32, "fp4-e4m3": 16}  # kind -> default block size
E2M1_MAX = 6.0
E4M3_MAX = 448.0
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


@dataclass
class Fp4Weight:
    """One 4-bit weight: E2M1 codes ``[pre, blocks, block, post]`` and scale codes ``[pre, blocks, 1, post]``."""

    kind: str  # "mxfp4" | "fp4-e4m3"
    layout: BlockLayout
    codes: np.ndarray  # uint8 E2M1 codes (bit 3 = sign), zero in the padding
    scale_codes: np.ndarray  # uint8: biased E8M0 exponents (mxfp4) or FLOAT8E4M3FN bit patterns (fp4-e4m3)
    tensor_scale: np.float32 = np.float32(1.0)  # fp4-e4m3's FP32 per-tensor scale (1 for mxfp4)

    def block_scales(self) -> np.ndarray:
        """float32 ``[pre, blocks, 1, post]``: what each block's elements are multiplied by."""
        if self.kind == "mxfp4":
            return e8m0_to_float(self.scale_codes)
        return _E4M3_VALUES[self.scale_codes] * np.float32(self.tensor_scale)

    def dequantize(self) -> np.ndarray:
        return self.layout.from_blocked(E2M1_VALUES[self.codes] * self.block_scales())

    def packed(self) -> np.ndarray:
        """The codes two per byte in the layout's flattened order (what the ORT form stores)."""
        return pack_nibbles(self.codes)

    def elements(self) -> np.ndarray:
        """The codes as ``ml_dtypes.float4_e2m1fn`` in the tensor's own shape (the standard form's initializer)."""
        return self.layout.from_blocked(self.codes).view(ml_dtypes.float4_e2m1fn)

    def onnx_scale_codes(self) -> np.ndarray:
        """Scale codes in ONNX's blocked layout (the tensor's shape with the block axis cut to ``blocks``)."""
        return self.layout.scales_to_onnx(self.scale_codes)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed elements + one scale byte per block (+ 4 for the tensor scale)."""
        return self.packed().nbytes + self.scale_codes.nbytes + (4 if self.kind == "fp4-e4m3" else 0)


def _check_kind(kind: str) -> None:
    if kind not in FP4_KINDS:
        raise ValueError(f"unknown 4-bit format {kind!r}: choose one of {', '.join(FP4_KINDS)}")


def e2m1_codes(v: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even E2M1 codes of ``v`` (already divided by its scale), saturating at +-6."""
    return saturate_cast(v, ml_dtypes.float4_e2m1fn, E2M1_MAX).view(np.uint8)


def tensor_scale_e4m3(x: np.ndarray) -> np.float32:
    """fp4-e4m3's FP32 tensor scale: brings the block scales (amax / 6) into E4M3's range (<= 448)."""
    amax = float(np.max(np.abs(x))) if np.size(x) else 0.0
    return np.float32(amax / (E2M1_MAX * E4M3_MAX)) if amax > 0 else np.float32(1.0)


def quantize_fp4(x: np.ndarray, kind: str, axis: int, block_size: int | None = None,
                 tensor_scale: float | None = None) -> Fp4Weight:
    """Round-to-nearest 4-bit quantization of ``x`` in blocks along ``axis``."""
    _check_kind(kind)
    x = np.asarray(x, dtype=np.float32)
    lay = layout(x.shape, axis, block_size or FP4_KINDS[kind])
    if kind == "mxfp4":
        elems, exps = mx_quantize(x, "mxfp4", axis=lay.axis, block_size=lay.block)
        return Fp4Weight(kind, lay, lay.to_blocked(elems.view(np.uint8)), lay.scales_from_onnx(exps).astype(np.uint8))
    g = np.float32(tensor_scale_e4m3(x) if tensor_scale is None else tensor_scale)
    xb = lay.to_blocked(x)
    amax = np.max(np.abs(xb), axis=2, keepdims=True)
    # the same float32 steps as formats.gptq.fp4_e4m3_quantizer: E4M3(amax / (6 g)), then scale = E4M3 * g
    scale_codes = cast_fp8_saturate(amax / (6.0 * g), "e4m3fn").view(np.uint8)
    scale = _E4M3_VALUES[scale_codes] * g
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(scale > 0, xb / scale, np.float32(0.0))
    return Fp4Weight(kind, lay, e2m1_codes(v), scale_codes, g)


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
