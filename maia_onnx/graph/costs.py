"""The one cost model: FLOPs and bytes of an onnx_ir node, read from the shapes of its input/output values.

Every FLOP count in the project (inspect, analyze, pipeline balancing, compile's placement report) comes
from :func:`node_flops`, so one node gets one number everywhere.

Convention (one arithmetic operation on one element = 1 FLOP; a multiply-add = 2):

- MatMul, Gemm, Conv and their integer/quantized/contrib forms: 2 * MACs (2*M*N*K; Conv
  2 * out * Cin/groups * prod(kernel); ConvTranspose 2 * in * Cout/groups * prod(kernel)), plus 1 per
  output element for a bias input. Gemm's alpha/beta scaling is not counted.
- Attention (ONNX Attention, com.microsoft MultiHeadAttention / GroupQueryAttention): QK^T and PV,
  2*B*H*S*T*D and 2*B*H*S*T*Dv, plus the softmax over the scores at 5 per score (see Softmax).
- Element-wise ops: 1 per output element per primitive op. Transcendentals (Exp, Log, Sqrt, Erf, Tanh,
  Sigmoid, Reciprocal, Pow, Sin, ...) are primitives, so they count 1 like Add; comparisons, logical ops
  and Where count 1 too. Variadic Sum/Max/Min count (inputs - 1) per output element, Mean one more.
- Fused ops count the primitives of their ONNX decomposition per element: e.g. Gelu (erf form) 5
  (Div, Erf, Add, Mul, Mul), Gelu tanh form 8, HardSwish 5, Softplus 3, LeakyRelu 3 (Less, Mul, Where).
- Softmax / LogSoftmax: 5 per input element (max, subtract, exp, sum, divide/subtract). Normalizations
  per input element: LayerNormalization 6 (mean, subtract, square, mean, scale by 1/std, gamma) + 1 with a
  bias, RMS/SimplifiedLayerNormalization 4, BatchNormalization 4, Instance/GroupNormalization 7; the skip
  variants add 1 for the skip add (and 1 for each optional bias). Per-row terms (epsilon, rsqrt) are not
  counted: they are negligible next to the per-element ones.
- Reductions, ArgMax/ArgMin, CumSum, TopK, global pools: 1 per input element (ReduceSumSquare, ReduceL1,
  ReduceL2, ReduceLogSumExp 2). Windowed pools: output elements * prod(kernel_shape).
- QuantizeLinear and DequantizeLinear: 2 per element (scale and zero point; rounding and saturation are
  the conversion, not arithmetic); DynamicQuantizeLinear 4 (min/max, then quantize). ``maia.MxFakeQuant``
  11 per element (the full-size arithmetic ops of its function body).
- 0: data movement and views (Reshape, Transpose, Gather, Concat, Slice, Cast, ...), shape arithmetic on
  ``Shape`` outputs aside, collectives (AllReduce, AllGather, ...: the interconnect model prices them),
  control flow, EPContext, and any op not listed here.

Symbolic dims: ``dims`` maps a dim name to its size (key ``"*"`` sizes every other symbolic dim). A count
that needs a shape or dim nobody gave is unknown: :func:`node_flops_or_none` answers None and
:func:`node_flops` 0. Weights are never read: shapes of initializers come from their value or tensor shape.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import onnx_ir as ir

ANY_DIM = "*"  # key of ``dims`` that sizes every symbolic dim not named on its own

MATMUL_OPS = frozenset({"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulNBits", "Gemm", "GemmFloat8"})
CONV_OPS = frozenset({"Conv", "ConvInteger", "QLinearConv", "ConvTranspose"})
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})
COLLECTIVE_OPS = frozenset({"AllReduce", "AllGather", "AllToAll", "ReduceScatter", "Send", "Recv"})

# Primitives of the op's ONNX decomposition, per output element.
PER_OUTPUT = {
    **dict.fromkeys((
        "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Mod", "Floor", "Ceil", "Round", "Sign", "Relu", "Clip",
        "Exp", "Log", "Sqrt", "Reciprocal", "Pow", "Erf", "Tanh", "Sigmoid", "Sin", "Cos", "Tan", "Asin",
        "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Where", "Equal", "Less", "LessOrEqual",
        "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "BitShift", "BitwiseAnd",
        "BitwiseOr", "BitwiseXor", "BitwiseNot",
    ), 1),
    "LeakyRelu": 3, "PRelu": 3, "ThresholdedRelu": 2,  # compare, multiply, select
    "Elu": 5, "Celu": 5, "Selu": 6,  # compare, exp, subtract, multiply, select (+ gamma)
    "HardSigmoid": 4, "HardSwish": 5, "Softplus": 3, "Softsign": 3, "Mish": 5, "Swish": 3, "QuickGelu": 3,
    "Shrink": 4,
    "QuantizeLinear": 2, "DequantizeLinear": 2, "MxFakeQuant": 11,
}
# Per input element (of input 0).
PER_INPUT = {
    "Softmax": 5, "LogSoftmax": 5,
    "ReduceSum": 1, "ReduceMean": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceProd": 1, "ReduceLogSum": 1,
    "ReduceSumSquare": 2, "ReduceL1": 2, "ReduceL2": 2, "ReduceLogSumExp": 2,
    "ArgMax": 1, "ArgMin": 1, "CumSum": 1, "TopK": 1, "GlobalAveragePool": 1, "GlobalMaxPool": 1, "GlobalLpPool": 2,
    "RMSNormalization": 4, "SimplifiedLayerNormalization": 4, "BatchNormalization": 4,
    "InstanceNormalization": 7, "GroupNormalization": 7, "DynamicQuantizeLinear": 4,
}
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool"})


# ---------------------------------------------------------------------------------------------- shapes and bytes


def value_dims(value: ir.Value | None, dims: Mapping[str, int] | None = None) -> list[int] | None:
    """Concrete dims of ``value`` (symbolic ones sized from ``dims``); None when the shape or a dim is unknown."""
    if value is None:
        return None
    shape = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
            continue
        name = getattr(d, "value", None)
        size = None
        if dims:
            size = dims.get(name) if name is not None else None
            if size is None:
                size = dims.get(ANY_DIM)
        if size is None:
            return None
        out.append(int(size))
    return out


def value_numel(value: ir.Value | None, dims: Mapping[str, int] | None = None) -> int | None:
    shape = value_dims(value, dims)
    return None if shape is None else math.prod(shape)


def dtype_bits(dtype: ir.DataType | None) -> int:
    """Bits per element as stored (sub-byte types pack: FP4/INT4 are 4); an unknown dtype counts as FP32."""
    if dtype is None or dtype == ir.DataType.UNDEFINED:
        return 32
    try:
        return int(dtype.bitwidth)
    except (AttributeError, TypeError, ValueError):  # STRING and other dtypes without a fixed width
        return 32


def tensor_bytes(dtype: ir.DataType | None, shape: Sequence[int]) -> float:
    """Bytes of a tensor of ``shape`` stored as ``dtype`` (sub-byte types packed)."""
    return math.prod(shape) * dtype_bits(dtype) / 8.0


def value_bytes(value: ir.Value | None, dims: Mapping[str, int] | None = None) -> float | None:
    """Bytes of ``value`` at its stored dtype; None when its shape is unknown."""
    shape = value_dims(value, dims)
    if shape is None:
        return None
    dtype = value.dtype if value.dtype is not None else (value.const_value.dtype if value.const_value is not None else None)
    return tensor_bytes(dtype, shape)


# ---------------------------------------------------------------------------------------------- FLOPs


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _has(node: ir.Node, index: int) -> bool:
    return _input(node, index) is not None


def node_flops_or_none(node: ir.Node, dims: Mapping[str, int] | None = None) -> float | None:
    """FLOPs of one node by the module's convention; None when a shape the count needs is unknown."""
    op = node.op_type
    out = node.outputs[0] if node.outputs else None

    def numel(value):
        return value_numel(value, dims)

    if op in MATMUL_OPS:
        return _matmul_flops(node, dims)
    if op in CONV_OPS:
        return _conv_flops(node, dims)
    if op in ATTENTION_OPS:
        return _attention_flops(node, dims)
    if op == "Einsum":
        return _einsum_flops(node, dims)
    if op in PER_OUTPUT:
        n = numel(out)
        return None if n is None else float(PER_OUTPUT[op] * n)
    if op in ("Sum", "Max", "Min", "Mean"):
        n = numel(out)
        extra = 1 if op == "Mean" else 0
        return None if n is None else float((max(len(node.inputs) - 1, 0) + extra) * n)
    if op in ("Gelu", "FastGelu", "BiasGelu"):
        n = numel(out)
        if n is None:
            return None
        tanh_form = op == "FastGelu" or (node.attributes.get("approximate") is not None and node.attributes["approximate"].value == "tanh")
        bias = 1 if op == "BiasGelu" or (op == "FastGelu" and _has(node, 1)) else 0
        return float(((8 if tanh_form else 5) + bias) * n)
    if op in ("LayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
        n = numel(_input(node, 0))
        if n is None:
            return None
        if op == "LayerNormalization":
            per = 6 + (1 if _has(node, 2) else 0)
        elif op == "SkipLayerNormalization":  # input, skip, gamma, beta, bias
            per = 1 + 6 + (1 if _has(node, 3) else 0) + (1 if _has(node, 4) else 0)
        else:  # input, skip, gamma, bias
            per = 1 + 4 + (1 if _has(node, 3) else 0)
        return float(per * n)
    if op in PER_INPUT:
        n = numel(_input(node, 0))
        return None if n is None else float(PER_INPUT[op] * n)
    if op in POOL_OPS:
        n = numel(out)
        kernel = node.attributes.get("kernel_shape")
        if n is None or kernel is None:
            return None
        return float(n * math.prod(kernel.as_ints()))
    return 0.0


def node_flops(node: ir.Node, dims: Mapping[str, int] | None = None) -> float:
    """FLOPs of one node (module docstring); 0 where a needed shape is unknown."""
    value = node_flops_or_none(node, dims)
    return 0.0 if value is None else value


def _matmul_flops(node: ir.Node, dims) -> float | None:
    op = node.op_type
    out_n = value_numel(node.outputs[0] if node.outputs else None, dims)
    a = value_dims(_input(node, 0), dims)
    if out_n is None or a is None or not a:
        return None
    if op in ("Gemm", "GemmFloat8"):
        if len(a) != 2:
            return None
        k = a[0] if _int_attr(node, "transA") else a[1]
        return 2.0 * out_n * k + (out_n if _has(node, 2) else 0)
    k = a[-1]
    if op == "FusedMatMul" and _int_attr(node, "transA") and len(a) >= 2:
        k = a[-2]
    if op == "MatMulNBits":
        k = _int_attr(node, "K", k)
    return 2.0 * out_n * k


def _conv_flops(node: ir.Node, dims) -> float | None:
    op = node.op_type
    out_n = value_numel(node.outputs[0] if node.outputs else None, dims)
    w_index, bias_index = (3, 8) if op == "QLinearConv" else (1, 2)
    w = value_dims(_input(node, w_index), dims)
    if out_n is None or w is None or len(w) < 2:
        return None
    bias = out_n if _has(node, bias_index) and op != "ConvInteger" else 0
    if op == "ConvTranspose":
        # weight [Cin, Cout/groups, k...]: every input element feeds Cout/groups * prod(k) outputs
        x_n = value_numel(_input(node, 0), dims)
        return None if x_n is None else 2.0 * x_n * math.prod(w[1:]) + bias
    # weight [Cout, Cin/groups, k...]: every output element is a dot product of Cin/groups * prod(k)
    return 2.0 * out_n * math.prod(w[1:]) + bias


def _attention_flops(node: ir.Node, dims) -> float | None:
    """QK^T (2*B*H*S*T*D), PV (2*B*H*S*T*Dv) and the softmax (5 per score)."""
    q = value_dims(_input(node, 0), dims)
    out = value_dims(node.outputs[0] if node.outputs else None, dims)
    if q is None or out is None:
        return None
    if len(q) == 4:  # [B, H, S, D]
        b, h, s, d = q
    elif len(q) == 3:  # [B, S, H*D]
        heads = _int_attr(node, "num_heads") or _int_attr(node, "q_num_heads")
        if not heads:
            return None
        b, s, hd = q
        h, d = heads, hd // heads
    else:
        return None
    key = value_dims(_input(node, 1), dims)
    if key is None or len(key) not in (3, 4):
        t = s
    else:
        t = key[2] if len(key) == 4 else key[1]
    past_index = 3 if node.op_type == "GroupQueryAttention" else 4 if node.op_type == "Attention" else 6
    past = value_dims(_input(node, past_index), dims)
    if past is not None and len(past) == 4:
        t += past[2]
    dv = out[-1] if len(out) == 4 else out[-1] // h
    scores = b * h * s * t
    return 2.0 * scores * d + 2.0 * scores * dv + 5.0 * scores


def _einsum_flops(node: ir.Node, dims) -> float | None:
    """One multiply-add per point of the full index space (2 when some index is summed away, else 1)."""
    attr = node.attributes.get("equation")
    if attr is None:
        return None
    equation = re.sub(r"\s+", "", attr.as_string())
    lhs, _, rhs = equation.partition("->")
    sizes: dict[str, int] = {}
    for term, value in zip(lhs.split(","), node.inputs):
        shape = value_dims(value, dims)
        if shape is None or "." in term:
            return None
        for letter, size in zip(term, shape):
            sizes[letter] = size
    if "->" not in equation:  # implicit output: the letters that occur once
        rhs = "".join(letter for letter in sizes if lhs.count(letter) == 1)
    summed = set(sizes) - set(rhs)
    return float((2 if summed else 1) * math.prod(sizes.values()))
