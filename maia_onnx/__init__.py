"""maia-onnx: offline PyTorch -> ONNX -> FP8/MX -> TP/PP -> Maia EPContext conversion toolchain.

The public Python API; heavy modules are imported lazily so `import maia_onnx` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it; each CLI verb is a thin layer over one of these
_LAZY = {
    "load_model": "maia_onnx.io",
    "save_model": "maia_onnx.io",
    "Pipeline": "maia_onnx.pipeline",
    "MaiaOnnxError": "maia_onnx.errors",
    "UserError": "maia_onnx.errors",
    "export_builtin": "maia_onnx.export",
    "export_model": "maia_onnx.export",
    "quantize_model": "maia_onnx.quantize",
    "QuantizeConfig": "maia_onnx.quantize",
    "partition_file": "maia_onnx.partition",
    "reshard_directory": "maia_onnx.partition",
    "compile_model": "maia_onnx.runtime.compile",
    "InferenceSession": "maia_onnx.runtime.session",
    "run_partition": "maia_onnx.runtime.executor",
    "run_path": "maia_onnx.run",
    "run_distributed": "maia_onnx.run",
    "make_inputs": "maia_onnx.inputs",
    "analyze_model": "maia_onnx.analyze",
    "run_batch": "maia_onnx.batch",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maia_onnx' has no attribute {name!r}")
