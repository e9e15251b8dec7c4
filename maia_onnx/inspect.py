"""Static model report: opset, I/O with symbolic dims, op histogram, parameters by dtype and FLOPs by op type (node_flops)."""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from typing import Any, Mapping

import onnx_ir as ir

DEFAULT_DIM = 1  # a symbolic dim nobody gave a value for counts as 1 (FLOPs are reported per that shape)

# FLOPs per output element for element-wise / normalization ops (a multiply-add counts 2)
_ELEMENTWISE = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Neg": 1, "Abs": 1, "Max": 1, "Min": 1, "Sqrt": 1, "Reciprocal": 1,
    "Pow": 1, "Exp": 1, "Log": 1, "Relu": 1, "LeakyRelu": 2, "Sigmoid": 4, "Tanh": 4, "Erf": 4, "Sin": 1, "Cos": 1,
    "Gelu": 8, "HardSigmoid": 3, "HardSwish": 4, "Softplus": 3, "Clip": 1, "Where": 1, "Equal": 1, "Less": 1,
    "LessOrEqual": 1, "Greater": 1, "GreaterOrEqual": 1, "Not": 1, "And": 1, "Or": 1, "Mod": 1, "Floor": 1,
    "Ceil": 1, "Round": 1, "Sign": 1, "PRelu": 2, "Elu": 4, "Selu": 4, "Mish": 8, "Swish": 5, "SiLU": 5,
    "BiasGelu": 9, "FastGelu": 8, "QuickGelu": 5,
    # quantization: scale and zero point per element
    "QuantizeLinear": 2, "DequantizeLinear": 2, "DynamicQuantizeLinear": 4,
}
# FLOPs per *input* element
_PER_INPUT = {
    "Softmax": 5, "LogSoftmax": 6, "ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1, "ReduceMin": 1,
    "ReduceProd": 1, "ReduceL2": 2, "ReduceSumSquare": 2, "LayerNormalization": 8, "GroupNormalization": 8,
    "InstanceNormalization": 8, "BatchNormalization": 2, "SimplifiedLayerNormalization": 5, "RMSNormalization": 5,
    "SkipLayerNormalization": 9, "SkipSimplifiedLayerNormalization": 6, "ArgMax": 1, "ArgMin": 1,
    "CumSum": 1, "TopK": 1,
}


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return dims


def _numel(value: ir.Value | None) -> int | None:
    dims = _dims(value)
    return None if dims is None else math.prod(dims)


def node_flops_or_none(node: ir.Node) -> int | None:
    """FLOPs of one node from its (concrete) input/output shapes; None when a needed shape is unknown.

    Formulas: MatMul 2*M*N*K (times batch), Gemm 2*M*N*K (+M*N bias), Conv 2*N*Cout*Hout*Wout*Cin/groups*kh*kw
    (+bias), ConvTranspose 2*N*Cin*H*W*Cout/groups*kh*kw, pools output*kernel, element-wise a small constant
    per output element, normalizations/softmax/reductions per input element; data movement (Reshape,
    Transpose, Gather, Concat, collectives, ...) counts 0.
    """
    op = node.op_type
    out = node.outputs[0] if node.outputs else None
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "FusedMatMul"):
        a = node.inputs[0]
        a_dims = _dims(a)
        out_n = _numel(out)
        if a_dims is None or out_n is None:
            return None
        k = a_dims[-1] if a_dims else 1
        if node.attributes.get("transA") is not None and node.attributes["transA"].as_int() and len(a_dims) >= 2:
            k = a_dims[-2]
        return 2 * out_n * k
    if op == "Gemm":
        a_dims = _dims(node.inputs[0])
        out_n = _numel(out)
        if a_dims is None or out_n is None or len(a_dims) != 2:
            return None
        trans_a = node.attributes.get("transA")
        k = a_dims[0] if trans_a is not None and trans_a.as_int() else a_dims[1]
        bias = out_n if len(node.inputs) > 2 and node.inputs[2] is not None else 0
        return 2 * out_n * k + bias
    if op in ("Conv", "QLinearConv", "ConvInteger"):
        w_index = 3 if op == "QLinearConv" else 1
        w = _dims(node.inputs[w_index]) if len(node.inputs) > w_index else None
        out_n = _numel(out)
        if w is None or out_n is None:
            return None
        # weight [Cout, Cin/groups, kh, kw]: every output element is a dot of length Cin/groups*kh*kw
        per_out = math.prod(w[1:])
        bias_index = 8 if op == "QLinearConv" else 2
        bias = out_n if len(node.inputs) > bias_index and node.inputs[bias_index] is not None else 0
        return 2 * out_n * per_out + bias
    if op == "ConvTranspose":
        x_n = _numel(node.inputs[0])
        w = _dims(node.inputs[1])
        if x_n is None or w is None:
            return None
        # weight [Cin, Cout/groups, kh, kw]: each input element scatters into Cout/groups*kh*kw outputs
        return 2 * x_n * math.prod(w[1:])
    if op in ("MaxPool", "AveragePool", "LpPool"):
        out_n = _numel(out)
        kernel = node.attributes.get("kernel_shape")
        if out_n is None or kernel is None:
            return None
        return out_n * math.prod(kernel.as_ints())
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return _numel(node.inputs[0])
    if op in _ELEMENTWISE:
        out_n = _numel(out)
        return None if out_n is None else _ELEMENTWISE[op] * out_n
    if op in _PER_INPUT:
        in_n = _numel(node.inputs[0]) if node.inputs else None
        return None if in_n is None else _PER_INPUT[op] * in_n
    if op in ("Attention", "MultiHeadAttention", "GroupQueryAttention"):
        return _attention_flops(node)
    return 0  # data movement, shape arithmetic, collectives, EPContext: no arithmetic modelled


def _attention_flops(node: ir.Node) -> int | None:
    """ONNX Attention (opset 23) / contrib MHA with 4D or 3D Q, K: 4*B*H*S*T*D for QK^T and PV."""
    q, k = (_dims(node.inputs[0]), _dims(node.inputs[1])) if len(node.inputs) > 1 else (None, None)
    if q is None or k is None:
        return None
    if len(q) == 4 and len(k) == 4:
        b, h, s, d = q
        t = k[2]
        return 4 * b * h * s * t * d + 5 * b * h * s * t
    if len(q) == 3 and len(k) == 3:
        b, s, hd = q
        t = k[1]
        return 4 * b * s * t * hd
    return None


def node_flops(node: ir.Node) -> int:
    """FLOPs of one node (0 when shapes are unknown or the op does no arithmetic). See node_flops_or_none."""
    return node_flops_or_none(node) or 0


# ----------------------------------------------------------------------------------------------


def _shape_repr(value: ir.Value) -> list:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else (str(d) if d is not None and str(d) != "None" else "?") for d in value.shape]


def _dtype_name(dtype) -> str:
    return dtype.name.lower() if dtype is not None else "unknown"


def concretize(model: ir.Model, dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """Fix every symbolic graph-input dim (from ``dims``, default 1) and re-infer all shapes in place.

    Returns the dim values used. Intermediate shapes are cleared first so inference can replace the
    exporter's symbolic ones with concrete numbers; initializer data is never loaded.
    """
    dims = dict(dims or {})
    used: dict[str, int] = {}
    init_names = set(model.graph.initializers)
    for value in model.graph.inputs:
        if value.name in init_names or value.shape is None:
            continue
        new = []
        for d in value.shape:
            if isinstance(d, int):
                new.append(d)
            else:
                name = str(d) if d is not None and d.value is not None else "?"
                size = int(dims.get(name, dims.get("*", DEFAULT_DIM)))
                used[name] = size
                new.append(size)
        value.shape = ir.Shape(new)
    for node in model.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
    for out in model.graph.outputs:
        out.shape = None
    if not _ort_symbolic_shapes(model):
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return used


def _shape_only_proto(model: ir.Model):
    """The model as a proto whose big/external initializers are typed graph inputs: inference needs their
    shapes, never their data (reading a multi-GB external file just to infer shapes would be wasteful)."""
    import onnx

    big = {name for name, v in model.graph.initializers.items()
           if v.const_value is not None and (isinstance(v.const_value, ir.ExternalTensor) or v.const_value.size > 4096)}
    proto = ir.to_proto(model)
    kept = [t for t in proto.graph.initializer if t.name not in big]
    dropped = [t for t in proto.graph.initializer if t.name in big]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    existing_inputs = {i.name for i in proto.graph.input}
    for t in dropped:
        if t.name not in existing_inputs:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return proto


def _ort_symbolic_shapes(model: ir.Model) -> bool:
    """ORT's symbolic shape inference follows Shape->Concat->Reshape chains ONNX's own inference gives up on."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        proto = _shape_only_proto(model)
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)
    except Exception:  # unknown custom ops etc.: fall back to ONNX inference
        return False
    if inferred is None:
        return False
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    for node in model.graph:
        for out in node.outputs:
            if out.name in shapes:
                out.shape = ir.Shape(shapes[out.name])
    return True


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
    from maia_onnx.io import load_model

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
            flops_by_op[key] += f
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
