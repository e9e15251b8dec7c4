"""`maia-onnx quantize` as data: a ``QuantizeConfig`` in, the format family's recipe of passes, a ``QuantizeReport`` out.

``config`` (options, validated once), ``recipes`` (format family -> passes), ``api`` (``quantize_model``:
load, calibrate, run, evaluate, save), ``report`` (the typed report and its JSON layout).  Format names
live in ``maia_onnx.formats.registry``.
"""

from maia_onnx.formats.registry import FORMAT_NAMES, FORMATS, KV_CACHE_FORMATS, FormatSpec, get_format
from maia_onnx.quantize.api import EVAL_MAX_BYTES, QuantizeResult, quantize_model
from maia_onnx.quantize.config import QuantizeConfig
from maia_onnx.quantize.report import QuantizeReport

__all__ = [
    "EVAL_MAX_BYTES",
    "FORMAT_NAMES",
    "FORMATS",
    "KV_CACHE_FORMATS",
    "FormatSpec",
    "QuantizeConfig",
    "QuantizeReport",
    "QuantizeResult",
    "get_format",
    "quantize_model",
]
