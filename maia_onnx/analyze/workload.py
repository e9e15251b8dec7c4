"""A model as the perf model sees it: shapes bound for one phase, one OpCost per node, the transformer structure.

Weights are never read: the model is loaded with onnx_ir (external data stays lazy, unread) and only
shapes and stored dtypes are used. FLOPs come from ``maia_onnx.graph.costs``, dims and shapes from
``maia_onnx.graph.shapes``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping

import onnx_ir as ir

from maia_onnx.errors import ModelLoadError
from maia_onnx.graph.costs import COLLECTIVE_OPS, node_flops, tensor_bytes, value_bytes, value_dims
from maia_onnx.graph.shapes import bind_input_shapes, graph_inputs, infer_shapes
from maia_onnx.io import load_model
from maia_onnx.runtime.perfmodel import OpCost, Workload

CONFIG_METADATA_KEY = "maia_onnx.config"  # written by maia_onnx.export (model hyper-parameters)

# stored dtype -> the compute-dtype name the device profiles use
_LABELS = {
    ir.DataType.FLOAT: "fp32", ir.DataType.DOUBLE: "fp64", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16",
    ir.DataType.INT8: "int8", ir.DataType.UINT8: "int8", ir.DataType.INT16: "int16", ir.DataType.UINT16: "int16",
    ir.DataType.INT32: "int32", ir.DataType.UINT32: "int32", ir.DataType.INT64: "int64", ir.DataType.UINT64: "int64",
    ir.DataType.BOOL: "bool",
}
for _name, _label in (("FLOAT8E4M3FN", "fp8"), ("FLOAT8E4M3FNUZ", "fp8"), ("FLOAT8E5M2", "fp8"), ("FLOAT8E5M2FNUZ", "fp8"),
                      ("FLOAT8E8M0", "e8m0"), ("FLOAT4E2M1", "fp4"), ("INT4", "int4"), ("UINT4", "int4"),
                      ("INT2", "int2"), ("UINT2", "int2")):
    if hasattr(ir.DataType, _name):
        _LABELS[getattr(ir.DataType, _name)] = _label
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

MATMUL_OPS = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "Conv", "ConvTranspose", "ConvInteger",
              "QLinearConv", "GemmFloat8", "Attention", "MultiHeadAttention", "GroupQueryAttention",
              "FusedMatMul", "MatMulNBits", "Einsum"}
VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Constant",
            "Dropout", "Optional", "OptionalGetElement"}
DATA_OPS = {"Transpose", "Concat", "Gather", "GatherElements", "GatherND", "Slice", "Expand", "Tile", "Pad",
            "Split", "ScatterND", "ScatterElements", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth",
            "Cast", "CastLike", "ConstantOfShape", "Range", "Trilu", "NonZero"}
# producers we look through to find the stored precision of a matmul operand
_DEQUANT_OPS = {"DequantizeLinear", "DynamicQuantizeLinear"}


def load_graph(path: str | Path) -> ir.Model:
    """The model with its weights left on disk (lazy external tensors: shapes and dtypes are all we need)."""
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory without manifest.json: pass an .onnx file or a partition directory")
    return load_model(path)


def dtype_label(dtype: ir.DataType | None) -> str:
    return _LABELS.get(dtype, "fp32")


def model_config(model: ir.Model) -> dict:
    text = model.metadata_props.get(CONFIG_METADATA_KEY)
    if not text:
        return {}
    try:
        cfg = json.loads(text)
    except ValueError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _bytes(value: ir.Value | None) -> float:
    size = value_bytes(value) if value is not None else None
    return size or 0.0


def _classify(op: str) -> str:
    if op in MATMUL_OPS:
        return "matmul"
    if op in COLLECTIVE_OPS:
        return "collective"
    if op in VIEW_OPS:
        return "view"
    if op in DATA_OPS:
        return "data"
    return "vector"


def _widest(dtypes: Iterable[str]) -> str:
    order = {"fp64": 9, "fp32": 8, "tf32": 7, "fp16": 6, "bf16": 6, "int32": 5, "fp8": 4, "int8": 4,
             "mx9": 4, "mx6": 3, "fp6": 3, "fp4": 2, "int4": 2, "int2": 1}
    present = [d for d in dtypes if d in order]
    return max(present, key=lambda d: order[d]) if present else "fp32"


def _stored_bytes(value: ir.Value) -> float:
    tensor = value.const_value
    if tensor is None:
        return _bytes(value)
    return tensor_bytes(tensor.dtype, list(tensor.shape.numpy()))


def graph_costs(model: ir.Model, compute_dtype: str | None = None) -> list[OpCost]:
    """One :class:`OpCost` per node, in graph (topological) order, from the shapes the model carries.

    Nodes whose inputs are all constants (weights, shape arithmetic) are "folded": a compiler does them
    offline. A matmul reading a folded value (e.g. DequantizeLinear of an FP8 weight) is charged the
    stored bytes of the initializers behind it and computes at the widest stored precision of its operands.
    """
    graph = model.graph
    inits = list(graph.initializers.values())
    init_bytes = {v.name: _stored_bytes(v) for v in inits}
    init_dtype = {v.name: dtype_label(v.const_value.dtype if v.const_value is not None else v.dtype) for v in inits}
    roots: dict[int, frozenset] = {id(v): frozenset([v.name]) for v in inits}  # const value -> initializers
    owned: set[str] = set()
    costs: list[OpCost] = []
    ops_since_pair = 0  # generic TP: count weight ops to mark every second one as ending a pair

    for index, node in enumerate(graph):
        name = node.name or f"{node.op_type}_{index}"
        inputs = [v for v in node.inputs if v is not None]
        const_inputs = [v for v in inputs if id(v) in roots]
        if node.op_type in ("Constant", "Shape") or (inputs and len(const_inputs) == len(inputs)):
            merged = frozenset().union(*(roots[id(v)] for v in const_inputs)) if const_inputs else frozenset()
            for out in node.outputs:
                roots[id(out)] = merged
            costs.append(OpCost(name, node.op_type, "folded"))
            continue
        kind = _classify(node.op_type)
        if kind == "view":
            costs.append(OpCost(name, node.op_type, "folded"))
            continue
        weight_inits: set[str] = set()
        for v in const_inputs:
            weight_inits |= roots[id(v)]
        param_bytes = 0.0
        for init in weight_inits:
            if init not in owned:
                owned.add(init)
                param_bytes += init_bytes[init]
        embedding = node.op_type == "Gather" and id(node.inputs[0]) in roots
        # an embedding lookup reads only the gathered rows
        weight_bytes = _bytes(node.outputs[0]) if embedding else sum(init_bytes[i] for i in weight_inits)
        act_in = sum(_bytes(v) for v in inputs if id(v) not in roots)
        act_out = sum(_bytes(v) for v in node.outputs)
        dtype = "fp32"
        if kind == "matmul":
            operand_dtypes = []
            for v in node.inputs[:2]:
                if v is None:
                    continue
                if id(v) in roots and roots[id(v)]:
                    operand_dtypes.append(init_dtype[max(roots[id(v)], key=lambda i: init_bytes[i])])
                    continue
                src = v.producer()
                if src is not None and src.op_type in _DEQUANT_OPS and src.inputs[0] is not None:
                    operand_dtypes.append(dtype_label(src.inputs[0].dtype))
                elif v.dtype is not None:
                    operand_dtypes.append(dtype_label(v.dtype))
            dtype = _widest(operand_dtypes)
            if compute_dtype and dtype in ("fp32", "fp16", "bf16", "fp64"):
                dtype = compute_dtype
        out_shape = value_dims(node.outputs[0]) if node.outputs else None
        cost = OpCost(name, node.op_type, kind, flops=node_flops(node), weight_bytes=weight_bytes,
                      act_bytes=act_in + act_out, compute_dtype=dtype, param_bytes=param_bytes,
                      out_shape=tuple(out_shape or ()))
        if kind == "matmul":
            cost.sharded = True
            if weight_inits:
                ops_since_pair += 1
                if ops_since_pair % 2 == 0:
                    cost.tp_allreduce_bytes = act_out
        elif embedding:
            cost.sharded = True  # vocab-parallel embedding
        if kind == "collective":
            group = node.attributes.get("group_size")
            cost.collective = node.op_type
            cost.group_size = int(group.value) if group is not None else 1
            cost.collective_bytes = act_out if node.op_type == "AllGather" else act_in
        costs.append(cost)
    return costs


# ---------------------------------------------------------------------------------------------- structure


def past_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in graph_inputs(model)
            if ("past" in v.name.lower() or "cache" in v.name.lower()) and v.shape is not None and len(v.shape) == 4]


def model_structure(model: ir.Model) -> dict:
    """layers / hidden / vocab / heads / kv_heads / head_dim: from export metadata, else from the graph."""
    cfg = model_config(model)
    keys = [v for v in past_inputs(model) if "key" in v.name.lower() or re.search(r"\.k$|_k$", v.name.lower())]
    info = {
        "layers": int(cfg.get("num_layers") or len(keys) or 0),
        "hidden": int(cfg.get("hidden_size") or 0),
        "vocab": int(cfg.get("vocab_size") or 0),
        "num_heads": int(cfg.get("num_heads") or 0),
        "kv_heads": int(cfg.get("num_kv_heads") or 0),
        "head_dim": int(cfg.get("head_dim") or 0),
    }
    key_shape = value_dims(keys[0]) if keys else None
    if key_shape:
        info["kv_heads"] = info["kv_heads"] or key_shape[1]
        info["head_dim"] = info["head_dim"] or key_shape[3]
    if not info["layers"]:
        return info
    graph = model.graph
    if graph.outputs and (not info["vocab"] or not info["hidden"]):
        first = graph.outputs[0]
        shape = value_dims(first)
        if shape:
            info["vocab"] = info["vocab"] or shape[-1]
        node = first.producer()
        while node is not None and node.op_type not in ("MatMul", "Gemm"):
            node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
        a_shape = value_dims(node.inputs[0]) if node is not None else None
        if a_shape:
            info["hidden"] = info["hidden"] or a_shape[-1]
    if not info["num_heads"]:
        for node in graph:
            shape = value_dims(node.outputs[0]) if node.op_type == "MatMul" else None
            if shape and len(shape) == 4:
                info["num_heads"] = shape[1]
                break
    return info


def _mark_megatron_sharding(ops: list[OpCost], hidden: int) -> None:
    """Transformer TP: everything between a column- and a row-parallel matmul is split across ranks
    (head-shaped attention tensors, intermediate-size MLP activations, vocab-parallel logits); only
    residual-stream ops ([..., hidden]: norms, residual adds) are replicated."""
    for op in ops:
        if op.kind in ("vector", "data") and op.out_shape:
            op.sharded = not (len(op.out_shape) <= 3 and op.out_shape[-1] == hidden)


def _bytes_per_elem(values: Iterable[ir.Value], default: float) -> float:
    for v in values:
        if value_dims(v) is not None:
            return (v.dtype.bitwidth if v.dtype is not None else 32) / 8.0
    return default


def build_workload(model: ir.Model, phase: str, batch: int, seq: int, past: int,
                   dims: Mapping[str, int] | None = None, compute_dtype: str | None = None) -> Workload:
    """Bind dims, infer shapes (in place, on ``model``) and cost every node for one phase."""
    binding = bind_input_shapes(model, batch=batch, seq=seq, past=past, overrides=dims)
    infer_shapes(model, binding.shapes)
    ops = graph_costs(model, compute_dtype)
    info = model_structure(model)
    pasts = past_inputs(model)
    if info["layers"] and info["hidden"]:
        _mark_megatron_sharding(ops, info["hidden"])
    outputs = model.graph.outputs
    float_outputs = [o for o in outputs if o.dtype in _FLOAT_TYPES]
    present = [o for o in outputs if "present" in o.name.lower() and value_dims(o) is not None]
    kv_values = present or [v for v in pasts if value_dims(v) is not None]
    return Workload(
        phase=phase, ops=ops, batch=batch, seq=seq, past=past,
        layers=info["layers"], hidden=info["hidden"], vocab=info["vocab"], num_heads=info["num_heads"],
        kv_heads=info["kv_heads"], head_dim=info["head_dim"],
        act_bytes_per_elem=_bytes_per_elem(float_outputs[:1], 4.0),
        kv_bytes_per_elem=_bytes_per_elem(pasts[:1], 4.0),
        weight_bytes=sum(_stored_bytes(v) for v in model.graph.initializers.values()),
        sharded_weight_bytes=sum(op.param_bytes for op in ops if op.sharded),
        kv_io_bytes=sum(_bytes(v) for v in kv_values),
    )
