"""Analyse a model or partition directory: per-op FLOPs/bytes/roofline and the TP x PP interconnect what-if.

Weights are never loaded: the model is read with ``load_external_data=False`` and only shapes and stored
dtypes are used, so a multi-GB model is analysed in seconds with little memory. Symbolic dims are bound to
the requested (batch, seq, past) and shapes inferred with ORT's symbolic shape inference (which resolves
Range/arange chains that plain ONNX inference leaves unknown), falling back to ONNX shape inference.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import onnx
from onnx import TensorProto

from maia_onnx.errors import InvalidOptionError, ModelLoadError, UnsupportedModelError
from maia_onnx.runtime.perfmodel import (
    OpCost,
    Workload,
    arithmetic_intensity,
    best_config,
    bubble_fraction,
    default_microbatches,
    estimate_rank,
    op_time,
    p2p_time,
    sweep,
)
from maia_onnx.runtime.profiles import DeviceProfile, InterconnectProfile, load_device, load_interconnect

CONFIG_METADATA_KEY = "maia_onnx.config"  # written by maia_onnx.export (model hyper-parameters)

# ONNX element type -> (compute-dtype name, bits per element)
_DTYPES = {
    TensorProto.FLOAT: ("fp32", 32), TensorProto.DOUBLE: ("fp64", 64), TensorProto.FLOAT16: ("fp16", 16),
    TensorProto.BFLOAT16: ("bf16", 16), TensorProto.INT8: ("int8", 8), TensorProto.UINT8: ("int8", 8),
    TensorProto.INT16: ("int16", 16), TensorProto.UINT16: ("int16", 16), TensorProto.INT32: ("int32", 32),
    TensorProto.UINT32: ("int32", 32), TensorProto.INT64: ("int64", 64), TensorProto.UINT64: ("int64", 64),
    TensorProto.BOOL: ("bool", 8),
}
for _name, _label, _bits in (
    ("FLOAT8E4M3FN", "fp8", 8), ("FLOAT8E4M3FNUZ", "fp8", 8), ("FLOAT8E5M2", "fp8", 8),
    ("FLOAT8E5M2FNUZ", "fp8", 8), ("FLOAT8E8M0", "e8m0", 8), ("FLOAT4E2M1", "fp4", 4),
    ("INT4", "int4", 4), ("UINT4", "int4", 4), ("INT2", "int2", 2), ("UINT2", "int2", 2),
):
    if hasattr(TensorProto, _name):
        _DTYPES[getattr(TensorProto, _name)] = (_label, _bits)

MATMUL_OPS = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "Conv", "ConvTranspose", "ConvInteger",
              "QLinearConv", "GemmFloat8", "Attention", "MultiHeadAttention", "GroupQueryAttention",
              "FusedMatMul", "MatMulNBits"}
VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Constant",
            "Dropout", "Optional", "OptionalGetElement"}
DATA_OPS = {"Transpose", "Concat", "Gather", "GatherElements", "GatherND", "Slice", "Expand", "Tile", "Pad",
            "Split", "ScatterND", "ScatterElements", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth",
            "Cast", "CastLike", "ConstantOfShape", "Range", "Trilu", "NonZero"}
COLLECTIVE_OPS = {"AllReduce", "AllGather", "AllToAll", "ReduceScatter"}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
              "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool"}
# FLOPs per output element for ops heavier than one arithmetic op (rough, they are memory-bound anyway)
_FLOPS_PER_ELEM = {"Softmax": 5, "LogSoftmax": 5, "LayerNormalization": 8, "RMSNormalization": 6,
                   "SimplifiedLayerNormalization": 6, "SkipLayerNormalization": 9, "InstanceNormalization": 8,
                   "GroupNormalization": 8, "BatchNormalization": 2, "Erf": 4, "Gelu": 8, "FastGelu": 8,
                   "Tanh": 4, "Sigmoid": 4, "Exp": 4, "Log": 4, "Sin": 4, "Cos": 4, "Sqrt": 2, "Pow": 2,
                   "HardSwish": 3, "Mish": 8, "Softplus": 4, "QuantizeLinear": 3, "DequantizeLinear": 2}
# producers we look through to find the stored precision of a matmul operand
_DEQUANT_OPS = {"DequantizeLinear", "DynamicQuantizeLinear"}
PHASES = ("prefill", "decode")
DEFAULT_TPS = (1, 2, 4, 8)
DEFAULT_PPS = (1, 2, 4)


# ---------------------------------------------------------------------------------------------- loading


def load_proto(path: str | Path) -> onnx.ModelProto:
    """The graph only: external weights are left on disk (shapes and dtypes are all we need)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path} (check the path)")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory without manifest.json: pass an .onnx file or a partition directory")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes): re-export or copy the model again")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises many types for garbage
        raise ModelLoadError(f"cannot parse {path} as an ONNX model ({type(exc).__name__}): is it truncated or not ONNX?") from exc
    from maia_onnx.io import check_opsets

    check_opsets({o.domain: o.version for o in proto.opset_import}, path)
    return proto


def _dtype(elem_type: int) -> tuple[str, int]:
    return _DTYPES.get(elem_type, ("fp32", 32))


def _nbytes(elem_type: int, shape: Sequence[int]) -> float:
    return math.prod(shape) * _dtype(elem_type)[1] / 8.0


def model_config(proto: onnx.ModelProto) -> dict:
    for prop in proto.metadata_props:
        if prop.key == CONFIG_METADATA_KEY:
            try:
                return json.loads(prop.value)
            except ValueError:
                return {}
    return {}


# ---------------------------------------------------------------------------------------------- dims

_ALIASES = {
    "batch": {"batch", "batch_size", "batchsize", "b", "n", "bs", "num_batches"},
    "seq": {"seq", "seq_len", "seqlen", "sequence", "sequence_length", "seq_length", "tokens", "num_tokens",
            "decoder_sequence_length", "encoder_sequence_length"},
    "past": {"past", "past_seq", "past_len", "past_seq_len", "past_sequence_length", "past_length",
             "cache_len", "cache_length", "past_decoder_sequence_length"},
    "total": {"total", "total_seq", "total_sequence_length", "total_length", "past+seq", "seq+past",
              "past_sequence_length+1", "attention_mask_len"},
}


def _alias(symbol: str) -> str | None:
    key = re.sub(r"\s+", "", symbol.lower())
    for role, names in _ALIASES.items():
        if key in names:
            return role
    if "+" in key:
        terms = set(key.split("+"))
        if any(t in _ALIASES["past"] for t in terms) and any(t in _ALIASES["seq"] for t in terms):
            return "total"
    return None


def _structural_roles(name: str, elem_type: int, rank: int) -> list[str | None]:
    """What each dim of a graph input most likely means, from its name and rank."""
    lname = name.lower()
    roles: list[str | None] = [None] * rank
    if rank == 0:
        return roles
    roles[0] = "batch"
    if ("past" in lname or "cache" in lname) and rank >= 3:
        roles[2 if rank == 4 else 1] = "past"
    elif "mask" in lname and rank >= 2:
        roles[-1] = "total"
        if rank == 4:
            roles[2] = "seq"
    elif rank >= 2 and elem_type in (TensorProto.INT64, TensorProto.INT32):
        roles[1] = "seq"
    elif rank == 3:  # [batch, seq, hidden] activations (e.g. a later pipeline stage)
        roles[1] = "seq"
    return roles


def bind_dims(proto: onnx.ModelProto, batch: int, seq: int, past: int, overrides: dict[str, int] | None = None) -> dict[str, dict]:
    """Concrete shapes for every graph input: ``{input name: {"elem_type": int, "shape": [int,...]}}``."""
    role_value = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
    overrides = dict(overrides or {})
    symbols: dict[str, int] = dict(overrides)
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    # pass 1: names we recognise; pass 2: position-based guesses for the rest
    for value in inputs:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param not in symbols:
                role = _alias(dim.dim_param)
                if role:
                    symbols[dim.dim_param] = role_value[role]
    result = {}
    for value in inputs:
        ttype = value.type.tensor_type
        dims = list(ttype.shape.dim)
        roles = _structural_roles(value.name, ttype.elem_type, len(dims))
        shape = []
        for i, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
                continue
            symbol = dim.dim_param or f"{value.name}[{i}]"
            if symbol not in symbols:
                if roles[i] is None:
                    raise InvalidOptionError(
                        f"cannot tell what dim {i} ({symbol!r}) of input {value.name!r} means: "
                        f"pass --dim {symbol}=N"
                    )
                symbols[symbol] = role_value[roles[i]]
            shape.append(symbols[symbol])
        result[value.name] = {"elem_type": ttype.elem_type, "shape": shape}
    return result


# ---------------------------------------------------------------------------------------------- shapes


def _stand_in_collectives(graph: onnx.GraphProto) -> None:
    """Replace collectives by shape-equivalent standard ops so shape inference can see through them."""
    for node in graph.node:
        if node.op_type not in COLLECTIVE_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        group = int(attrs.get("group_size", 1))
        if node.op_type == "AllGather":
            axis = int(attrs.get("axis", 0))
            inputs = [node.input[0]] * max(group, 1)
            del node.input[:]
            node.input.extend(inputs)
            node.op_type, node.domain = "Concat", ""
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axis", axis))
        else:  # AllReduce (and friends keep their input shape as far as we model them)
            del node.input[1:]
            node.op_type, node.domain = "Identity", ""
            del node.attribute[:]


def infer_types(proto: onnx.ModelProto, input_shapes: dict[str, dict]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``{tensor name: (elem_type, shape)}`` for every tensor whose shape could be made concrete."""
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    # keep graph + opsets only: initializer payloads are absent anyway (not loaded)
    graph = work.graph
    for value in graph.input:
        if value.name in input_shapes:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for d in input_shapes[value.name]["shape"]:
                shape.dim.add().dim_value = int(d)
    del graph.value_info[:]
    for out in graph.output:
        out.type.tensor_type.ClearField("shape")
    _stand_in_collectives(graph)
    inferred = None
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(work, auto_merge=True, guess_output_rank=True)
    except Exception:  # unsupported op in ORT's inference: plain ONNX inference below
        inferred = None
    if inferred is None:
        try:
            inferred = onnx.shape_inference.infer_shapes(work, strict_mode=False, data_prop=True)
        except Exception as exc:
            raise UnsupportedModelError(f"shape inference failed on this model ({exc}); pass a model ONNX can check") from exc
    types: dict[str, tuple[int, tuple[int, ...]]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if all(isinstance(d, int) for d in dims):
            types[vi.name] = (tt.elem_type, tuple(dims))
    for t in proto.graph.initializer:
        types[t.name] = (t.data_type, tuple(t.dims))
    return types


# ---------------------------------------------------------------------------------------------- costs


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> float:
    """FLOPs (multiply-add = 2) of one node given concrete shapes; 0 for data movement."""
    op = node.op_type
    ins = [shapes.get(n) if n else None for n in node.input]
    outs = [shapes.get(n) for n in node.output]
    out = outs[0] if outs else None
    if op in VIEW_OPS or op in DATA_OPS or op in COLLECTIVE_OPS or out is None:
        return 0.0
    n_out = math.prod(out)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a = ins[0] if op != "QLinearMatMul" else ins[0]
        if a is None:
            return 0.0
        return 2.0 * n_out * a[-1]
    if op in ("Gemm", "GemmFloat8"):
        a = ins[0]
        if a is None:
            return 0.0
        k = a[0] if _attrs(node).get("transA", 0) else a[-1]
        bias = n_out if len(node.input) > 2 and node.input[2] else 0
        return 2.0 * n_out * k + bias
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = ins[3] if op == "QLinearConv" else ins[1]
        if w is None:
            return 0.0
        bias = n_out if op == "Conv" and len(node.input) > 2 and node.input[2] else 0
        return 2.0 * n_out * math.prod(w[1:]) + bias
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        if x is None or w is None:
            return 0.0
        return 2.0 * math.prod(x) * math.prod(w[1:])
    if op in ("Attention", "MultiHeadAttention", "GroupQueryAttention"):
        return _attention_flops(node, ins, out)
    if op in REDUCE_OPS:
        return float(math.prod(ins[0])) if ins and ins[0] is not None else float(n_out)
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = _attrs(node).get("kernel_shape", [1])
        return float(n_out * math.prod(kernel))
    return float(n_out * _FLOPS_PER_ELEM.get(op, 1))


def _attention_flops(node, ins, out) -> float:
    """QK^T and PV (2*B*H*S*T*D each) plus ~5 flops per score for the softmax."""
    q = ins[0]
    if q is None:
        return 0.0
    attrs = _attrs(node)
    if len(q) == 4:  # [B, H, S, D]
        b, h, s, d = q
    else:
        h = int(attrs.get("num_heads") or attrs.get("q_num_heads") or 1)
        b, s, hd = q
        d = hd // h
    # total key length: explicit key input, else past + current for GQA
    t = s
    key = ins[1] if len(ins) > 1 else None
    if key is not None and len(key) == 4:
        t = key[2]
    elif key is not None and len(key) == 3:
        t = key[1]
    if node.op_type == "GroupQueryAttention" and len(ins) > 3 and ins[3] is not None and len(ins[3]) == 4:
        t = ins[3][2] + s
    dv = out[-1] // h if len(out) == 3 else out[-1]
    return 2.0 * b * h * s * t * d + 2.0 * b * h * s * t * dv + 5.0 * b * h * s * t


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


def graph_costs(proto: onnx.ModelProto, types: dict[str, tuple[int, tuple[int, ...]]], compute_dtype: str | None = None) -> list[OpCost]:
    """One :class:`OpCost` per node, in graph (topological) order.

    Nodes whose inputs are all constants (weights, shape arithmetic) are "folded": a compiler does them
    offline. A matmul reading a folded value (e.g. DequantizeLinear of an FP8 weight) is charged the
    stored bytes of the initializers behind it and computes at the widest stored precision of its operands.
    """
    graph = proto.graph
    init_bytes = {t.name: _nbytes(t.data_type, t.dims) for t in graph.initializer}
    init_dtype = {t.name: _dtype(t.data_type)[0] for t in graph.initializer}
    roots: dict[str, frozenset] = {name: frozenset([name]) for name in init_bytes}  # const value -> initializers
    producer: dict[str, onnx.NodeProto] = {}
    owned: set[str] = set()
    shapes = {k: v[1] for k, v in types.items()}
    costs: list[OpCost] = []
    ops_since_pair = 0  # generic TP: count weight ops to mark every second one as ending a pair

    for index, node in enumerate(graph.node):
        for out in node.output:
            producer[out] = node
        name = node.name or f"{node.op_type}_{index}"
        inputs = [n for n in node.input if n]
        const_inputs = [n for n in inputs if n in roots]
        if node.op_type == "Constant" or node.op_type == "Shape" or (inputs and len(const_inputs) == len(inputs)):
            merged = frozenset().union(*(roots[n] for n in const_inputs)) if const_inputs else frozenset()
            for out in node.output:
                roots[out] = merged
            costs.append(OpCost(name, node.op_type, "folded"))
            continue
        kind = _classify(node.op_type)
        if kind == "view":
            costs.append(OpCost(name, node.op_type, "folded"))
            continue

        def tensor_bytes(n: str) -> float:
            if n in types:
                return _nbytes(*types[n])
            return 0.0

        weight_bytes, param_bytes = 0.0, 0.0
        weight_inits: set[str] = set()
        for n in const_inputs:
            weight_inits |= roots[n]
        for init in weight_inits:
            if init not in owned:
                owned.add(init)
                param_bytes += init_bytes[init]
        if node.op_type == "Gather" and node.input[0] in roots:
            # an embedding lookup reads only the gathered rows
            weight_bytes = tensor_bytes(node.output[0])
        else:
            weight_bytes = sum(init_bytes[i] for i in weight_inits)
        act_in = sum(tensor_bytes(n) for n in inputs if n not in roots)
        act_out = sum(tensor_bytes(n) for n in node.output if n)
        flops = node_flops(node, shapes)

        dtype = "fp32"
        if kind == "matmul":
            operand_dtypes = []
            for n in node.input[:2]:
                if not n:
                    continue
                if n in roots and roots[n]:
                    biggest = max(roots[n], key=lambda i: init_bytes[i])
                    operand_dtypes.append(init_dtype[biggest])
                else:
                    src = producer.get(n)
                    if src is not None and src.op_type in _DEQUANT_OPS and src.input[0] in types:
                        operand_dtypes.append(_dtype(types[src.input[0]][0])[0])
                    elif n in types:
                        operand_dtypes.append(_dtype(types[n][0])[0])
            dtype = _widest(operand_dtypes)
            if compute_dtype and dtype in ("fp32", "fp16", "bf16", "fp64"):
                dtype = compute_dtype
        cost = OpCost(name, node.op_type, kind, flops=flops, weight_bytes=weight_bytes,
                      act_bytes=act_in + act_out, compute_dtype=dtype, param_bytes=param_bytes,
                      out_shape=tuple(shapes.get(node.output[0], ())) if node.output else ())
        if kind == "matmul":
            cost.sharded = True
            if weight_inits:
                ops_since_pair += 1
                if ops_since_pair % 2 == 0:
                    cost.tp_allreduce_bytes = act_out
        elif node.op_type == "Gather" and node.input[0] in roots:
            cost.sharded = True  # vocab-parallel embedding
        if kind == "collective":
            attrs = _attrs(node)
            cost.collective = node.op_type
            cost.group_size = int(attrs.get("group_size", 1))
            cost.collective_bytes = act_out if node.op_type == "AllGather" else act_in
            cost.flops = 0.0
        costs.append(cost)
    return costs


# ---------------------------------------------------------------------------------------------- structure


def _past_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [i for i in proto.graph.input
            if ("past" in i.name.lower() or "cache" in i.name.lower()) and len(i.type.tensor_type.shape.dim) == 4]


def model_structure(proto: onnx.ModelProto, types: dict) -> dict:
    """layers / hidden / vocab / heads / kv_heads / head_dim: from export metadata, else from the graph."""
    cfg = model_config(proto)
    past = _past_inputs(proto)
    keys = [p for p in past if "key" in p.name.lower() or re.search(r"\.k$|_k$", p.name.lower())]
    info = {
        "layers": int(cfg.get("num_layers") or len(keys) or 0),
        "hidden": int(cfg.get("hidden_size") or 0),
        "vocab": int(cfg.get("vocab_size") or 0),
        "num_heads": int(cfg.get("num_heads") or 0),
        "kv_heads": int(cfg.get("num_kv_heads") or 0),
        "head_dim": int(cfg.get("head_dim") or 0),
    }
    if keys and keys[0].name in types:
        shape = types[keys[0].name][1]
        info["kv_heads"] = info["kv_heads"] or shape[1]
        info["head_dim"] = info["head_dim"] or shape[3]
    if not info["layers"]:
        return info
    producers = {o: n for n in proto.graph.node for o in n.output}
    if proto.graph.output and (not info["vocab"] or not info["hidden"]):
        first = proto.graph.output[0].name
        if first in types:
            info["vocab"] = info["vocab"] or types[first][1][-1]
        node = producers.get(first)
        while node is not None and node.op_type not in ("MatMul", "Gemm"):
            node = producers.get(node.input[0]) if node.input else None
        if node is not None and node.input[0] in types:
            info["hidden"] = info["hidden"] or types[node.input[0]][1][-1]
    if not info["num_heads"]:
        for node in proto.graph.node:
            if node.op_type == "MatMul" and node.output[0] in types and len(types[node.output[0]][1]) == 4:
                info["num_heads"] = types[node.output[0]][1][1]
                break
    return info


def _mark_megatron_sharding(ops: list[OpCost], hidden: int) -> None:
    """Transformer TP: everything between a column- and a row-parallel matmul is split across ranks
    (head-shaped attention tensors, intermediate-size MLP activations, vocab-parallel logits); only
    residual-stream ops ([..., hidden]: norms, residual adds) are replicated."""
    for op in ops:
        if op.kind in ("vector", "data") and op.out_shape:
            op.sharded = not (len(op.out_shape) <= 3 and op.out_shape[-1] == hidden)


def _io_dtype_bytes(proto, types, names: Iterable[str], default: float) -> float:
    for n in names:
        if n in types:
            return _dtype(types[n][0])[1] / 8.0
    return default


def build_workload(proto: onnx.ModelProto, phase: str, batch: int, seq: int, past: int,
                   dims: dict[str, int] | None = None, compute_dtype: str | None = None) -> Workload:
    """Bind dims, infer shapes and cost every node for one phase."""
    input_shapes = bind_dims(proto, batch, seq, past, dims)
    types = infer_types(proto, input_shapes)
    ops = graph_costs(proto, types, compute_dtype)
    info = model_structure(proto, types)
    past_names = [p.name for p in _past_inputs(proto)]
    if info["layers"] and info["hidden"]:
        _mark_megatron_sharding(ops, info["hidden"])
    float_outputs = [o.name for o in proto.graph.output
                     if o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)]
    weights = sum(_nbytes(t.data_type, t.dims) for t in proto.graph.initializer)
    present = [o.name for o in proto.graph.output if "present" in o.name.lower() and o.name in types]
    kv_names = present or [name for name in past_names if name in types]
    return Workload(
        phase=phase, ops=ops, batch=batch, seq=seq, past=past,
        layers=info["layers"], hidden=info["hidden"], vocab=info["vocab"], num_heads=info["num_heads"],
        kv_heads=info["kv_heads"], head_dim=info["head_dim"],
        act_bytes_per_elem=_io_dtype_bytes(proto, types, float_outputs[:1], 4.0),
        kv_bytes_per_elem=_io_dtype_bytes(proto, types, past_names[:1], 4.0),
        weight_bytes=weights,
        sharded_weight_bytes=sum(op.param_bytes for op in ops if op.sharded),
        kv_io_bytes=sum(_nbytes(*types[n]) for n in kv_names),
    )


# ---------------------------------------------------------------------------------------------- reports


def op_rows(work: Workload, device: DeviceProfile) -> list[dict]:
    rows = []
    for op in work.ops:
        if op.kind == "folded":
            continue
        t, bound = op_time(op, device)
        rows.append({
            "name": op.name, "op_type": op.op_type, "kind": op.kind, "dtype": op.compute_dtype,
            "flops": op.flops, "bytes": op.bytes_moved, "intensity": arithmetic_intensity(op.flops, op.bytes_moved),
            "time_s": t, "bound": bound,
        })
    return rows


def phase_summary(work: Workload, device: DeviceProfile) -> dict:
    rows = op_rows(work, device)
    total_t = sum(r["time_s"] for r in rows)
    by_type: dict[str, dict] = defaultdict(lambda: {"count": 0, "flops": 0.0, "bytes": 0.0, "time_s": 0.0})
    for r in rows:
        agg = by_type[r["op_type"]]
        agg["count"] += 1
        agg["flops"] += r["flops"]
        agg["bytes"] += r["bytes"]
        agg["time_s"] += r["time_s"]
    flops = sum(r["flops"] for r in rows)
    moved = sum(r["bytes"] for r in rows)
    return {
        "phase": work.phase, "batch": work.batch, "seq": work.seq, "past": work.past,
        "flops": flops, "bytes": moved, "intensity": arithmetic_intensity(flops, moved),
        "time_s": total_t,
        "compute_bound_time_s": sum(r["time_s"] for r in rows if r["bound"] == "compute"),
        "memory_bound_time_s": sum(r["time_s"] for r in rows if r["bound"] == "memory"),
        "weight_bytes": work.weight_bytes, "kv_cache_bytes": work.kv_bytes,
        "by_op_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["time_s"])),
        "ops": rows,
    }


def _phases_for(proto: onnx.ModelProto, batch: int, seq: int, past: int | None, phases: Sequence[str]) -> list[tuple[str, int, int, int]]:
    has_cache = bool(_past_inputs(proto))
    past = seq if past is None else past
    if not has_cache:
        return [("forward", batch, seq, 0)]
    plan = []
    if "prefill" in phases:
        plan.append(("prefill", batch, seq, 0))
    if "decode" in phases:
        plan.append(("decode", batch, 1, past))
    return plan


def _device_and_links(
    device: str | DeviceProfile, interconnects: Sequence[str] | None
) -> tuple[DeviceProfile, list[InterconnectProfile]]:
    """The device profile and the interconnects to price (the device's default one when none is named)."""
    dev = device if isinstance(device, DeviceProfile) else load_device(device)
    names = list(interconnects or []) or [dev.default_interconnect or "nvlink4"]
    return dev, [load_interconnect(n) for n in names]


def _check_degrees(values: Sequence[int], what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if not out or out[0] < 1:
        raise InvalidOptionError(f"{what} degrees must be positive integers, got {list(values)}")
    return out


def analyze_model(
    path: str | Path,
    device: str | DeviceProfile = "maia100",
    interconnects: Sequence[str] | None = None,
    batch: int = 1,
    seq: int = 128,
    past: int | None = None,
    memory_limit: float | None = None,
    tps: Sequence[int] = DEFAULT_TPS,
    pps: Sequence[int] = DEFAULT_PPS,
    microbatches: int | None = None,
    dims: dict[str, int] | None = None,
    compute_dtype: str | None = None,
    phases: Sequence[str] = PHASES,
) -> dict:
    """Roofline per op plus the TP x PP x interconnect what-if for one ONNX model (weights not loaded)."""
    if batch < 1 or seq < 1 or (past is not None and past < 0):
        raise InvalidOptionError(f"--batch and --seq must be >= 1 and --past >= 0 (got {batch}, {seq}, {past})")
    dev, links = _device_and_links(device, interconnects)
    tps, pps = _check_degrees(tps, "TP"), _check_degrees(pps, "PP")
    proto = load_proto(path)
    report = {"model": str(path), "kind": "model", "device": dev.to_dict(),
              "interconnects": [link.to_dict() for link in links],
              "memory_limit": memory_limit or dev.memory_capacity, "phases": {}}
    for phase, b, s, p in _phases_for(proto, batch, seq, past, phases):
        work = build_workload(proto, phase, b, s, p, dims, compute_dtype)
        summary = phase_summary(work, dev)
        summary["structure"] = {k: getattr(work, k) for k in ("layers", "hidden", "vocab", "num_heads", "kv_heads", "head_dim")}
        estimates = sweep(work, dev, links, tps, pps, microbatches, memory_limit)
        summary["configs"] = [e.to_dict() for e in estimates]
        best = best_config(estimates)
        summary["best"] = best.to_dict() if best else None
        report["phases"][phase] = summary
    return report


# ---------------------------------------------------------------------------------------------- partitions


def _rank_files(directory: Path) -> list[tuple[int, int, Path]]:
    files = []
    for f in sorted(directory.glob("rank*_stage*.onnx")):
        m = re.fullmatch(r"rank(\d+)_stage(\d+)\.onnx", f.name)
        if m:
            files.append((int(m.group(1)), int(m.group(2)), f))
    return files


def read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path} ({exc}): is this a partition directory?") from exc
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return manifest


def _manifest_degree(manifest: dict, key: str, fallback: int) -> int:
    mesh = manifest.get("mesh") or {}  # maia_onnx.partition schema: mesh {tp, pp, world_size}
    if isinstance(mesh, dict) and isinstance(mesh.get(key), int) and mesh[key] > 0:
        return mesh[key]
    for k in (key, f"{key}_degree", f"{key}_size", {"tp": "tensor_parallel", "pp": "pipeline_parallel"}[key]):
        v = manifest.get(k)
        if isinstance(v, int) and v > 0:
            return v
    layout = manifest.get("layout") or manifest.get("parallel") or {}
    if isinstance(layout, dict) and isinstance(layout.get(key), int):
        return layout[key]
    return fallback


def stage_sends(manifest: dict, protos: dict[tuple[int, int], onnx.ModelProto], batch: int, seq: int, past: int,
                dims: dict[str, int] | None = None) -> dict[tuple[int, int], list[tuple[str, int, float]]]:
    """Pipeline point-to-point sends per (tp_rank, stage): [(tensor, receiving stage, bytes per forward)].

    A boundary tensor is an output of stage s listed among the inputs of a later stage t; tp rank r of
    stage s sends its own full copy to tp rank r of stage t (manifest ``stages``), once per receiving stage.
    Shapes and dtypes come from the sending rank file under the bound batch/seq/past dims.
    """
    stages = [st for st in manifest.get("stages") or [] if isinstance(st, dict)]
    consumers: dict[str, list[int]] = defaultdict(list)
    for st in stages:
        for name in st.get("inputs") or []:
            consumers[name].append(int(st.get("stage", 0)))
    sends: dict[tuple[int, int], list[tuple[str, int, float]]] = {}
    for (r, st), proto in sorted(protos.items()):
        out_names = [o.name for o in proto.graph.output if any(t > st for t in consumers.get(o.name, ()))]
        if not out_names:
            continue
        types = infer_types(proto, bind_dims(proto, batch, seq, past, dims))
        rows = []
        for name in out_names:
            if name not in types:
                raise UnsupportedModelError(f"cannot infer the shape of boundary tensor {name!r} of stage {st}: "
                                            "pass its symbolic dims with --dim NAME=VALUE")
            for t in sorted({t for t in consumers[name] if t > st}):
                rows.append((name, t, _nbytes(*types[name])))
        sends[(r, st)] = rows
    return sends


def analyze_partition(
    directory: str | Path,
    device: str | DeviceProfile = "maia100",
    interconnects: Sequence[str] | None = None,
    batch: int = 1,
    seq: int = 128,
    past: int | None = None,
    memory_limit: float | None = None,
    microbatches: int | None = None,
    dims: dict[str, int] | None = None,
    compute_dtype: str | None = None,
    phases: Sequence[str] = PHASES,
) -> dict:
    """Price an existing partition: each rank file's ops and the collectives it actually contains."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = _rank_files(directory)
    if not files:
        raise ModelLoadError(f"{directory} has a manifest.json but no rank<r>_stage<s>.onnx files: re-run maia-onnx partition")
    dev, links = _device_and_links(device, interconnects)
    tp = _manifest_degree(manifest, "tp", len({r for r, _, _ in files}) // max(1, len({s for _, s, _ in files})) or 1)
    pp = _manifest_degree(manifest, "pp", len({s for _, s, _ in files}))
    limit = memory_limit or dev.memory_capacity
    protos = {(r, s): load_proto(f) for r, s, f in files}
    first = protos[min(protos)]
    report = {"model": str(directory), "kind": "partition", "tp": tp, "pp": pp, "device": dev.to_dict(),
              "interconnects": [link.to_dict() for link in links], "memory_limit": limit, "phases": {}}
    for phase, b, s, p in _phases_for(first, batch, seq, past, phases):
        m = microbatches or default_microbatches(b, pp)
        m = max(1, min(m, b))
        works = {key: build_workload(proto, phase, b, s, p, dims, compute_dtype) for key, proto in protos.items()}
        sends = stage_sends(manifest, protos, b, s, p, dims)
        ranks, configs = [], []
        for link in links:
            stage_time: dict[int, tuple[float, float, float, float]] = {}
            for (r, st), work in sorted(works.items()):
                est = estimate_rank(work.ops, dev, link, r, st)
                kv = work.kv_io_bytes
                memory = est.weight_bytes + kv + est.activation_bytes
                # one send per microbatch per boundary tensor, like the analytic what-if (estimate_config)
                rank_sends = sends.get((r, st), [])
                p2p_bytes = sum(size for _, _, size in rank_sends)
                p2p_s = sum(m * p2p_time(size / m, link.bandwidth, link.alpha) for _, _, size in rank_sends)
                comm_s = est.comm_s + p2p_s
                ranks.append({"interconnect": link.name, "rank": r, "stage": st, "compute_s": est.compute_s,
                              "comm_s": comm_s, "p2p_s": p2p_s, "p2p_bytes": p2p_bytes,
                              "p2p_tensors": [name for name, _, _ in rank_sends], "collectives": est.collectives,
                              "collective_bytes": est.collective_bytes, "by_collective": est.by_kind,
                              "weight_bytes": est.weight_bytes, "kv_bytes": kv,
                              "activation_bytes": est.activation_bytes, "memory_bytes": memory,
                              "fits": memory <= limit})
                prev = stage_time.get(st, (0.0, 0.0, 0.0, 0.0))
                if est.compute_s + comm_s > prev[0] + prev[1]:
                    stage_time[st] = (est.compute_s, comm_s, p2p_s, p2p_bytes)
            # the whole batch through the slowest stage (its sends included); GPipe bubble on top
            compute, comm, p2p_s, p2p_bytes = max(stage_time.values(), key=lambda v: v[0] + v[1])
            busy = compute + comm
            bubble = busy * (pp - 1) / m if pp > 1 else 0.0
            link_ranks = [x for x in ranks if x["interconnect"] == link.name]
            configs.append({"phase": phase, "interconnect": link.name, "tp": tp, "pp": pp, "microbatches": m,
                            "compute_s": compute, "comm_s": comm, "p2p_s": p2p_s, "p2p_bytes": p2p_bytes,
                            "bubble_s": bubble, "total_s": busy + bubble,
                            "bubble_fraction": bubble_fraction(pp, m),
                            "collectives": max(x["collectives"] for x in link_ranks),
                            "collective_bytes": max(x["collective_bytes"] for x in link_ranks),
                            "memory_bytes": max(x["memory_bytes"] for x in link_ranks),
                            "fits": all(x["fits"] for x in link_ranks), "devices": tp * pp, "valid": True, "note": ""})
        any_work = works[min(works)]
        summary = phase_summary(any_work, dev)
        summary["ranks"] = ranks
        summary["configs"] = configs
        fitting = [c for c in configs if c["fits"]]
        summary["best"] = min(fitting, key=lambda c: c["total_s"]) if fitting else None
        report["phases"][phase] = summary
    return report


def analyze(path: str | Path, **options) -> dict:
    """Entry point: a partition directory (manifest.json) or a single ONNX model."""
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        options.pop("tps", None)
        options.pop("pps", None)
        return analyze_partition(path, **options)
    return analyze_model(path, **options)


# ---------------------------------------------------------------------------------------------- output


def _ms(seconds: float) -> float:
    return seconds * 1e3


def render_text(report: dict, top: int = 15) -> str:
    """The terminal report: per phase, the top ops, op types, every configuration and the best one."""
    from maia_onnx.report import format_table, human_bytes

    dev = report["device"]
    peaks = ", ".join(f"{k} {v / 1e12:g} T" for k, v in dev["peak_flops"].items())
    lines = [
        f"model: {report['model']}" + (f"  (partition tp={report['tp']} pp={report['pp']})" if report["kind"] == "partition" else ""),
        f"device: {dev['name']}  peak FLOP/s {peaks}; {dev['memory_bandwidth'] / 1e12:g} TB/s; "
        f"{human_bytes(dev['memory_capacity'])} (limit {human_bytes(report['memory_limit'])})",
        "interconnects: " + ", ".join(f"{i['name']} ({i['bandwidth'] / 1e9:g} GB/s, alpha {i['alpha'] * 1e6:g} us)"
                                      for i in report["interconnects"]),
    ]
    for phase, s in report["phases"].items():
        lines.append("")
        lines.append(f"== {phase}: batch {s['batch']}, seq {s['seq']}, past {s['past']} ==")
        mem_share = s["memory_bound_time_s"] / s["time_s"] if s["time_s"] else 0.0
        lines.append(
            f"single device: {s['flops'] / 1e9:.4g} GFLOP, {human_bytes(s['bytes'])} moved, intensity "
            f"{s['intensity']:.3g} FLOP/B, roofline {_ms(s['time_s']):.4g} ms ({mem_share:.0%} of it memory-bound); "
            f"weights {human_bytes(s['weight_bytes'])}, KV cache {human_bytes(s['kv_cache_bytes'])}"
        )
        ops = sorted(s["ops"], key=lambda r: -r["time_s"])[:top]
        rows = [{**r, "time_us": r["time_s"] * 1e6, "GFLOP": r["flops"] / 1e9, "MB": r["bytes"] / 1e6} for r in ops]
        lines.append(format_table(rows, ["name", "op_type", "dtype", "GFLOP", "MB", "intensity", "time_us", "bound"],
                                  title=f"top {len(rows)} ops by roofline time"))
        types = [{"op_type": k, **v, "time_us": v["time_s"] * 1e6, "GFLOP": v["flops"] / 1e9, "MB": v["bytes"] / 1e6}
                 for k, v in list(s["by_op_type"].items())[:top]]
        lines.append(format_table(types, ["op_type", "count", "GFLOP", "MB", "time_us"], title="by op type"))
        cfgs = [{**c, "compute_ms": _ms(c["compute_s"]), "comm_ms": _ms(c["comm_s"]), "bubble_ms": _ms(c["bubble_s"]),
                 "total_ms": _ms(c["total_s"]), "coll_MB": c["collective_bytes"] / 1e6,
                 "p2p_ms": _ms(c.get("p2p_s", 0.0)), "p2p_MB": c.get("p2p_bytes", 0.0) / 1e6,
                 "mem_GB": c["memory_bytes"] / 1e9, "fits": "yes" if c["fits"] else "NO",
                 "m": c["microbatches"]} for c in s["configs"]]
        lines.append(format_table(cfgs, ["interconnect", "tp", "pp", "m", "compute_ms", "comm_ms", "p2p_ms", "p2p_MB",
                                         "bubble_ms", "total_ms", "collectives", "coll_MB", "mem_GB", "fits", "note"],
                                  title="configurations (time per forward, per rank; comm_ms includes the p2p_ms pipeline sends)"))
        if s.get("ranks"):
            lines.append(format_table(s["ranks"], ["interconnect", "rank", "stage", "compute_s", "comm_s", "p2p_s", "p2p_bytes",
                                                   "collectives", "collective_bytes", "memory_bytes", "fits"], title="ranks"))
        best = s.get("best")
        if best:
            lines.append(f"best: tp={best['tp']} pp={best['pp']} over {best['interconnect']}: {_ms(best['total_s']):.4g} ms "
                         f"per forward, {best['memory_bytes'] / 1e9:.3g} GB per device")
        else:
            lines.append("best: no configuration fits the memory limit: raise --memory-limit, add --tp/--pp degrees or quantize")
    return "\n".join(lines)


def plot_breakdown(report: dict, out_path: str | Path) -> Path:
    """PNG: stacked compute / communication / bubble time against TP degree, one panel per phase x interconnect."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidOptionError("--plot needs matplotlib: pip install 'maia-onnx[plot]'") from exc
    from maia_onnx.io import atomic_write

    phases = list(report["phases"])
    links = [i["name"] for i in report["interconnects"]]
    fig, axes = plt.subplots(len(phases), len(links), figsize=(4.2 * len(links), 3.6 * len(phases)), squeeze=False)
    colors = {"compute": "#4C72B0", "communication": "#DD8452", "bubble": "#BBBBBB"}
    for row, phase in enumerate(phases):
        configs = report["phases"][phase]["configs"]
        tps = sorted({c["tp"] for c in configs})
        pps = sorted({c["pp"] for c in configs})
        width = 0.8 / len(pps)
        for col, link in enumerate(links):
            ax = axes[row][col]
            ticks, labels = [], []
            for i, tp in enumerate(tps):
                for j, pp in enumerate(pps):
                    match = [c for c in configs if c["interconnect"] == link and c["tp"] == tp and c["pp"] == pp]
                    if not match:
                        continue
                    c = match[0]
                    x = i + (j - (len(pps) - 1) / 2) * width
                    parts = [("compute", c["compute_s"]), ("communication", c["comm_s"]), ("bubble", c["bubble_s"])]
                    bottom = 0.0
                    for label, value in parts:
                        ax.bar(x, _ms(value), width * 0.92, bottom=bottom, color=colors[label],
                               hatch="" if c.get("valid", True) and c["fits"] else "//",
                               label=label if (i == 0 and j == 0) else None)
                        bottom += _ms(value)
                    ticks.append(x)
                    labels.append(f"pp{pp}" if len(pps) > 1 else "")
            ax.set_xticks(ticks)
            ax.set_xticklabels(labels, fontsize=6, rotation=90)
            for i, tp in enumerate(tps):
                ax.annotate(f"TP{tp}", (i, 0), xytext=(0, -26), textcoords="offset points", ha="center",
                            fontsize=8, annotation_clip=False)
            ax.set_title(f"{phase} - {link}", fontsize=9)
            ax.set_ylabel("ms per forward", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    device = report["device"]["name"]
    shown = "/".join(Path(report["model"]).parts[-2:])
    fig.suptitle(f"{shown} on {device}: time per forward vs TP (hatched: does not fit / invalid)",
                 fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_write(out_path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out_path
