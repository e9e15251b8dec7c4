"""Shared helpers to run onnx_ir models in ONNX Runtime (bfloat16/float8 feeds and outputs included) and compare outputs.

Random feeds come from ``maia_onnx.inputs``; ``make_inputs`` and ``input_shape`` are re-exported here for the
callers that run what they synthesize.
"""

from __future__ import annotations

import os
from typing import Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx.external_data_helper import load_external_data_for_model

from maia_onnx.inputs import DEFAULT_DIM, input_shape, make_inputs

__all__ = ["DEFAULT_DIM", "compare", "compare_outputs", "input_shape", "make_inputs", "make_session", "ort_run",
           "run_model", "session_options", "to_ort_feed"]


def session_options(disable_optimizations: bool = True):
    so = ort.SessionOptions()
    if disable_optimizations:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return so


def make_session(model: ir.Model | str | os.PathLike, disable_optimizations: bool = True, sess_options=None):
    """An ORT CPU session for a model file or an in-memory onnx_ir model (weights stay where they are)."""
    so = sess_options or session_options(disable_optimizations)
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    proto = ir.to_proto(model)
    has_external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    if has_external:
        # ORT resolves external data relative to a path; add_external_initializers would copy, so save beside.
        base = next(
            v.const_value.base_dir for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)
        )
        load_external_data_for_model(proto, base)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_model(model, feeds: Mapping[str, np.ndarray], disable_optimizations: bool = True) -> dict[str, np.ndarray]:
    sess = make_session(model, disable_optimizations)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, ort_run(sess, names, feeds)))


def compare(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Max abs error, max error relative to the reference's max magnitude, and cosine similarity."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    act = np.asarray(actual, dtype=np.float64).ravel()
    if ref.shape != act.shape:
        raise ValueError(f"shape mismatch: {np.shape(reference)} vs {np.shape(actual)}")
    if ref.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    diff = np.abs(ref - act)
    max_abs = float(diff.max())
    scale = float(np.abs(ref).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    denom = float(np.linalg.norm(ref) * np.linalg.norm(act))
    cosine = float(ref @ act / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return {"max_abs": max_abs, "max_rel": max_rel, "cosine": cosine}


def compare_outputs(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {name: compare(reference[name], actual[name]) for name in reference if name in actual}


# ORT's Python binding has no NumPy type for bfloat16/float8: inputs go in as typed OrtValues over the same bytes,
# outputs come back as raw uint8/uint16 and are viewed as the ml_dtypes type again.
_ORT_TYPE_FOR_NAME = {"bfloat16": 16, "float8_e4m3fn": 17, "float8_e5m2": 19}
_NAME_FOR_ORT_STRING = {"tensor(bfloat16)": "bfloat16", "tensor(float8e4m3fn)": "float8_e4m3fn", "tensor(float8e5m2)": "float8_e5m2"}


def to_ort_feed(array):
    """A NumPy array ORT can take: ml_dtypes arrays become OrtValues of the matching ONNX type (no copy)."""
    onnx_type = _ORT_TYPE_FOR_NAME.get(getattr(getattr(array, "dtype", None), "name", ""))
    if onnx_type is None:
        return array
    arr = np.ascontiguousarray(array)
    bits = arr.view(np.uint16 if arr.dtype.itemsize == 2 else np.uint8)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_type)


def _narrow_outputs(session) -> dict[str, str]:
    """Output name -> ml_dtypes name for the session's bfloat16/float8 outputs (computed once per session)."""
    narrow = getattr(session, "_maia_narrow_outputs", None)
    if narrow is None:
        narrow = {o.name: _NAME_FOR_ORT_STRING[o.type] for o in session.get_outputs() if o.type in _NAME_FOR_ORT_STRING}
        session._maia_narrow_outputs = narrow
    return narrow


def ort_run(session, output_names, feeds: Mapping[str, np.ndarray], run_options=None) -> list[np.ndarray]:
    """``session.run`` that accepts and returns bfloat16/float8 arrays (as ml_dtypes)."""
    output_names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    results = session.run(output_names, {k: to_ort_feed(v) for k, v in feeds.items()}, run_options)
    narrow = _narrow_outputs(session)
    if not narrow:  # the common case: nothing to reinterpret
        return results
    out = []
    for name, value in zip(output_names, results):
        ml_name = narrow.get(name)
        if ml_name is not None and isinstance(value, np.ndarray) and value.dtype.kind == "u":
            value = value.view(getattr(ml_dtypes, ml_name))
        out.append(value)
    return out
