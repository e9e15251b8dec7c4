"""The one NumPy reference for every number format (FP8, MX, mx9/mx6, BF16) and the registry of format names."""
from maia_onnx.formats.mx import fake_quant_mx, fake_quant_mx6, fake_quant_mx9, mx_dequantize, mx_quantize  # noqa: F401
from maia_onnx.formats.fp8 import (  # noqa: F401
    FP8_E4M3FN,
    FP8_E5M2,
    cast_fp8_saturate,
    dequantize_fp8,
    fp8_amax_scale,
    get_fp8_format,
    quantize_fp8,
)
from maia_onnx.formats.registry import FORMAT_NAMES, FORMATS, FormatSpec, get_format  # noqa: F401
