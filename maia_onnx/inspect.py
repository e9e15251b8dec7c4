"""Static model report: opset, I/O with symbolic dims, op histogram, parameters by dtype and FLOPs by op type.

FLOPs are ``maia_onnx.graph.costs.node_flops`` at the shapes ``maia_onnx.graph.shapes`` infers for the given dims.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any, Mapping

import onnx_ir as ir

from maia_onnx.graph.costs import ANY_DIM, node_flops_or_none
from maia_onnx.graph.shapes import bind_input_shapes, infer_shapes
from maia_onnx.io import load_model

DEFAULT_DIM = 1  # a symbolic dim nobody gave a value for counts as 1 (FLOPs are reported per that shape)


def _shape_repr(value: ir.Value) -> list:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else (str(d) if d is not None and str(d) != "None" else "?") for d in value.shape]


def _dtype_name(dtype) -> str:
    return dtype.name.lower() if dtype is not None else "unknown"


def concretize(model: ir.Model, dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """Fix every symbolic graph-input dim (from ``dims``; key "*" or DEFAULT_DIM for the rest) and re-infer
    all shapes in place. Returns the dim values used; initializer data is never loaded."""
    dims = dict(dims or {})
    binding = bind_input_shapes(model, overrides=dims, default=int(dims.get(ANY_DIM, DEFAULT_DIM)))
    infer_shapes(model, binding.shapes)
    return binding.symbols


def parameters_by_dtype(model: ir.Model) -> dict[str, dict[str, int]]:
    """dtype -> {count, bytes} over initializers (reads shapes only, never the data)."""
    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0, "tensors": 0})
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        entry = stats[_dtype_name(tensor.dtype)]
        entry["count"] += tensor.size
        entry["bytes"] += tensor.nbytes
        entry["tensors"] += 1
    return dict(sorted(stats.items()))


def inspect_model(model_or_path: ir.Model | str | os.PathLike, dims: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Everything `maia-onnx inspect` reports, as a JSON-able dict. FLOPs are for the given dims (default 1)."""
    path = None
    if isinstance(model_or_path, ir.Model):
        model = model_or_path
    else:
        path = str(model_or_path)
        model = load_model(model_or_path)
    opsets = dict(sorted(model.opset_imports.items()))
    init_names = set(model.graph.initializers)
    inputs = [{"name": v.name, "dtype": _dtype_name(v.dtype), "shape": _shape_repr(v)} for v in model.graph.inputs if v.name not in init_names]
    outputs = [{"name": v.name, "dtype": _dtype_name(v.dtype), "shape": _shape_repr(v)} for v in model.graph.outputs]
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph)
    params = parameters_by_dtype(model)
    metadata = dict(model.metadata_props)

    dims_used = concretize(model, dims)  # mutates shapes of our own loaded copy only
    flops_by_op: dict[str, int] = defaultdict(int)
    unknown: Counter = Counter()
    for node in model.graph:
        f = node_flops_or_none(node)
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if f is None:
            unknown[key] += 1
        elif f:
            flops_by_op[key] += int(f)  # every count of the convention is a whole number
    total_flops = sum(flops_by_op.values())
    return {
        "path": path,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "opset": opsets.get("", opsets.get("ai.onnx")),
        "opset_imports": opsets,
        "inputs": inputs,
        "outputs": outputs,
        "num_nodes": sum(ops.values()),
        "op_histogram": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": {
            "count": sum(p["count"] for p in params.values()),
            "bytes": sum(p["bytes"] for p in params.values()),
            "by_dtype": params,
        },
        "flops": {
            "total": total_flops,
            "dims": dims_used,
            "by_op": dict(sorted(flops_by_op.items(), key=lambda kv: (-kv[1], kv[0]))),
            "unknown_shape_nodes": dict(unknown),
        },
        "metadata": metadata,
    }
