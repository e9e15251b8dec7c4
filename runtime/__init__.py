"""Maia runtime: device profiles, capability, EPContext compile, emulator, sessions, executors, perf model.

Heavy names load lazily (``import maia_onnx.runtime`` stays light): ``InferenceSession`` (a real ONNX Runtime session
with the Maia plugin EP, or the Python shim ``EmulatorSession``), ``register`` / ``library_path`` / ``ep_devices`` /
``ep_session_options`` (the plugin EP, runtime/plugin_ep.py), ``session_options`` / ``to_ort_custom_op_model``
(onnxruntime-extensions bridge), ``compile_model``, ``get_capability``.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "InferenceSession": "maia_onnx.runtime.session",
    "EmulatorSession": "maia_onnx.runtime.session",
    "register": "maia_onnx.runtime.plugin_ep",
    "library_path": "maia_onnx.runtime.plugin_ep",
    "ep_devices": "maia_onnx.runtime.plugin_ep",
    "placement_report": "maia_onnx.runtime.session",
    "session_options": "maia_onnx.runtime.bridge",
    "to_ort_custom_op_model": "maia_onnx.runtime.bridge",
    "compile_model": "maia_onnx.runtime.compile",
    "get_capability": "maia_onnx.runtime.capability",
}


_RENAMED = {"ep_session_options": ("maia_onnx.runtime.plugin_ep", "session_options")}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'maia_onnx.runtime' has no attribute {name!r}")
