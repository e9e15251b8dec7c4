"""PyTorch -> ONNX export: built-in models, module:factory, hf:DIR (decoders incl. MoE, encoders, ViT, encoder-decoders,
diffusers) and ultralytics: detectors, each checked numerically against PyTorch before it is published.

Submodules: core (one graph: export + parity), graph (clean-up), factory (module:factory contract), api (MODEL
reference dispatch), parts (multi-graph directories), seq2seq / diffusion / yolo (model families), extras (optional deps).
"""

from maia_onnx.export.api import export_builtin, export_model
from maia_onnx.export.parts import export_parts
from maia_onnx.export.core import (
    DEFAULT_OPSET,
    MIN_OPSET,
    REL_TOLERANCE,
    ExportResult,
    UnsupportedExportError,
    check_parity,
    export_spec,
    torch_outputs,
)
from maia_onnx.errors import MissingExtraError
from maia_onnx.extras import require
from maia_onnx.export.factory import load_factory, spec_from_factory_result
from maia_onnx.export.graph import (
    CONFIG_METADATA_KEY,
    SOURCE_METADATA_KEY,
    clean_exported_model,
    fold_weight_transposes,
    normalize_symbolic_dims,
    read_config,
    rename_linear_weights,
    strip_initializer_prefix,
    untranspose_gemm_weights,
)

__all__ = [
    "CONFIG_METADATA_KEY", "DEFAULT_OPSET", "MIN_OPSET", "REL_TOLERANCE", "SOURCE_METADATA_KEY", "ExportResult",
    "MissingExtraError", "UnsupportedExportError", "check_parity", "clean_exported_model", "export_builtin",
    "export_model", "export_parts", "export_spec", "fold_weight_transposes", "load_factory", "normalize_symbolic_dims",
    "read_config", "rename_linear_weights", "require", "spec_from_factory_result", "strip_initializer_prefix",
    "torch_outputs", "untranspose_gemm_weights",
]
