"""The tensor-parallel vocabulary: how a value is split, why a rewrite refused, what the rewrite did.

``Split`` is the sharding state the rewriter propagates; ``Refusal`` is a handler's answer when it cannot
keep a value split (returned, never raised: the way onnxscript's rewriter answers ``MatchResult.fail(reason)``);
``TpFragment`` is the manifest fragment one rank's rewrite produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

COLLECTIVE_DOMAIN = "com.microsoft"
BLOCKED_ROWS = -1  # Split.sections marker: rows of per-rank quantization blocks (no global row order)

# what the caller of a handler does with a refusal
GATHER = "gather"  # AllGather the node's split inputs and run it replicated (the rank rewrite goes on)
REPLICATE = "replicate"  # a weight op that could start a split stays replicated (the rank rewrite goes on)
DEMOTE = "demote"  # the planner must keep ``origins`` replicated and plan again
UNSUPPORTED = "unsupported"  # the model cannot be split at this degree


# ``Split.sections``: an int k (k equal fused blocks, each split tp ways: GPT-2 Q|K|V, gate|up), BLOCKED_ROWS, or a
# tuple of ``(size, split)`` segments (fused blocks of different sizes: Phi3 Q|K|V with GQA; a segment whose
# heads do not divide by tp, such as Falcon's one K/V head, is ``split=False`` and every rank holds all of it)


@dataclass(frozen=True)
class Split:
    """A value split into ``tp`` equal contiguous chunks along ``axis``; ``origins`` made it split.

    ``partial``: not split at all but a partial sum (row-parallel output): every rank holds the full shape and
    the value is the sum over ranks; it flows through linear ops and is AllReduced where it stops (``axis``
    is then meaningless)."""

    axis: int
    origins: frozenset = frozenset()
    sections: Any = 1  # int, BLOCKED_ROWS or (size, split) segments: see above
    partial: bool = False


def segments(sections: Any, size: int) -> tuple[tuple[int, bool], ...]:
    """``sections`` of an axis of ``size`` as ``(size, split)`` segments."""
    if isinstance(sections, tuple):
        return sections
    n = max(int(sections), 1)
    return tuple((size // n, True) for _ in range(n))


def local_size(sections: Any, size: int, tp: int) -> int:
    """One rank's extent of an axis of ``size`` cut into ``sections``."""
    return sum(n // tp if split else n for n, split in segments(sections, size))


def divides(size: int, tp: int, sections: Any) -> bool:
    """Whether an axis of ``size`` cuts into ``sections`` with every split segment divisible by ``tp``."""
    segs = segments(sections, size)
    return sum(n for n, _ in segs) == size and all(n % tp == 0 for n, split in segs if split)


@dataclass(frozen=True)
class Refusal:
    """Why a node was not rewritten as a split op; ``action`` says what happens instead."""

    reason: str
    action: str = GATHER
    origins: frozenset = frozenset()  # DEMOTE: the ops whose split led here
    node: str | None = None

    def at(self, node_name: str) -> Refusal:
        """This refusal attributed to ``node_name`` (kept if it already names one)."""
        if self.node is not None:
            return self
        return Refusal(self.reason, self.action, self.origins, node_name)

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}" if self.node else self.reason


def gather(reason: str) -> Refusal:
    return Refusal(reason, GATHER)


def replicate(reason: str) -> Refusal:
    return Refusal(reason, REPLICATE)


def demote(origins: frozenset, reason: str) -> Refusal:
    return Refusal(reason, DEMOTE, frozenset(origins))


def unsupported(reason: str) -> Refusal:
    return Refusal(reason, UNSUPPORTED)


def refused(result: Any) -> bool:
    """True when a rewrite step answered with a ``Refusal`` instead of its result."""
    return isinstance(result, Refusal)


@dataclass
class TpFragment:
    """What the rewrite did, in the manifest's vocabulary (same for every rank except ``shards``)."""

    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    collectives: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    demoted: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs, "collectives": self.collectives, "tensors": self.tensors}


def norm_axis(axis: int, rank: int) -> int:
    """``axis`` counted from the front of a tensor of ``rank`` dims."""
    return axis + rank if axis < 0 else axis
