"""The one registry of quantization format names: what ``--format fp8-e4m3`` (or ``mx9``, ``bf16`` ...) means.

Each name maps to a ``FormatSpec``: its family (which recipe builds its passes), element dtype, default
block size, scale kind and whether activations can be quantized too.  The NumPy element definitions it
points at live beside it (``formats.fp8.FP8_FORMATS``, ``formats.mx.MX_FORMATS``); the CLI's choices, the
Python API's validation, the MX and KV-cache passes all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from maia_onnx.errors import InvalidOptionError
from maia_onnx.formats.fp8 import Fp8Format, get_fp8_format
from maia_onnx.formats.mx import MX_BLOCK_SIZE, MX_FORMATS, SMX_BLOCK_SIZE, MxFormat

FAMILIES = ("fp8", "mx", "maia-mx", "fp4", "w4a8", "bf16")
MX_FORMS = ("ort", "standard")  # ONNX encodings of OCP MX and 4-bit weights (see passes/quantize_mx.py)
FOUR_BIT = ("mxfp4", "fp4-e4m3", "w4a8")  # packed 4-bit weights: what --rounding gptq applies to
ROUNDINGS = ("rtn", "gptq")  # how 4-bit weights are rounded: to nearest, or GPTQ from calibration Hessians


@dataclass(frozen=True)
class FormatSpec:
    """One quantization format: the facts every layer (CLI, recipes, passes) needs about it."""

    name: str
    family: str  # "fp8" | "mx" (OCP MX) | "maia-mx" (Maia mx9/mx6) | "fp4" | "w4a8" (4-bit weights, FP8 acts) | "bf16"
    element: str  # weight element: an Fp8Format / MxFormat name, "mx9"/"mx6", "fp4-e4m3" or "bfloat16"
    scale: str  # "float32" (fp8: per tensor/channel/block), "e8m0" (MX), "e4m3" (fp4-e4m3: E4M3 blocks x FP32 tensor),
    # "microexponent" (mx9/mx6), "none"
    block_size: int | None = None  # default elements per shared scale (None: not block-scaled)
    activations: bool = True  # activations can be quantized in this format too (mxfp4: weight-only)
    element_bits: int = 8

    @property
    def fp8(self) -> Fp8Format:
        """The FP8 element format (fp8 family), or the FP8 activation format of w4a8."""
        if self.family == "w4a8":
            return get_fp8_format("e4m3fn")
        if self.family != "fp8":
            raise InvalidOptionError(f"{self.name} is not an FP8 format")
        return get_fp8_format(self.element)

    @property
    def mx(self) -> MxFormat:
        """The OCP MX element format (mx family only)."""
        if self.family != "mx":
            raise InvalidOptionError(f"{self.name} is not an OCP MX format")
        return MX_FORMATS[self.element]

    @property
    def block_scaled(self) -> bool:
        return self.family in ("mx", "maia-mx", "fp4", "w4a8")

    @property
    def four_bit(self) -> bool:
        """Packed 4-bit weights (``weight_format`` names the element and scale layout)."""
        return self.name in FOUR_BIT

    @property
    def weight_format(self) -> str:
        """The format the weights are stored in (w4a8: its 4-bit weight format; others: the format itself)."""
        return self.element if self.family == "w4a8" else self.name

    @property
    def calibrated_activations(self) -> bool:
        """Activations get static FP8 scales from calibration (fp8 and w4a8)."""
        return self.family in ("fp8", "w4a8")


def _mx(name: str, activations: bool = True) -> FormatSpec:
    return FormatSpec(name, "mx", name, "e8m0", MX_BLOCK_SIZE, activations, MX_FORMATS[name].bits)


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("fp8-e4m3", "fp8", "e4m3fn", "float32"),
        FormatSpec("fp8-e5m2", "fp8", "e5m2", "float32"),
        _mx("mxfp8-e4m3"),
        _mx("mxfp8-e5m2"),
        _mx("mxint8"),
        _mx("mxfp4", activations=False),
        FormatSpec("fp4-e4m3", "fp4", "fp4-e4m3", "e4m3", 16, False, 4),
        FormatSpec("w4a8", "w4a8", "mxfp4", "e8m0", MX_BLOCK_SIZE, True, 4),
        FormatSpec("mx9", "maia-mx", "mx9", "microexponent", SMX_BLOCK_SIZE, True, 9),
        FormatSpec("mx6", "maia-mx", "mx6", "microexponent", SMX_BLOCK_SIZE, True, 6),
        FormatSpec("bf16", "bf16", "bfloat16", "none", element_bits=16),
    )
}
ALIASES = {"fp8-e4m3fn": "fp8-e4m3"}
FORMAT_NAMES = tuple(FORMATS)
KV_CACHE_FORMATS = tuple(n for n, s in FORMATS.items() if s.family == "fp8")


def get_format(name: str | FormatSpec, option: str = "--format") -> FormatSpec:
    """The spec of a format name (case-insensitive, aliases accepted); one-line error listing the valid names."""
    if isinstance(name, FormatSpec):
        return name
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise InvalidOptionError(f"{option} {name!r} is not one of {', '.join(FORMAT_NAMES)}")
    return FORMATS[key]


def formats_of(*families: str) -> tuple[str, ...]:
    """Format names of the given families, in registry order."""
    return tuple(n for n, s in FORMATS.items() if s.family in families)


def kv_cache_format(name: str | Fp8Format) -> Fp8Format:
    """The FP8 element format of a KV-cache format name (``fp8-e4m3`` / ``fp8-e5m2`` or an element name)."""
    try:
        return get_fp8_format(name)
    except ValueError:
        raise InvalidOptionError(f"--kv-cache {name!r} is not supported: use {' or '.join(KV_CACHE_FORMATS)}") from None
