"""The tensor-parallel planner: finds which weight ops split so that every reshape divides, and says why not.

``plan`` rewrites rank 0 on a clone; when a handler answers ``DEMOTE`` (a head count or quantization block
that does not divide by tp, as in grouped-query attention with fewer KV heads than ranks), the ops that made
the split are kept replicated and it plans again. It returns a ``Plan``: the demoted ops with their reasons,
every refusal the rewrite went on from (gathers, weight ops left replicated), the finished rank-0 rewrite,
and, when the model cannot be split at this degree, ``reason`` (the way onnxscript's rewriter reports
``MatchResult.fail(reason)``; ``Plan.check()`` turns it into the user-facing error). ``rewrite_rank`` then
rewrites any rank with that plan and cleans the result up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError, UnsupportedModelError, UserError

from .handlers import SOURCE_HANDLERS, SPLIT_HANDLERS
from .layout import COLLECTIVE_DOMAIN, UNSUPPORTED, Refusal, TpFragment
from .partial import PARTIAL_HANDLERS
from .rewriter import RankRewriter
from .shapes import infer_full_shapes

MAX_PLAN_ROUNDS = 64
MAX_REASONS_SHOWN = 3


@dataclass
class Plan:
    """The outcome of planning ``tp``-way tensor parallelism over one model."""

    tp: int
    shapes: dict[str, tuple]
    demoted: dict[str, str] = field(default_factory=dict)  # weight op -> why it stays replicated
    refusals: list[Refusal] = field(default_factory=list)  # rank 0's rewrite: gathers and unsplit weight ops
    rank0: tuple[ir.Model, TpFragment] | None = None  # the finished (not yet cleaned up) rank-0 rewrite
    reason: str | None = None  # set when the model cannot be split at this degree
    error: type[UserError] = UnsupportedModelError
    ep: bool = False  # MoE experts placed whole on the ranks (expert parallel) instead of split

    @property
    def ok(self) -> bool:
        return self.reason is None

    def fail(self, reason: str, error: type[UserError] = UnsupportedModelError) -> Plan:
        self.reason, self.error = reason, error
        return self

    def check(self) -> Plan:
        """This plan, or the user-facing error that says why there is none."""
        if self.reason is not None:
            raise self.error(self.reason)
        return self

    def take_rank0(self) -> tuple[ir.Model, TpFragment]:
        """The rank-0 rewrite, handed over once (the plan keeps no reference to the model)."""
        rank0, self.rank0 = self.rank0, None
        if rank0 is None:
            raise RuntimeError("tensor-parallel plan has no rank-0 rewrite to hand over")
        return rank0


def name_nodes(model: ir.Model) -> None:
    """Give every node a unique name: demotion and refusals refer to nodes by name."""
    seen = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"n{i}_{node.op_type}"
        seen.add(node.name)


def plan(model: ir.Model, tp: int, shapes: dict[str, tuple] | None = None, ep: bool = False) -> Plan:
    """Plan ``tp``-way tensor parallelism for ``model`` (its nodes are named; otherwise it is not modified).
    ``ep``: MoE experts are placed whole on the ``tp`` ranks (expert parallel) instead of each being split."""
    if tp < 1:
        raise InvalidOptionError(f"--tp {tp} is invalid: the tensor-parallel degree must be >= 1")
    name_nodes(model)
    result = Plan(tp, shapes if shapes is not None else infer_full_shapes(model), ep=ep)
    for _ in range(MAX_PLAN_ROUNDS):
        trial = model.clone()
        rewriter = _rewriter(trial, tp, 0, result.shapes, result.demoted, ep)
        refusal = rewriter.run()
        result.refusals = rewriter.refusals
        if refusal is None:
            result.rank0 = (trial, rewriter.fragment)
            if not rewriter.fragment.tensors:
                return result.fail(_divides_nothing(tp, rewriter.refusals), InvalidOptionError)
            if ep and not any(t["kind"] == "expert" for t in rewriter.fragment.tensors.values()):
                return result.fail(f"--ep {tp}: this model has no mixture-of-experts block whose experts could be "
                                   "placed on ranks; drop --ep", InvalidOptionError)
            return result
        if refusal.action == UNSUPPORTED:
            return result.fail(refusal.reason)
        new = {o for o in refusal.origins if not str(o).startswith("input:")}
        if not new - result.demoted.keys():
            return result.fail(f"tensor parallel --tp {tp}: cannot split {refusal.reason}; try a smaller --tp")
        for origin in sorted(new - result.demoted.keys()):
            result.demoted[origin] = refusal.reason
    return result.fail(f"tensor parallel --tp {tp}: planning did not converge; try a smaller --tp")


def _rewriter(model: ir.Model, tp: int, rank: int, shapes: dict[str, tuple], demoted: Mapping[str, str],
              ep: bool = False) -> RankRewriter:
    return RankRewriter(model, tp, rank, shapes, demoted, source_handlers=SOURCE_HANDLERS, split_handlers=SPLIT_HANDLERS,
                        partial_handlers=PARTIAL_HANDLERS, ep=ep)


def _divides_nothing(tp: int, refusals: list[Refusal]) -> str:
    reasons = "; ".join(str(r) for r in refusals[:MAX_REASONS_SHOWN])
    more = f" (+{len(refusals) - MAX_REASONS_SHOWN} more)" if len(refusals) > MAX_REASONS_SHOWN else ""
    why = f" ({reasons}{more})" if reasons else ""
    return f"--tp {tp} divides none of this model's heads, hidden sizes, channels or vocab: choose a --tp that divides them{why}"


def rewrite_rank(model: ir.Model, tp: int, rank: int, demoted: Mapping[str, str] | set[str],
                 shapes: dict[str, tuple], ep: bool = False) -> tuple[ir.Model, TpFragment]:
    """This rank's model (``model`` is modified; pass a clone) under a plan's demotions. Weights are lazy slices."""
    if not isinstance(demoted, Mapping):
        demoted = dict.fromkeys(demoted, "kept replicated by the plan")
    rewriter = _rewriter(model, tp, rank, shapes, demoted, ep)
    refusal = rewriter.run()
    if refusal is not None:  # the plan was made on rank 0 and every rank's rewrite takes the same path
        raise UnsupportedModelError(f"tensor parallel --tp {tp} rank {rank}: {refusal}")
    fragment = rewriter.fragment
    fragment.demoted = sorted(demoted)
    finalize(model)
    return model, fragment


def finalize(model: ir.Model) -> None:
    """Drop what the rewrite left unused, forget per-rank-wrong shape annotations, declare the collectives."""
    _remove_dead(model)
    graph = model.graph
    io = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    for node in graph:
        for out in node.outputs:
            if id(out) not in io:
                # per-rank sizes differ from the exporter's annotations: keep rank and dtype, let ORT infer sizes
                if out.shape is not None:
                    out.shape = ir.Shape([None] * len(out.shape))
                elif out.type is not None:
                    out.type = None
    if any(n.domain == COLLECTIVE_DOMAIN for n in graph):
        model.opset_imports.setdefault(COLLECTIVE_DOMAIN, 1)
        graph.opset_imports.setdefault(COLLECTIVE_DOMAIN, 1)


def _remove_dead(model: ir.Model) -> None:
    graph = model.graph
    live = {v.name for v in graph.outputs}
    for node in reversed(list(graph)):
        if any(o.name in live for o in node.outputs) or (node.domain == COLLECTIVE_DOMAIN and any(o.uses() for o in node.outputs)):
            for v in node.inputs:
                if v is not None:
                    live.add(v.name)
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    for n in attr.as_graph():
                        live.update(x.name for x in n.inputs if x is not None)
        else:
            for i in range(len(node.inputs)):
                node.replace_input_with(i, None)  # drop its uses so orphaned initializers can go too
            graph.remove(node, safe=False)
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
    # sharded weights take back their source name when the full weight is gone
    for name in list(graph.initializers):
        if name.endswith("__tp"):
            base = name[: -len("__tp")]
            if base not in graph.initializers:
                value = graph.initializers.pop(name)
                value.name = base
                value.const_value.name = base
                graph.initializers[base] = value
