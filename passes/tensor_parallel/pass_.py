"""The tensor-parallel entry points: ``TensorParallelPass`` (one rank's model, as an onnx_ir pass with a typed
result) and ``split_model`` (all ranks plus the manifest fragment the pipeline pass and partition writer read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.errors import InvalidOptionError

from .layout import Refusal, TpFragment
from .planner import Plan, finalize, name_nodes, plan, rewrite_rank


@dataclass
class TensorParallelResult(onnx_ir.passes.PassResult):
    """One rank's model and what it took: the plan, the collectives (graph order) and this rank's bytes."""

    plan: Plan | None = None
    fragment: TpFragment = field(default_factory=TpFragment)
    weight_bytes: int = 0  # initializer bytes of this rank's model (lazy slices are not read to count them)

    @property
    def collectives(self) -> list[dict[str, Any]]:
        return self.fragment.collectives

    @property
    def collective_bytes_per_token(self) -> int | None:
        """Payload of this rank's collectives per token (before the ring's 2(tp-1)/tp factor); None when a
        collective's dtype or size is unknown (a model without value types: run shape inference first)."""
        if any(c.get("dtype") is None or c.get("elements_per_token") is None for c in self.collectives):
            return None
        return sum(int(c["elements_per_token"] * ir.DataType[c["dtype"]].itemsize) for c in self.collectives)

    @property
    def refusals(self) -> list[Refusal]:
        return self.plan.refusals if self.plan is not None else []


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


class TensorParallelPass(onnx_ir.passes.FunctionalPass):
    """The model of tensor-parallel rank ``rank`` out of ``tp`` (Megatron layout, com.microsoft collectives)."""

    def __init__(self, tp: int, rank: int = 0, ep: bool = False):
        super().__init__()
        if not 0 <= rank < tp:
            raise InvalidOptionError(f"rank {rank} is outside 0..{tp - 1}: pass a rank below --tp")
        self.tp = tp
        self.rank = rank
        self.ep = ep  # MoE experts placed whole on the ranks instead of split

    def call(self, model: ir.Model) -> TensorParallelResult:
        model = model.clone()  # a functional pass hands back a new model, even when nothing is split
        if self.tp == 1:
            return TensorParallelResult(model, False, weight_bytes=weight_bytes(model))
        found = plan(model, self.tp, ep=self.ep).check()
        if self.rank == 0:
            rank_model, fragment = found.take_rank0()
            fragment.demoted = sorted(found.demoted)
            finalize(rank_model)
        else:
            found.rank0 = None
            rank_model, fragment = rewrite_rank(model, self.tp, self.rank, found.demoted, found.shapes, self.ep)
        return TensorParallelResult(rank_model, True, plan=found, fragment=fragment, weight_bytes=weight_bytes(rank_model))


def split_model(model: ir.Model, tp: int, shapes: dict[str, tuple] | None = None,
                consume: bool = False, ep: bool = False) -> tuple[list[ir.Model], dict[str, Any]]:
    """``tp`` rank models (lazy weight slices, tensors shared with ``model``) and the manifest fragment.

    Fragment keys: ``inputs``/``outputs`` (split ones only), ``collectives`` (graph order, identical per
    rank), ``tensors`` (source initializer -> kind, axis, full shape, per-rank ranges), ``demoted``.
    ``consume``: the caller gives ``model`` up; the last rank is rewritten in it instead of in a clone.
    ``ep``: MoE experts are placed whole on the ranks (expert parallel; tensors of kind ``expert``).
    """
    if tp == 1:
        return [model], {"inputs": {}, "outputs": {}, "collectives": [], "tensors": {}, "demoted": []}
    name_nodes(model)
    found = plan(model, tp, shapes, ep=ep).check()
    rank0, fragment = found.take_rank0()
    fragment.demoted = sorted(found.demoted)
    finalize(rank0)
    ranks = [rank0]
    for rank in range(1, tp):
        base = model if consume and rank == tp - 1 else model.clone()
        rank_model, _ = rewrite_rank(base, tp, rank, found.demoted, found.shapes, ep)
        ranks.append(rank_model)
    result = fragment.as_dict()
    result["demoted"] = fragment.demoted
    return ranks, result
