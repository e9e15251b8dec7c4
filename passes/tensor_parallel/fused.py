"""Fused projections: a column-parallel output that is later cut into blocks (Q|K|V, gate|up) is split block by
block, so each rank's fused weight is ``[q_r | k_r | v_r]`` and no AllGather is needed.

``fused_segments`` looks ahead from the column output (through bias Adds, Squeeze/Unsqueeze and a Reshape to
heads) to the ``Split`` or the set of ``Slice`` nodes that cut it, and returns the blocks as
``(size, split)`` segments (``layout.Sections``): a block whose head count does not divide by tp (Falcon's
single K/V head, GQA with fewer KV heads than ranks) is held whole by every rank. Equal blocks that all
split come back as a block count (the GPT-2 layout). ``cut_split`` and ``cut_slice`` then rewrite that
Split / those Slices per rank.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .layout import Refusal, Split, gather, norm_axis, segments
from .rewriter import RankRewriter

LOOKAHEAD = 6  # ops followed from a column output to the node that cuts it into blocks
INT64_MAX = np.iinfo(np.int64).max


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    return node.attributes[name].as_int() if name in node.attributes else default


def _heads(rw: RankRewriter, value: ir.Value, axis: int, size: int) -> int:
    """The head count of a block of ``size`` on ``axis``: its Reshape to ``[.., heads, head_dim]``, else ``size``."""
    consumers = value.consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Reshape" and consumers[0].inputs[0] is value:
        s_in, s_out = rw.shape(value), rw.shape(consumers[0].outputs[0])
        if s_in and s_out and len(s_out) == len(s_in) + 1 and list(s_out[:axis]) == list(s_in[:axis]) \
                and s_out[axis] and s_out[axis] * (s_out[axis + 1] or 0) == size:
            return int(s_out[axis])
    return size


def _split_sizes(rw: RankRewriter, node: ir.Node, dim: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = rw.const_array(node.inputs[1])
        return None if sizes is None else [int(x) for x in np.atleast_1d(sizes)]
    n = len(node.outputs)
    return [dim // n] * n if n > 1 and dim % n == 0 else None


def _slice_cut(rw: RankRewriter, node: ir.Node, axis: int, dim: int) -> tuple[int, int] | None:
    """``[start, stop)`` of a Slice along ``axis`` alone, with constant bounds and step 1."""
    ins = node.inputs
    if node.op_type != "Slice" or len(ins) < 3:
        return None
    starts, ends = rw.const_array(ins[1]), rw.const_array(ins[2])
    axes = rw.const_array(ins[3]) if len(ins) > 3 and ins[3] is not None else np.array([0])
    steps = rw.const_array(ins[4]) if len(ins) > 4 and ins[4] is not None else np.array([1])
    if starts is None or ends is None or axes is None or steps is None or np.size(starts) != 1 or np.size(steps) != 1:
        return None
    r = len(rw.shape(ins[0]))
    if norm_axis(int(np.ravel(axes)[0]), r) != axis or int(np.ravel(steps)[0]) != 1:
        return None
    start, stop = int(np.ravel(starts)[0]), int(np.ravel(ends)[0])
    start, stop = (start + dim if start < 0 else start), (stop + dim if stop < 0 else min(stop, dim))
    return (start, stop) if 0 <= start < stop <= dim else None


def _as_sections(blocks: list[tuple[int, bool]]):
    if not any(split for _, split in blocks):
        return None
    if all(split for _, split in blocks) and len({n for n, _ in blocks}) == 1:
        return len(blocks)  # equal blocks, all split: the GPT-2 layout
    return tuple(blocks)


def fused_segments(rw: RankRewriter, value: ir.Value, axis: int):
    """Blocks the column output ``value`` is cut into along ``axis``: 1 (none), a block count, a tuple of
    ``(size, split)`` segments, or None when it is cut into blocks none of which divides by tp."""
    shape = rw.shape(value)
    if not shape or shape[axis] is None:
        return 1
    unit = 1  # elements of the column output per index of ``axis`` (head_dim after a Reshape to heads)
    for _ in range(LOOKAHEAD):
        consumers = value.consumers()
        dim = shape[axis]
        if len(consumers) > 1 and all(c.op_type == "Slice" and c.inputs[0] is value for c in consumers):
            cuts = [_slice_cut(rw, c, axis, dim) for c in consumers]
            if any(c is None for c in cuts):
                return 1
            order = sorted(range(len(cuts)), key=lambda i: cuts[i])
            if cuts[order[0]][0] != 0 or cuts[order[-1]][1] != dim or any(
                    cuts[a][1] != cuts[b][0] for a, b in zip(order, order[1:])):
                return 1  # not a tiling of the axis
            blocks = []
            for k, i in enumerate(order):
                n = cuts[i][1] - cuts[i][0]
                heads = n if unit > 1 else _heads(rw, consumers[i].outputs[0], axis, n)
                blocks.append((n * unit, heads % rw.tp == 0))
                rw.fused_slices[consumers[i].name] = k
            return _as_sections(blocks)
        if len(consumers) != 1:
            return 1
        node = consumers[0]
        out_shape = rw.shape(node.outputs[0]) if node.outputs else None
        if node.op_type == "Split" and node.inputs[0] is value:
            if norm_axis(_attr_int(node, "axis", 0), len(shape)) != axis:
                return 1
            sizes = _split_sizes(rw, node, dim)
            if not sizes or len(sizes) < 2 or sum(sizes) != dim:
                return 1
            blocks = []
            for out, n in zip(node.outputs, sizes):
                heads = n if unit > 1 else _heads(rw, out, axis, n)
                blocks.append((n * unit, heads % rw.tp == 0))
            rw.fused_splits.add(node.name)
            return _as_sections(blocks)
        if not out_shape:
            return 1
        if node.op_type in ("Add", "Identity", "Cast") and len(out_shape) == len(shape) and out_shape[axis] == dim:
            value, shape = node.outputs[0], out_shape
            continue
        if node.op_type == "Reshape" and node.inputs[0] is value and axis == len(shape) - 1 and out_shape[-1] == dim:
            value, shape, axis = node.outputs[0], out_shape, len(out_shape) - 1  # leading axes regrouped
            continue
        if node.op_type == "Reshape" and node.inputs[0] is value and list(out_shape[:axis]) == list(shape[:axis]):
            if list(out_shape[axis:]) == list(shape[axis:]):
                value, shape = node.outputs[0], out_shape
                continue
            if unit == 1 and axis == len(shape) - 1 and len(out_shape) == len(shape) + 1 and out_shape[axis] \
                    and out_shape[axis] * (out_shape[axis + 1] or 0) == dim:
                unit = int(out_shape[axis + 1])  # to heads: blocks are counted in heads from here
                value, shape = node.outputs[0], out_shape
                continue
            return 1
        if node.op_type in ("Squeeze", "Unsqueeze") and len(node.inputs) > 1:
            axes = rw.const_array(node.inputs[1])
            if axes is None:
                return 1
            if node.op_type == "Squeeze":
                gone = {norm_axis(int(a), len(shape)) for a in np.atleast_1d(axes)}
                if axis in gone:
                    return 1
                axis -= sum(1 for a in gone if a < axis)
            else:
                added = sorted(norm_axis(int(a), len(out_shape)) for a in np.atleast_1d(axes))
                kept = [i for i in range(len(out_shape)) if i not in added]
                axis = kept[axis]
            value, shape = node.outputs[0], out_shape
            continue
        return 1
    return 1


def regroup(sections, size: int, new_size: int, tp: int):
    """``sections`` of an axis of ``size`` reshaped into ``new_size`` groups (features -> heads), or None."""
    if size % new_size:
        return None
    inner = size // new_size
    blocks = []
    for n, split in segments(sections, size):
        if n % inner or (split and (n // inner) % tp):
            return None
        blocks.append((n // inner, split))
    return tuple(blocks)


def cut_split(rw: RankRewriter, node: ir.Node, origins: frozenset) -> Refusal | None:
    """The Split that cuts a fused output into its blocks: each rank cuts its parts; unsplit blocks are replicated."""
    x = rw.st(node.inputs[0])
    dim = rw.shape(node.inputs[0])[x.axis]
    segs = segments(x.sections, dim)
    if len(segs) != len(node.outputs):
        return gather("a fused Split with a different number of blocks")
    if len(node.inputs) > 1 and node.inputs[1] is not None and rw.const_array(node.inputs[1]) is None:
        return gather("split sizes computed at run time")
    local = [n // rw.tp if split else n for n, split in segs]
    if "num_outputs" in node.attributes:
        if len(set(local)) == 1:
            pass  # still equal parts
        else:
            del node.attributes["num_outputs"]
            node.resize_inputs(2)
    if len(node.inputs) > 1:
        node.replace_input_with(1, rw.int_const(local, "split_sizes"))
    for out, (n, split) in zip(node.outputs, segs):
        rw.state[out.name] = Split(x.axis, origins) if split else None
    return None


def cut_slice(rw: RankRewriter, node: ir.Node, origins: frozenset) -> Refusal | None:
    """One Slice of a fused output: this rank's part of its block (or all of an unsplit block)."""
    x = rw.st(node.inputs[0])
    dim = rw.shape(node.inputs[0])[x.axis]
    segs = segments(x.sections, dim)
    k = rw.fused_slices[node.name]
    if k >= len(segs):
        return gather("a fused Slice outside the blocks")
    start = sum(n // rw.tp if split else n for n, split in segs[:k])
    n, split = segs[k]
    stop = start + (n // rw.tp if split else n)
    node.replace_input_with(1, rw.int_const([start], "starts"))
    node.replace_input_with(2, rw.int_const([stop], "ends"))
    rw.state[node.outputs[0].name] = Split(x.axis, origins) if split else None
    return None
