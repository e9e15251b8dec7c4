"""Mixture-of-experts blocks: expert weights split evenly over the ranks, the router kept replicated.

Exported MoE layers (transformers' ``batched_mm`` experts: Mixtral, Qwen2/3-MoE) look every routed token's
expert weights up from one stacked table, ``GatherND(W[E, out, in], expert_ids)`` (or ``Gather`` on axis 0),
and multiply them in a batched MatMul. Two layouts:

* **tensor parallel** (default, as vLLM's fused MoE): every expert's gate/up rows are column-parallel (the
  table sliced on its output axis, fused gate|up cut block by block, see ``fused``) and its down projection
  row-parallel; the down product is a partial sum carried through the routing-weight scale and the top-k sum
  (``partial``), so each MoE block ends in ONE AllReduce;
* **expert parallel** (``ep``): rank r holds experts ``[r*E/tp, (r+1)*E/tp)`` whole; the expert ids are made
  local (ids it does not own look up its first expert and their down products are zeroed), and the down
  product is a partial sum as above.

The router (the small gate projection feeding Softmax/TopK) needs every expert's score: a TopK over a split
axis demotes it to replicated (``router_topk``).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_ir as ir

from .fused import fused_segments
from .layout import Refusal, Split, demote, divides, norm_axis, refused, replicate, unsupported
from .rewriter import RankRewriter

CHAIN_LOOKAHEAD = 16  # nodes walked from an expert's first product to its down projection
ROUTER_LOOKAHEAD = 3  # single-consumer ops from a softmax over the experts to the TopK that routes


def expert_lookup(rw: RankRewriter, value: ir.Value | None) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """``(lookup node, table, ids)`` when ``value`` is a run-time lookup of a stacked expert table
    ``W[E, a, b]`` (``GatherND`` with ``[..., 1]`` ids, or ``Gather`` on axis 0), used by nothing else."""
    if value is None:
        return None
    prod = value.producer()
    if prod is None or prod.domain != "" or prod.op_type not in ("GatherND", "Gather"):
        return None
    table, ids = prod.inputs[0], prod.inputs[1]
    shape = rw.shape(table)
    if not rw.is_weight(table) or rw.is_weight(ids) or shape is None or len(shape) != 3:
        return None
    if prod.op_type == "GatherND":
        if "batch_dims" in prod.attributes and prod.attributes["batch_dims"].as_int() != 0:
            return None
        if (rw.shape(ids) or (None,))[-1] != 1:
            return None
    elif "axis" in prod.attributes and prod.attributes["axis"].as_int() != 0:
        return None
    if len(value.uses()) != 1 or value.is_graph_output():
        return None
    return prod, table, ids


def _expert_operand(rw: RankRewriter, node: ir.Node):
    """``(weight index, lookup)`` of an expert MatMul: one operand an expert lookup, the other an activation."""
    for wi in (0, 1):
        found = expert_lookup(rw, node.inputs[wi])
        if found is not None and expert_lookup(rw, node.inputs[1 - wi]) is None:
            return wi, found
    return None


def expert_column(rw: RankRewriter, node: ir.Node) -> Refusal | None:
    """The first product of an expert (gate/up): its output features split, or (ep) the experts placed."""
    found = _expert_operand(rw, node)
    if found is None:
        return None
    if rw.ep:
        return expert_parallel(rw, node, found)
    wi, (lookup, table, _) = found
    out = rw.shape(node.outputs[0])
    if not out or len(out) < 2:
        return None
    # W[E, out, in] on the left (x as a column: [N, out, in] @ [N, in, k]); W[E, in, out] on the right
    table_axis, out_axis = (1, len(out) - 2) if wi == 0 else (2, len(out) - 1)
    size = rw.shape(table)[table_axis]
    sections = fused_segments(rw, node.outputs[0], out_axis)
    if sections is None or not divides(size, rw.tp, sections):
        return replicate(f"expert table {table.name!r} has {size} output features, not divisible by tp {rw.tp} per block")
    shard = rw.shard_value(table, table_axis, "column", sections)
    if refused(shard):
        return shard
    lookup.replace_input_with(0, shard)
    rw.set_out(node, Split(out_axis, frozenset({node.name}), sections))
    return None


def expert_row(rw: RankRewriter, node: ir.Node) -> Refusal | None | bool:
    """The down product of an expert whose activation is split on the contraction axis: this rank's part of
    every expert's down rows, a partial sum. False when ``node`` is not such a product."""
    A, B = node.inputs
    sa, sb = rw.st(A), rw.st(B)
    ra, rb = len(rw.shape(A)), len(rw.shape(B))
    if sa is None and sb is not None and sb.axis == rb - 2 and sb.sections == 1:
        found, table_axis = expert_lookup(rw, A), 2  # W[E, out, in] @ h[N, in, k]
    elif sb is None and sa is not None and sa.axis == ra - 1 and sa.sections == 1:
        found, table_axis = expert_lookup(rw, B), 1  # h[N, k, in] @ W[E, in, out]
    else:
        return False
    if found is None:
        return False
    lookup, table, _ = found
    shard = rw.shard_value(table, table_axis, "row")
    if refused(shard):
        return shard
    lookup.replace_input_with(0, shard)
    rw.set_out(node, None)
    rw.mark_partial(node.outputs[0], frozenset({node.name}))
    return None


# ------------------------------------------------------------------------------------ expert parallel


def _feeds_expert_product(rw: RankRewriter, node: ir.Node, ids: ir.Value) -> bool:
    """Whether the output of expert product ``node`` reaches another expert product over the same ids."""
    seen, queue = set(), deque(node.outputs[0].consumers())
    while queue and len(seen) < CHAIN_LOOKAHEAD:
        n = queue.popleft()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type == "MatMul" and n is not node:
            other = _expert_operand(rw, n)
            if other is not None and other[1][2] is ids:
                return True
        for out in n.outputs:
            queue.extend(out.consumers())
    return False


def _local_ids(rw: RankRewriter, before: ir.Node, ids: ir.Value, n_local: int) -> tuple[ir.Value, ir.Value]:
    """(ids of this rank's experts with foreign ids at 0, mask of foreign ids), shared by the block's lookups."""
    key = ("ep_ids", ids.name)
    if key in rw.shard_cache:
        return rw.shard_cache[key]
    safe, foreign = rw.local_ids(before, ids, n_local, "expert")
    for v in (safe, foreign):
        rw.state[v.name] = None
    rw.shard_cache[key] = (safe, foreign)
    return safe, foreign


def expert_parallel(rw: RankRewriter, node: ir.Node, found) -> Refusal | None:
    """Expert-parallel product: this rank's experts only; the down product keeps only the ids it owns."""
    wi, (lookup, table, ids) = found
    experts = rw.shape(table)[0]
    if experts % rw.tp:
        return unsupported(f"expert parallel: {experts} experts in {table.name!r} do not divide over {rw.tp} ranks; "
                           "use a --ep that divides the number of experts")
    n_local = experts // rw.tp
    shard = rw.shard_value(table, 0, "expert")
    if refused(shard):
        return shard
    safe, foreign = _local_ids(rw, lookup, ids, n_local)
    lookup.replace_input_with(0, shard)
    lookup.replace_input_with(1, safe)
    if _feeds_expert_product(rw, node, ids):
        return None  # gate/up: foreign ids compute on a stand-in expert; their down product is dropped below
    out = node.outputs[0]
    out_rank = len(rw.shape(out))
    extra = out_rank - len(rw.shape(foreign) or ())  # GatherND ids [N, 1]: the trailing 1 broadcasts
    axes = rw.int_const(list(range(-extra, 0)), "axes")
    original = out.name
    uses = list(out.uses())
    was_output = [i for i, o in enumerate(rw.graph.outputs) if o is out]
    out.name = f"{original}__ep_all"
    mask = ir.Node("", "Unsqueeze", [foreign, axes], name=rw.fresh("unsqueeze"))
    mask.outputs[0].name = mask.name + "_out"
    dtype = rw.dtype_of(out) or ir.DataType.FLOAT
    zero = rw.new_initializer(rw.fresh("zero"), ir.Tensor(np.zeros((), dtype=dtype.numpy())))
    where = ir.Node("", "Where", [mask.outputs[0], zero, out], name=rw.fresh("where"))
    kept = where.outputs[0]
    kept.name, kept.dtype = original, out.dtype
    rw.graph.insert_after(node, [mask, where])
    for use in uses:
        use.node.replace_input_with(use.idx, kept)
    for i in was_output:
        rw.graph.outputs[i] = kept
    full = rw.shape(out) or rw.shapes.get(original)
    rw.shapes[out.name] = full
    rw.shapes[original] = full
    rw.shapes[mask.outputs[0].name] = tuple(rw.shape(foreign)) + (1,) * extra if rw.shape(foreign) else None
    rw.state[out.name] = None
    rw.mark_partial(kept, frozenset({node.name}))
    return None


# ------------------------------------------------------------------------------------ the router


def feeds_topk(value: ir.Value) -> bool:
    """Whether ``value`` reaches a TopK through a few single-consumer ops (a router's scores)."""
    for _ in range(ROUTER_LOOKAHEAD):
        consumers = value.consumers()
        if len(consumers) != 1:
            return False
        if consumers[0].op_type == "TopK":
            return True
        if not consumers[0].outputs:
            return False
        value = consumers[0].outputs[0]
    return False


def router_topk(rw: RankRewriter, node: ir.Node, split_inputs: list[int], origins: frozenset) -> Refusal | None:
    """Routing picks the top-k of every expert's score: the projection that made them split stays replicated."""
    x = rw.st(node.inputs[0])
    axis = norm_axis(node.attributes["axis"].as_int() if "axis" in node.attributes else -1, len(rw.shape(node.inputs[0])))
    if split_inputs == [0] and x.axis != axis:
        rw.set_out(node, Split(x.axis, origins))
        return None
    return demote(origins, f"{node.name}: the router's top-k needs every expert's score (the router stays replicated)")
