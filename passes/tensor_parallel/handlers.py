"""Per-op rewrite handlers for the ops that hold weights: where a split starts and where it ends.

* ``SOURCE_HANDLERS`` (``handler(rw, node) -> Refusal | None``) see a node whose inputs are all replicated:
  a MatMul/Gemm/Conv with a constant weight becomes **column-parallel** (its output features or channels
  split, fused Q|K|V blocks cut per block), a ``Gather`` embedding becomes **vocab-parallel**. A weight op
  that cannot start a split answers ``layout.replicate(reason)``.
* ``SPLIT_HANDLERS`` (``handler(rw, node, split_inputs, origins) -> Refusal | None``) see a node with split
  inputs: a weight MatMul/Gemm/Conv contracting over the split axis becomes **row-parallel** (its weight
  rows sliced, one AllReduce after it, a bias kept on rank 0 only); attention MatMuls of split heads stay
  split; everything without weights is in ``flow.FLOW_HANDLERS``.

The planner hands these tables to the rank rewriter (``rewriter.RankRewriter``), which looks handlers up by op
type, so a new pattern is one function and one table entry here (or in ``flow``). Split graph outputs (LM-head
logits) are gathered by the rewriter.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .flow import FLOW_HANDLERS, attr_int
from .fused import fused_segments
from .layout import Refusal, Split, divides, gather, refused, replicate
from .moe import expert_column, expert_row, router_topk
from .rewriter import RankRewriter

MIN_VOCAB_ROWS_PER_RANK = 16  # smaller lookup tables (positions, token types) stay replicated


# ------------------------------------------------------------------------------------ where splits start


def _weight_op(rw: RankRewriter, node: ir.Node, weight: int, activation: int) -> bool:
    return rw.is_weight(node.inputs[weight]) and not rw.is_weight(node.inputs[activation])


def _not_divisible(name: str, what: str, size: int, tp: int, sections) -> Refusal:
    if sections is None:
        return replicate(f"weight {name!r}: none of the fused blocks its output is cut into has heads divisible by tp {tp}")
    parts = f"tp {tp}" if sections == 1 else f"tp {tp} x {sections} fused blocks"
    return replicate(f"weight {name!r} has {size} {what}, not divisible by {parts}")


def column_matmul(rw: RankRewriter, node: ir.Node) -> Refusal | None:
    """``x @ W`` with replicated ``x``: this rank's columns of ``W``, output split on its last axis (an expert
    product over a looked-up stacked expert table: see ``moe``)."""
    if not _weight_op(rw, node, 1, 0):
        return expert_column(rw, node)
    weight = node.inputs[1]
    w = rw.shape(weight)
    if w is None or len(w) != 2:
        return replicate(f"weight {weight.name!r} is not a matrix (shape {w})")
    out = rw.shape(node.outputs[0])
    sections = fused_segments(rw, node.outputs[0], len(out) - 1) if out else 1
    if sections is None or not divides(w[1], rw.tp, sections) or w[1] < rw.tp:
        return _not_divisible(weight.name, "output features", w[1], rw.tp, sections)
    shard = rw.shard_value(weight, 1, "column", sections)
    if refused(shard):
        return shard
    node.replace_input_with(1, shard)
    rw.set_out(node, Split(len(rw.shape(node.outputs[0])) - 1, frozenset({node.name}), sections))
    return None


def column_gemm(rw: RankRewriter, node: ir.Node) -> Refusal | None:
    if not _weight_op(rw, node, 1, 0):
        return None
    weight = node.inputs[1]
    w = rw.shape(weight)
    n_axis = 0 if attr_int(node, "transB", 0) else 1
    if w is None:
        return replicate(f"weight {weight.name!r} has an unknown shape")
    sections = fused_segments(rw, node.outputs[0], 1)
    if sections is None or not divides(w[n_axis], rw.tp, sections):
        return _not_divisible(weight.name, "output features", w[n_axis], rw.tp, sections)
    shard = rw.shard_value(weight, n_axis, "column", sections)
    if refused(shard):
        return shard
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = rw.shape(node.inputs[2])
        if c and c[-1] == w[n_axis]:
            bias = rw.shard_value(node.inputs[2], len(c) - 1, "column", sections)
            if refused(bias):
                return bias
    node.replace_input_with(1, shard)
    if bias is not None:
        node.replace_input_with(2, bias)
    rw.set_out(node, Split(1, frozenset({node.name}), sections))
    return None


def column_conv(rw: RankRewriter, node: ir.Node) -> Refusal | None:
    """Output-channel split of a plain (group 1) convolution and its bias."""
    if not _weight_op(rw, node, 1, 0):
        return None
    weight = node.inputs[1]
    group = attr_int(node, "group", 1)
    w = rw.shape(weight)
    if group != 1:
        return replicate(f"grouped convolution (group {group}) with replicated input")
    if w is None or w[0] % rw.tp:
        return _not_divisible(weight.name, "output channels", w[0] if w else 0, rw.tp, 1)
    shard = rw.shard_value(weight, 0, "column")
    if refused(shard):
        return shard
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = rw.shard_value(node.inputs[2], 0, "column")
        if refused(bias):
            return bias
    node.replace_input_with(1, shard)
    if bias is not None:
        node.replace_input_with(2, bias)
    rw.set_out(node, Split(1, frozenset({node.name})))
    return None


def embedding(rw: RankRewriter, node: ir.Node) -> Refusal | None:
    """``Gather(table, ids)`` over a large 2-D table: vocab-parallel (see ``vocab_parallel_embedding``)."""
    if not _weight_op(rw, node, 0, 1):
        return None
    w = rw.shape(node.inputs[0])
    if w is None or len(w) != 2:
        return None  # not an embedding table (a constant looked up by index)
    if attr_int(node, "axis", 0) != 0:
        return replicate("lookup along the feature axis")
    if w[0] % rw.tp:
        return _not_divisible(node.inputs[0].name, "rows", w[0], rw.tp, 1)
    if w[0] < MIN_VOCAB_ROWS_PER_RANK * rw.tp:
        return replicate(f"table {node.inputs[0].name!r} of {w[0]} rows is too small to split {rw.tp} ways")
    return vocab_parallel_embedding(rw, node)


def vocab_parallel_embedding(rw: RankRewriter, node: ir.Node) -> Refusal | None:
    """Each rank looks up its vocab rows, zeroes ids it does not own, AllReduce sums the one hit."""
    table, ids = node.inputs[0], node.inputs[1]
    vocab = rw.shape(table)[0]
    n = vocab // rw.tp
    safe, outside = rw.local_ids(node, ids, n, "vocab")
    shard = rw.shard_value(table, 0, "vocab")
    if refused(shard):
        return shard  # the id arithmetic above has no users and is dropped with the dead code
    node.replace_input_with(0, shard)
    node.replace_input_with(1, safe)
    result = node.outputs[0]
    original = result.name
    # mask after the lookup: insert Where(outside[..., None], 0, emb) between Gather and its users
    uses = list(result.uses())
    was_output = [i for i, o in enumerate(rw.graph.outputs) if o is result]
    result.name = f"{original}__tp_lookup"
    axes = rw.int_const([-1], "axes")
    mask = ir.Node("", "Unsqueeze", [outside, axes], name=rw.fresh("unsqueeze"))
    mask.outputs[0].name = mask.name + "_out"
    dtype = rw.dtype_of(result) or rw.dtype_of(table) or ir.DataType.FLOAT
    zero_f = rw.new_initializer(rw.fresh("zero"), ir.Tensor(np.zeros((), dtype=dtype.numpy())))
    where = ir.Node("", "Where", [mask.outputs[0], zero_f, result], name=rw.fresh("where"))
    where.outputs[0].name = original
    where.outputs[0].dtype = result.dtype
    rw.graph.insert_after(node, [mask, where])
    for use in uses:
        use.node.replace_input_with(use.idx, where.outputs[0])
    for i in was_output:
        rw.graph.outputs[i] = where.outputs[0]
    full = rw.shape(result) or rw.shapes.get(original)
    rw.shapes[result.name] = full
    rw.shapes[original] = full
    rw.shapes[mask.outputs[0].name] = tuple(rw.shape(ids)) + (1,) if rw.shape(ids) else None
    rw.state[result.name] = None
    rw.all_reduce(where.outputs[0])
    return None


# ------------------------------------------------------------------------------------ where splits end


def _row_parallel(rw: RankRewriter, node: ir.Node, weight_axis: int, bias: int | None) -> Refusal | None:
    """Partial sums from this rank's weight rows, summed by one AllReduce; a bias is added on rank 0 only."""
    shard = rw.shard_value(node.inputs[1], weight_axis, "row")
    if refused(shard):
        return shard
    node.replace_input_with(1, shard)
    if bias is not None and len(node.inputs) > bias and node.inputs[bias] is not None:
        node.replace_input_with(bias, rw.rank0_only(node.inputs[bias], node))
    rw.set_out(node, None)
    rw.mark_partial(node.outputs[0], frozenset({node.name}))  # AllReduced where the sum stops (see ``partial``)
    return None


def matmul(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """Row-parallel weight MatMul, or a MatMul of split operands (attention heads) that stays split."""
    A, B = node.inputs
    ra, rb = len(rw.shape(A)), len(rw.shape(B))
    r = len(rw.shape(node.outputs[0]))
    sa, sb = rw.st(A), rw.st(B)
    if sa is not None and sa.axis == ra - 1 and sb is None and rw.is_weight(B) and rb == 2:
        return _row_parallel(rw, node, 0, None)
    expert = expert_row(rw, node)
    if expert is not False:
        return expert
    if ra < 2 or rb < 2:
        return gather("matrix-vector product of a split tensor")
    # output axis each split maps to; contraction splits need a reduction we do not plan for
    out_axis = set()
    if sa is not None:
        if sa.axis == ra - 1:
            return gather("contraction over a split axis of an activation")
        out_axis.add(sa.axis + (r - ra) if sa.axis < ra - 2 else r - 2)
    if sb is not None:
        if sb.axis == rb - 2:
            return gather("contraction over a split axis of an activation")
        out_axis.add(sb.axis + (r - rb) if sb.axis < rb - 2 else r - 1)
    if len(out_axis) != 1:
        return gather("operands split on axes that map to different output axes")
    a = out_axis.pop()
    # a replicated operand with the full extent on a split batch axis must be sliced too
    if a < r - 2:
        for i, (v, rv, sv) in enumerate(((A, ra, sa), (B, rb, sb))):
            if sv is None:
                ai = a - (r - rv)
                if ai >= 0 and rw.shape(v)[ai] != 1:
                    refusal = rw.slice_operand(node, i, ai)
                    if refusal is not None:
                        return refusal
    rw.set_out(node, Split(a, origins))
    return None


def gemm(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    ins = node.inputs
    if split_inputs == [0] and rw.is_weight(ins[1]) and rw.st(ins[0]).axis == 1 and not attr_int(node, "transA", 0):
        return _row_parallel(rw, node, 1 if attr_int(node, "transB", 0) else 0, bias=2)
    return gather("Gemm whose split input is not its activation's feature axis")


def conv(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """Input-channel split: row-parallel (group 1) or depthwise convolution that stays channel-split."""
    ins = node.inputs
    if split_inputs != [0] or rw.st(ins[0]).axis != 1 or not rw.is_weight(ins[1]):
        return gather("convolution of a tensor not split on channels, or with a computed weight")
    group = attr_int(node, "group", 1)
    channels = rw.shape(ins[0])[1]
    w = rw.shape(ins[1])
    if group == 1:
        return _row_parallel(rw, node, 1, bias=2)
    if group == channels and w[0] % rw.tp == 0:  # depthwise: channels stay independent
        shard = rw.shard_value(ins[1], 0, "column")
        if refused(shard):
            return shard
        node.replace_input_with(1, shard)
        if len(ins) > 2 and ins[2] is not None:
            bias = rw.shard_value(ins[2], 0, "column")
            if refused(bias):
                return bias
            node.replace_input_with(2, bias)
        node.attributes["group"] = ir.AttrInt64("group", group // rw.tp)
        rw.set_out(node, Split(1, origins))
        return None
    return gather(f"grouped convolution (group {group} of {channels} channels) over split channels")


SOURCE_HANDLERS = {
    "MatMul": column_matmul,
    "Gemm": column_gemm,
    "Conv": column_conv,
    "Gather": embedding,
}
SPLIT_HANDLERS = {
    **FLOW_HANDLERS,
    "MatMul": matmul,
    "Gemm": gemm,
    "Conv": conv,
    "TopK": router_topk,
}
