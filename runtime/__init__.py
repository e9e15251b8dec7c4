"""Maia runtime: device profiles, capability, EPContext compile, emulator, sessions, executors, perf model.

Heavy names load lazily (``import maia_onnx.runtime`` stays light): ``InferenceSession``, ``session_options``,
``to_ort_custom_op_model``, ``compile_model``, ``get_capability``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "InferenceSession": "maia_onnx.runtime.session",
    "placement_report": "maia_onnx.runtime.session",
    "session_options": "maia_onnx.runtime.bridge",
    "to_ort_custom_op_model": "maia_onnx.runtime.bridge",
    "compile_model": "maia_onnx.runtime.compile",
    "get_capability": "maia_onnx.runtime.capability",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maia_onnx.runtime' has no attribute {name!r}")
