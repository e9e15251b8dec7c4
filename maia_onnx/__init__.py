"""maia-onnx: offline PyTorch -> ONNX -> FP8/MX -> TP/PP -> Maia EPContext conversion toolchain.

The public Python API; heavy modules are imported lazily so `import maia_onnx` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "maia_onnx.io",
    "save_model": "maia_onnx.io",
    "Pipeline": "maia_onnx.pipeline",
    "MaiaOnnxError": "maia_onnx.errors",
    "UserError": "maia_onnx.errors",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maia_onnx' has no attribute {name!r}")
