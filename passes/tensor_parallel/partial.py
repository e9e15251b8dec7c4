"""Partial sums: where a row-parallel output may travel before its AllReduce.

A row-parallel MatMul (and an expert's down projection) leaves each rank with a partial sum of the full-shape
result. Linear ops that do not grow it (reshapes, a scale by a replicated factor, a sum over the top-k
experts, the sum of two partial sums as in Falcon's parallel attention + MLP) keep it partial, so the
AllReduce lands once per block, where the sum meets anything else (the residual Add): the way vLLM's fused
MoE reduces once after combining the experts. ``PARTIAL_HANDLERS`` maps op types to
``handler(rw, node, partial_inputs) -> Refusal | None``; a refusal makes the rewriter AllReduce first.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from .layout import Refusal, gather
from .rewriter import RankRewriter


def _origins(rw: RankRewriter, node: ir.Node, partial: list[int]) -> frozenset:
    return frozenset().union(*(rw.st(node.inputs[i]).origins for i in partial))


def _numel(shape) -> int | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return math.prod(shape)


def _no_growth(rw: RankRewriter, node: ir.Node, partial: list[int]) -> bool:
    """The output is no larger than the partial input (the AllReduce moved past it costs no more)."""
    out = _numel(rw.shape(node.outputs[0]))
    src = _numel(rw.shape(node.inputs[partial[0]]))
    return out is not None and src is not None and out <= src


def passthrough(rw: RankRewriter, node: ir.Node, partial: list[int]) -> Refusal | None:
    """Layout ops and negation: the sum of the reshaped parts is the reshaped sum."""
    if partial != [0]:
        return gather("a partial sum as a shape or axes operand")
    rw.mark_partial(node.outputs[0], _origins(rw, node, partial))
    return None


def scale(rw: RankRewriter, node: ir.Node, partial: list[int]) -> Refusal | None:
    """``partial * r`` or ``partial / r`` with a replicated ``r`` (routing weights, a norm factor)."""
    if len(partial) != 1 or (node.op_type == "Div" and partial != [0]):
        return gather("a product of partial sums")
    if not _no_growth(rw, node, partial):
        return gather("the scale would broadcast the partial sum to a larger tensor")
    rw.mark_partial(node.outputs[0], _origins(rw, node, partial))
    return None


def add(rw: RankRewriter, node: ir.Node, partial: list[int]) -> Refusal | None:
    """The sum of partial sums (parallel attention + MLP) is partial; adding a replicated term is not."""
    if len(partial) != sum(1 for v in node.inputs if v is not None):
        return gather("a replicated term added to a partial sum")
    if node.op_type == "Sub" and len(partial) != 2:
        return gather("a replicated term subtracted from a partial sum")
    shapes = {rw.shape(v) for v in node.inputs if v is not None}
    if len(shapes) != 1 or rw.shape(node.outputs[0]) not in shapes:
        return gather("partial sums of different shapes")
    rw.mark_partial(node.outputs[0], _origins(rw, node, partial))
    return None


def reduce_sum(rw: RankRewriter, node: ir.Node, partial: list[int]) -> Refusal | None:
    """A sum over an axis (the top-k experts' contributions) of a partial sum is partial."""
    return passthrough(rw, node, partial)


def shape(rw: RankRewriter, node: ir.Node, partial: list[int]) -> Refusal | None:
    rw.set_out(node, None)  # a partial sum has the full shape
    return None


PARTIAL_HANDLERS = {
    **{op: passthrough for op in ("Identity", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Flatten", "Neg")},
    "Mul": scale,
    "Div": scale,
    "Add": add,
    "Sub": add,
    "Sum": add,
    "ReduceSum": reduce_sum,
    "Shape": shape,
}
