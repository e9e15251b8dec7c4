"""How a split flows through ops that hold no weights: elementwise math, normalisations, reductions, softmax,
layout ops (Transpose, Reshape to and from heads, Squeeze/Unsqueeze, Expand, Concat, Split/Slice) and
per-channel conv-net ops.

Each handler has the signature ``handler(rw, node, split_inputs, origins) -> Refusal | None``: it sets the
``Split`` of the node's outputs on the rank rewriter ``rw`` (rewriting per-rank shape constants, slicing
replicated operands) or returns why it cannot (``layout.gather``: gather the inputs first; ``layout.demote``:
the plan must keep the ops in ``origins`` replicated, as for grouped-query attention whose KV heads do not
divide by tp). ``FLOW_HANDLERS`` maps op types to them; ``handlers.SPLIT_HANDLERS`` adds the weight ops.
"""

from __future__ import annotations

import math
import numpy as np
import onnx_ir as ir

from .fused import cut_slice, cut_split, regroup
from .layout import BLOCKED_ROWS, Refusal, Split, demote, gather, local_size, norm_axis
from .moe import feeds_topk
from .rewriter import RankRewriter

UNARY_OPS = {
    "Identity", "Cast", "CastLike", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Neg",
    "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Softplus", "Softsign", "Gelu", "Elu", "Selu", "Celu", "Mish", "Sin",
    "Cos", "Not", "IsNaN", "IsInf", "Sign", "Floor", "Ceil", "Round", "Dropout", "Clip", "QuantizeLinear",
    "DequantizeLinear", "Swish",
}
BINARY_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "BitShift", "Sum", "Mean",
}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
              "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}
CHANNEL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}  # per channel (axis 1)


def attr_int(node: ir.Node, name: str, default: int) -> int:
    return node.attributes[name].as_int() if name in node.attributes else default


def _only_first(split_inputs: list[int]) -> Refusal | None:
    return None if split_inputs == [0] else gather("split inputs other than the first")


def unary(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    if split_inputs == [0]:
        x = rw.st(node.inputs[0])
        rw.set_out(node, Split(x.axis, origins, x.sections))
        return None
    if node.op_type == "Clip":  # split min/max bounds: broadcast like any elementwise op
        return elementwise(rw, node, split_inputs, origins)
    return _only_first(split_inputs)


def quantize_linear(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """Q/DQ of a split activation: per-tensor scales pass through; blocked (MX) scales split alike pass too."""
    ins = node.inputs
    if len(split_inputs) > 1:
        axes = {rw.st(ins[i]).axis for i in split_inputs}
        q_axis = norm_axis(attr_int(node, "axis", 1), len(rw.shape(ins[0]) or ()))
        if len(axes) == 1 and 0 in split_inputs and q_axis not in axes:
            first = rw.st(ins[0])
            rw.set_out(node, Split(first.axis, origins, first.sections))
            return None
        return gather("quantization blocks along the split axis")
    if split_inputs != [0]:
        return _only_first(split_inputs)
    if len(ins) > 1:
        scale_shape = rw.shape(ins[1]) or ()
        if len(scale_shape) > 0 and math.prod(scale_shape) > 1:
            return gather("per-axis activation quantization of a split tensor")
    return unary(rw, node, split_inputs, origins)


def elementwise(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """Broadcasting math: replicated operands with the full extent on the split axis are sliced to match."""
    out_shape = rw.shape(node.outputs[0])
    if out_shape is None:
        return gather("output shape unknown")
    r = len(out_shape)
    axes = {rw.st(node.inputs[i]).axis + (r - len(rw.shape(node.inputs[i]))) for i in split_inputs}
    if len(axes) != 1:
        return gather("inputs split on different axes")
    a = axes.pop()
    sections = {rw.st(node.inputs[i]).sections for i in split_inputs}
    if len(sections) != 1:
        return gather("inputs split into different fused blocks")
    sections = sections.pop()
    for i, v in enumerate(node.inputs):
        if v is None or i in split_inputs:
            continue
        vs = rw.shape(v)
        if vs is None:
            return gather(f"operand {v.name!r} has an unknown shape")
        ai = a - (r - len(vs))
        if ai < 0 or vs[ai] == 1:
            continue
        refusal = rw.slice_operand(node, i, ai, sections)
        if refusal is not None:
            return refusal
    rw.set_out(node, Split(a, origins, sections))
    return None


def softmax(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    a = rw.st(node.inputs[0]).axis
    if norm_axis(attr_int(node, "axis", -1), len(rw.shape(node.outputs[0]))) == a:
        if feeds_topk(node.outputs[0]):
            return demote(origins, f"{node.name}: routing scores over every expert (the router stays replicated)")
        return gather(f"{node.op_type} over the split axis")
    rw.set_out(node, Split(a, origins))
    return None


def reduce(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    ins = node.inputs
    a = rw.st(ins[0]).axis
    r = len(rw.shape(ins[0]))
    keep = attr_int(node, "keepdims", 1)
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [attr_int(node, "axis", 0)]
    elif "axes" in node.attributes:
        axes = list(node.attributes["axes"].as_ints())
    elif len(ins) > 1 and ins[1] is not None:
        arr = rw.const_array(ins[1])
        if arr is None:
            return gather("reduction axes computed at run time")
        axes = [int(x) for x in np.atleast_1d(arr)]
    else:
        return gather("reduction over every axis")
    axes = [norm_axis(x, r) for x in axes]
    if a in axes:
        return gather("reduction over the split axis")
    rw.set_out(node, Split(a if keep else a - sum(1 for x in axes if x < a), origins))
    return None


def layer_norm(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    axis = norm_axis(attr_int(node, "axis", -1), len(rw.shape(node.outputs[0])))
    if split_inputs != [0] or rw.st(node.inputs[0]).axis >= axis:
        return gather("normalisation over the split axis")
    rw.set_out(node, Split(rw.st(node.inputs[0]).axis, origins))
    return None


def transpose(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    out_shape = rw.shape(node.outputs[0])
    perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else list(range(len(out_shape)))[::-1]
    x = rw.st(node.inputs[0])
    rw.set_out(node, Split(perm.index(x.axis), origins, x.sections))
    return None


def reshape(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """To and from heads: the split dim becomes the outer part of its output group and the target shape's
    constant is divided by tp. A head count that does not divide (GQA: fewer KV heads than ranks) demotes
    the projections that made the split, so the plan keeps them replicated."""
    if split_inputs != [0]:
        return gather("the target shape is split")
    x = node.inputs[0]
    a = rw.st(x).axis
    s_in, s_out = rw.shape(x), rw.shape(node.outputs[0])
    # back to the shape of a split tensor, read at run time: Reshape(t, Shape(y)) is split like y (and reads
    # y's local shape, not the full one ``shape`` made for everyone else)
    target_shape = node.inputs[1] if len(node.inputs) > 1 else None
    local_shape = rw.local_shapes.get(target_shape.name) if target_shape is not None else None
    shape_src = (local_shape or target_shape).producer() if target_shape is not None else None
    if (
        shape_src is not None and shape_src.op_type == "Shape" and not shape_src.attributes
        and rw.st(shape_src.inputs[0]) is not None and rw.shape(shape_src.inputs[0]) == s_out
    ):
        if local_shape is not None:
            node.replace_input_with(1, local_shape)
        y = rw.st(shape_src.inputs[0])
        rw.set_out(node, Split(y.axis, origins | y.origins, y.sections))
        return None
    # quantization blocks of the split last axis ([..., C] -> [-1, block], MX activations): rows are
    # per-rank blocks in no global order, fine for row-wise math until a Reshape(.., Shape(y)) above
    if (
        s_in is not None and s_out is not None and len(s_out) == 2 and a == len(s_in) - 1
        and s_out[1] and 1 < s_out[1] < s_in[a] and s_in[a] % s_out[1] == 0
        and rw.shape_elem(node.inputs[1], 0) == ("const", -1)
    ):
        if s_in[a] % rw.tp or (s_in[a] // rw.tp) % s_out[1]:
            # a rank's slice would cut through a quantization block: keep the producers replicated
            return demote(origins, f"{node.name}: shards of {s_in[a] // rw.tp} split blocks of {s_out[1]}")
        rw.set_out(node, Split(0, origins, BLOCKED_ROWS))
        return None
    if s_in is None or s_out is None or any(d is None for d in s_in) or any(d is None for d in s_out):
        return gather("reshape between shapes not known at plan time")
    sections = rw.st(x).sections
    if sections != 1 and sections != BLOCKED_ROWS:
        return _reshape_fused(rw, node, a, s_in, s_out, sections, origins)
    prefix = math.prod(s_in[:a])
    target = None
    acc = 1
    for b, d in enumerate(s_out):
        if acc == prefix and d != 1:
            target = b
            break
        acc *= d
    if target is None:
        return gather("the split axis merges with the axes before it")
    # the split dim must be the outer part of the output group: sizes nest one way or the other
    if s_out[target] % rw.tp or s_in[a] % rw.tp:
        return demote(origins, f"{node.name}: reshape of split axis to {s_out[target]} not divisible by {rw.tp}")
    if not (s_out[target] % s_in[a] == 0 or s_in[a] % s_out[target] == 0):
        return gather(f"split axis of {s_in[a]} regroups into {s_out[target]}")
    refusal = rw.set_shape_dim(node, 1, target, s_out[target], origins)
    if refusal is not None:
        return refusal
    rw.set_out(node, Split(target, origins, sections))
    return None


def _reshape_fused(rw: RankRewriter, node: ir.Node, a: int, s_in, s_out, sections, origins: frozenset) -> Refusal | None:
    """A fused column output kept whole along its axis, or regrouped from features into heads (Falcon's
    ``[.., (q+k+v) * d] -> [.., q+k+v, d]``): the blocks are counted in the new unit."""
    if a == len(s_in) - 1 and s_out[-1] == s_in[a]:  # the fused last axis kept, leading axes regrouped
        target, new = len(s_out) - 1, sections
    elif list(s_out[:a]) == list(s_in[:a]) and list(s_out[a:]) == list(s_in[a:]):
        target, new = a, sections
    elif list(s_out[:a]) == list(s_in[:a]) and len(s_out) == len(s_in) + 1:
        target, new = a, regroup(sections, s_in[a], s_out[a], rw.tp)
    else:
        target, new = a, None
    if new is None:
        return gather("reshape of an axis of fused blocks")
    refusal = rw.set_shape_dim(node, 1, target, s_out[target], origins, local=local_size(new, s_out[target], rw.tp))
    if refusal is not None:
        return refusal
    rw.set_out(node, Split(target, origins, new))
    return None


def unsqueeze(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    ins = node.inputs
    axes = rw.const_array(ins[1]) if len(ins) > 1 else np.array(node.attributes["axes"].as_ints())
    if axes is None:
        return gather("axes computed at run time")
    r = len(rw.shape(node.outputs[0]))
    axes = sorted(norm_axis(int(a), r) for a in np.atleast_1d(axes))
    kept = [i for i in range(r) if i not in axes]
    rw.set_out(node, Split(kept[rw.st(ins[0]).axis], origins, rw.st(ins[0]).sections))
    return None


def squeeze(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    ins = node.inputs
    a = rw.st(ins[0]).axis
    in_shape = rw.shape(ins[0])
    if len(ins) > 1 and ins[1] is not None:
        axes = rw.const_array(ins[1])
        if axes is None:
            return gather("axes computed at run time")
        axes = [norm_axis(int(x), len(in_shape)) for x in np.atleast_1d(axes)]
    else:
        axes = [i for i, d in enumerate(in_shape) if d == 1]
    if a in axes:
        return gather("squeeze of the split axis")
    rw.set_out(node, Split(a - sum(1 for x in axes if x < a), origins, rw.st(ins[0]).sections))
    return None


def expand(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    if split_inputs != [0]:
        return gather("the target shape is split")
    x = node.inputs[0]
    in_shape, out_shape = rw.shape(x), rw.shape(node.outputs[0])
    a = rw.st(x).axis + (len(out_shape) - len(in_shape))
    if in_shape[rw.st(x).axis] != out_shape[a]:
        return gather("expansion along the split axis")
    refusal = rw.set_shape_dim(node, 1, a, out_shape[a], origins)
    if refusal is not None:
        return refusal
    rw.set_out(node, Split(a, origins))
    return None


def concat(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    out_shape = rw.shape(node.outputs[0])
    axis = norm_axis(node.attributes["axis"].as_int(), len(out_shape))
    axes = {rw.st(node.inputs[i]).axis for i in split_inputs}
    if len(axes) != 1:
        return gather("inputs split on different axes")
    a = axes.pop()
    if a == axis:
        return gather("concatenation along the split axis")
    for i, v in enumerate(node.inputs):
        if i not in split_inputs:
            if rw.shape(v)[a] == 1 and out_shape[a] != 1:
                return gather(f"operand {v.name!r} broadcasts along the split axis")
            refusal = rw.slice_operand(node, i, a)  # a KV-cache graph input becomes split here
            if refusal is not None:
                return refusal
    origins = frozenset().union(*(rw.st(v).origins for v in node.inputs if rw.st(v) is not None))
    rw.set_out(node, Split(a, origins))
    return None


def split_or_slice(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """Cuts along other axes keep the split; a fused Q|K|V Split or Slice (see ``fused``) cuts per block."""
    if split_inputs != [0]:
        return gather("split sizes or slice bounds are split")
    ins = node.inputs
    x = rw.st(ins[0])
    a = x.axis
    r = len(rw.shape(ins[0]))
    if node.op_type == "Split":
        axes = [norm_axis(attr_int(node, "axis", 0), r)]
    else:
        starts = rw.const_array(ins[1])
        axes_v = rw.const_array(ins[3]) if len(ins) > 3 and ins[3] is not None else np.arange(
            len(np.atleast_1d(starts if starts is not None else [0] * r)))
        if axes_v is None:
            return gather("slice axes computed at run time")
        axes = [norm_axis(int(v), r) for v in np.atleast_1d(axes_v)]
    if node.op_type == "Split" and a in axes and node.name in rw.fused_splits and x.sections != 1:
        return cut_split(rw, node, origins)
    if node.op_type == "Slice" and a in axes and node.name in rw.fused_slices and x.sections != 1:
        return cut_slice(rw, node, origins)
    if a in axes:
        return gather(f"{node.op_type} along the split axis")
    rw.set_out(node, Split(a, origins, x.sections))
    return None


def shape(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """The shape of a split tensor is replicated: it must hold the unsharded sizes, as in the source graph, or
    shapes computed from it at run time (diffusers' ``head_dim = inner_dim // heads``, T5's views) come out
    per rank while other operands stay full. The split axis's element is set to its full size; Reshape/Expand
    targets built from it are then cut per rank where they meet the split tensor (``rw.set_shape_dim``)."""
    x = rw.st(node.inputs[0])
    full = rw.shape(node.inputs[0])
    rw.set_out(node, None)
    if x.sections == BLOCKED_ROWS or not full:
        return None  # rows of quantization blocks: only the Reshape(.., Shape(y)) back reads these
    rank = len(full)
    start = norm_axis(attr_int(node, "start", 0), rank)
    end = attr_int(node, "end", rank)
    end = min(norm_axis(end, rank) if end < 0 else end, rank)
    if not start <= x.axis < end:
        return None
    if full[x.axis] is None:
        return gather("the split axis has no static size")
    keep = np.ones(end - start, dtype=np.int64)
    keep[x.axis - start] = 0
    fill = np.zeros(end - start, dtype=np.int64)
    fill[x.axis - start] = full[x.axis]
    out = node.outputs[0]
    original = out.name
    uses = list(out.uses())
    was_output = [i for i, o in enumerate(rw.graph.outputs) if o is out]
    out.name = f"{original}__tp_local"
    masked = ir.Node("", "Mul", [out, rw.int_const(keep, "keep")], name=rw.fresh("mul"))
    masked.outputs[0].name = masked.name + "_out"
    whole = ir.Node("", "Add", [masked.outputs[0], rw.int_const(fill, "full_dim")], name=rw.fresh("add"))
    whole.outputs[0].name = original
    whole.outputs[0].dtype = ir.DataType.INT64
    rw.graph.insert_after(node, [masked, whole])
    for use in uses:
        use.node.replace_input_with(use.idx, whole.outputs[0])
    for i in was_output:
        rw.graph.outputs[i] = whole.outputs[0]
    for v in (out, masked.outputs[0], whole.outputs[0]):
        rw.shapes[v.name] = (end - start,)
        rw.state[v.name] = None
    rw.local_shapes[original] = out
    return None


def channel_norm(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """BatchNorm/InstanceNorm over split channels: their per-channel parameters are sliced alike."""
    ins = node.inputs
    if split_inputs != [0] or rw.st(ins[0]).axis != 1:
        return gather("normalisation of a tensor not split on channels")
    for i in range(1, len(ins)):
        if ins[i] is not None:
            refusal = rw.slice_operand(node, i, 0)
            if refusal is not None:
                return refusal
    rw.set_out(node, None)  # running statistics outputs (training mode) stay replicated
    rw.state[node.outputs[0].name] = Split(1, origins)
    return None


def per_channel(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """Pooling and Resize work channel by channel; Resize's ``sizes`` input is made per rank."""
    ins = node.inputs
    if split_inputs != [0] or rw.st(ins[0]).axis != 1:
        return gather(f"{node.op_type} of a tensor not split on channels")
    if node.op_type == "Resize" and len(ins) > 3 and ins[3] is not None:
        refusal = rw.set_shape_dim(node, 3, 1, rw.shape(node.outputs[0])[1], origins)
        if refusal is not None:
            return refusal
    rw.set_out(node, Split(1, origins))
    return None


FLOW_HANDLERS = {
    **{op: unary for op in UNARY_OPS},
    "QuantizeLinear": quantize_linear,
    "DequantizeLinear": quantize_linear,
    **{op: elementwise for op in BINARY_OPS},
    **{op: softmax for op in ("Softmax", "LogSoftmax", "Hardmax")},
    **{op: reduce for op in REDUCE_OPS},
    "LayerNormalization": layer_norm,
    "Transpose": transpose,
    "Reshape": reshape,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
    "Expand": expand,
    "Concat": concat,
    "Split": split_or_slice,
    "Slice": split_or_slice,
    "Shape": shape,
    "BatchNormalization": channel_norm,
    "InstanceNormalization": channel_norm,
    **{op: per_channel for op in (*CHANNEL_OPS, "Resize")},
}
