"""Pipeline planning: per-node loads, cut candidates and the balanced choice of K contiguous stages.

``plan_pipeline`` weighs every node (FLOPs by ``maia_onnx.graph.costs``, parameter bytes or memory), keeps cheap shape arithmetic out of
everyone's load (it is recomputed in each stage that needs it), ranks cut positions by the bytes crossing
them and picks the cuts whose largest stage is within ``BALANCE_SLACK`` of the best balance, so cuts land
between decoder layers. The pass that applies a plan and the stage extraction are in ``pipeline_parallel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from maia_onnx.errors import InvalidOptionError
from maia_onnx.graph.costs import ANY_DIM, dtype_bits, node_flops, value_numel

BALANCE_MODES = ("flops", "params", "memory")
# A cut set with fewer crossing bytes is accepted when its largest stage is at most this much (25%)
# above the best balance any cut set reaches: short boundaries beat a few % of balance.
BALANCE_SLACK = 0.25
# Symbolic dims (batch, sequence) only scale every node alike; one value keeps loads comparable.
SYMBOLIC_DIM_VALUE = 16
SYMBOLIC_DIMS = {ANY_DIM: SYMBOLIC_DIM_VALUE}

# Nodes that compute only from graph inputs and small constants (shape arithmetic, masks, rotary tables,
# Constant) are duplicated into every stage that reads them instead of crossing a stage boundary: they are
# cheap, and a stage that recomputes its own shape vectors can still be rewritten by tensor parallelism.
_HEAVY_OPS = {
    "MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger",
    "Einsum", "LSTM", "GRU", "RNN", "If", "Loop", "Scan", "Attention", "MultiHeadAttention", "GroupQueryAttention",
}
_SMALL_CONSTANT_BYTES = 4096  # an embedding table is not "small": its Gather stays on one stage


@dataclass
class PipelinePlan:
    """Where the graph is cut and what each stage costs."""

    num_stages: int
    balance: str
    node_stage: list[int]  # per node, in graph order
    loads: list[float]
    boundaries: list[list[str]]  # boundaries[s]: tensors sent from stages <= s to stages > s
    cut_after: list[int]  # node index ending each stage but the last

    @property
    def imbalance_pct(self) -> float:
        mean = sum(self.loads) / len(self.loads)
        return 0.0 if mean == 0 else (max(self.loads) - mean) / mean * 100.0

    def rows(self) -> list[dict[str, Any]]:
        total = sum(self.loads) or 1.0
        rows = []
        for s, load in enumerate(self.loads):
            rows.append(
                {
                    "stage": s,
                    "nodes": sum(1 for x in self.node_stage if x == s),
                    f"load_{self.balance}": load,
                    "share_pct": round(100.0 * load / total, 2),
                    "boundary_out": len(self.boundaries[s]) if s < len(self.boundaries) else 0,
                }
            )
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_stages": self.num_stages,
            "balance": self.balance,
            "loads": self.loads,
            "imbalance_pct": self.imbalance_pct,
            "boundaries": self.boundaries,
            "cut_after": self.cut_after,
        }


# ---------------------------------------------------------------- per-node loads


def _numel(value: ir.Value | None) -> int | None:
    return value_numel(value, SYMBOLIC_DIMS)


def _itemsize(value: ir.Value) -> float:
    return dtype_bits(value.dtype) / 8


def node_loads(nodes: Sequence[ir.Node], balance: str) -> list[float]:
    """Load of each node under ``balance``; each initializer counts once, at its first consumer."""
    if balance not in BALANCE_MODES:
        raise InvalidOptionError(f"--balance {balance!r} is not one of {', '.join(BALANCE_MODES)}: pick one of them")
    seen: set[int] = set()
    loads = []
    for node in nodes:
        param_bytes = 0.0
        for inp in node.inputs:
            if inp is not None and inp.const_value is not None and inp.is_initializer() and id(inp) not in seen:
                seen.add(id(inp))
                param_bytes += inp.const_value.nbytes
        if balance == "params":
            loads.append(param_bytes)
        elif balance == "flops":
            loads.append(node_flops(node, SYMBOLIC_DIMS))
        else:
            act = sum((_numel(o) or 0) * _itemsize(o) for o in node.outputs)
            loads.append(param_bytes + act)
    return loads


# ---------------------------------------------------------------- cut planning


def replicable_nodes(nodes: Sequence[ir.Node]) -> list[bool]:
    """Per node: computed only from graph inputs, small constants and other such nodes, with no heavy op."""
    free: set[int] = set()
    result = []
    for node in nodes:
        ok = node.domain in ("", "ai.onnx") and node.op_type not in _HEAVY_OPS
        for inp in node.inputs if ok else ():
            if inp is None or inp.is_graph_input() or id(inp) in free:
                continue
            if inp.producer() is None and inp.const_value is not None and inp.const_value.nbytes <= _SMALL_CONSTANT_BYTES:
                continue
            ok = False
            break
        result.append(ok)
        if ok:
            free.update(id(o) for o in node.outputs)
    return result


def _producer_index(nodes: Sequence[ir.Node]) -> dict[int, int]:
    return {id(node): i for i, node in enumerate(nodes)}


def crossing_bytes(nodes: Sequence[ir.Node], replicable: Sequence[bool] | None = None) -> np.ndarray:
    """bytes[p]: estimated bytes of the tensors computed at or before node p and still needed after it.

    Symbolic dims count as SYMBOLIC_DIM_VALUE, so a hidden state outweighs shape scalars and a cut
    between layers (hidden state + mask + rotary tables) beats one inside attention or the MLP.
    Values of replicable nodes never cross: they are re-created in each stage.
    """
    replicable = replicable_nodes(nodes) if replicable is None else replicable
    index = _producer_index(nodes)
    n = len(nodes)
    diff = np.zeros(n + 1, dtype=np.float64)
    for i, node in enumerate(nodes):
        if replicable[i]:
            continue
        for out in node.outputs:
            last = max((index.get(id(u.node), -1) for u in out.uses()), default=-1)
            if last > i:
                size = max(_numel(out) or 1, 1) * _itemsize(out)
                diff[i] += size
                diff[last] -= size
    return np.cumsum(diff)[:n]


def _output_pinned_cuts(nodes: Sequence[ir.Node]) -> np.ndarray:
    """pinned[p]: a graph output (e.g. a layer's present KV cache) is still read after node p.

    Cutting there would split a layer from its KV cache (attention in one stage, cache in another).
    """
    index = _producer_index(nodes)
    diff = np.zeros(len(nodes) + 1, dtype=np.int64)
    for i, node in enumerate(nodes):
        for out in node.outputs:
            if out.is_graph_output():
                last = max((index.get(id(u.node), -1) for u in out.uses()), default=-1)
                if last > i:
                    diff[i] += 1
                    diff[last] -= 1
    return np.cumsum(diff)[: len(nodes)] > 0


def _min_max_partition(loads: np.ndarray, candidates: Sequence[int], k: int) -> tuple[float, list[int]] | None:
    """Choose k-1 cut positions from ``candidates`` minimising the largest stage load."""
    if len(candidates) < k - 1:
        return None
    prefix = np.concatenate([[0.0], np.cumsum(loads)])
    n = len(loads)
    cands = sorted(candidates)

    def greedy(limit: float) -> list[int] | None:
        cuts = []
        start = 0  # first node of the current stage
        j = 0
        while True:
            if prefix[n] - prefix[start] <= limit:
                return cuts
            best = None
            while j < len(cands) and prefix[cands[j] + 1] - prefix[start] <= limit:
                if cands[j] >= start:
                    best = cands[j]
                j += 1
            if best is None or len(cuts) == k - 1:
                return None
            cuts.append(best)
            start = best + 1

    lo = max(float(loads.max()) if n else 0.0, prefix[n] / k)
    hi = float(prefix[n])
    if greedy(lo) is not None:
        hi = lo
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if greedy(mid) is not None:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-9 * max(hi, 1.0):
                break
    cuts = greedy(hi)
    if cuts is None:
        return None
    # Fewer stages than asked: add cuts (stage loads only shrink), preferring the largest stages.
    spare = [c for c in cands if c not in cuts]
    while len(cuts) < k - 1:
        if not spare:
            return None
        bounds = [-1] + sorted(cuts) + [n - 1]
        stage_loads = [(prefix[b + 1] - prefix[a + 1], a, b) for a, b in zip(bounds, bounds[1:])]
        placed = False
        for _, a, b in sorted(stage_loads, reverse=True):
            inside = [c for c in spare if a < c < b]
            if inside:
                mid_target = (prefix[a + 1] + prefix[b + 1]) / 2
                c = min(inside, key=lambda c: abs(prefix[c + 1] - mid_target))
                cuts.append(c)
                spare.remove(c)
                placed = True
                break
        if not placed:
            return None
    cuts = sorted(cuts)
    bounds = [-1] + cuts + [n - 1]
    max_load = max(prefix[b + 1] - prefix[a + 1] for a, b in zip(bounds, bounds[1:]))
    if len(cands) <= 512:
        evened = _even_out(prefix, cands, k, max_load)
        if evened is not None:
            cuts = evened
    return float(max_load), cuts


def _even_out(prefix: np.ndarray, cands: Sequence[int], k: int, limit: float) -> list[int] | None:
    """Among cut sets whose stages all fit ``limit``, the one with the smallest sum of squared loads.

    The min-max answer alone is not unique (e.g. [2 layers][2 layers][head] vs [1][2][1] layers);
    squaring prefers the evenly spread one. Exact DP over the (few) candidate cuts.
    """
    n = len(prefix) - 1
    ends = np.asarray(list(cands) + [n - 1])  # stage end positions; the last stage ends at n-1
    tol = limit * (1 + 1e-9) + 1e-12
    m = len(ends)
    inf = float("inf")
    cost = np.full(m, inf)
    back = np.full((k, m), -1, dtype=np.int64)
    first = prefix[ends + 1] - prefix[0]
    cost = np.where(first <= tol, first**2, inf)
    for stage in range(1, k):
        new = np.full(m, inf)
        for j in range(m):
            prev = np.arange(j)
            if not len(prev):
                continue
            seg = prefix[ends[j] + 1] - prefix[ends[prev] + 1]
            total = np.where(seg <= tol, cost[prev] + seg**2, inf)
            b = int(np.argmin(total))
            if total[b] < new[j]:
                new[j] = total[b]
                back[stage, j] = prev[b]
        cost = new
    if not np.isfinite(cost[m - 1]):
        return None
    cuts = []
    j = m - 1
    for stage in range(k - 1, 0, -1):
        j = int(back[stage, j])
        cuts.append(int(ends[j]))
    return sorted(cuts)


def plan_pipeline(model: ir.Model, num_stages: int, balance: str = "flops") -> PipelinePlan:
    """Cut the (sorted) main graph into ``num_stages`` contiguous stages.

    Cut candidates are ranked by the bytes crossing them; the smallest crossing threshold whose
    best partition is within BALANCE_SLACK of the best achievable largest stage wins, so cuts land
    between decoder layers / network blocks rather than inside attention.
    """
    _infer_missing_shapes(model)
    nodes = list(model.graph)
    if num_stages < 1:
        raise InvalidOptionError(f"--pp {num_stages} is invalid: the number of pipeline stages must be >= 1")
    replicable = replicable_nodes(nodes)
    loads = np.asarray(node_loads(nodes, balance), dtype=np.float64)
    loads[np.asarray(replicable, dtype=bool)] = 0.0  # recomputed wherever needed: nobody's load
    if not loads.sum():
        # nothing to weigh (e.g. no weights under --balance params): balance node counts
        loads = np.asarray([0.0 if r else 1.0 for r in replicable])
    computing = [i for i in range(len(nodes)) if not replicable[i]]
    if num_stages > 1 and len(computing) < num_stages:
        raise InvalidOptionError(
            f"--pp {num_stages} asks for more stages than the model has compute nodes ({len(computing)}): use a smaller --pp"
        )
    counts = crossing_bytes(nodes, replicable)
    pinned = _output_pinned_cuts(nodes)
    if num_stages == 1:
        cuts: list[int] = []
    else:
        # A cut after node p is only useful if both sides hold compute; trailing Constant-only tails are not stages.
        interior = [p for p in range(computing[0], computing[-1]) if not pinned[p]]
        best_all = _min_max_partition(loads, interior, num_stages)
        if best_all is None:
            raise InvalidOptionError(f"--pp {num_stages}: the graph cannot be cut into {num_stages} non-empty stages; use a smaller --pp")
        chosen = best_all
        for threshold in sorted(set(float(counts[p]) for p in interior)):
            cands = [p for p in interior if counts[p] <= threshold]
            result = _min_max_partition(loads, cands, num_stages)
            if result is not None and result[0] <= best_all[0] * (1 + BALANCE_SLACK) + 1e-12:
                chosen = result
                break
        cuts = chosen[1]
    node_stage = []
    stage = 0
    cut_set = list(cuts)
    for i in range(len(nodes)):
        node_stage.append(stage)
        if stage < len(cut_set) and i == cut_set[stage]:
            stage += 1
    stage_loads = [0.0] * num_stages
    for i, s in enumerate(node_stage):
        stage_loads[s] += float(loads[i])
    if any(not any(node_stage[i] == s for i in computing) for s in range(num_stages)):
        raise InvalidOptionError(
            f"--pp {num_stages}: a stage would hold no computation (the model is too small); use a smaller --pp"
        )
    boundaries = _boundaries(nodes, node_stage, num_stages, replicable)
    return PipelinePlan(num_stages, balance, node_stage, stage_loads, boundaries, list(cuts))


def _boundaries(nodes: Sequence[ir.Node], node_stage: Sequence[int], num_stages: int,
                replicable: Sequence[bool]) -> list[list[str]]:
    index = _producer_index(nodes)
    out: list[list[str]] = [[] for _ in range(max(num_stages - 1, 0))]
    for i, node in enumerate(nodes):
        if replicable[i]:
            continue
        for value in node.outputs:
            last = max((node_stage[index[id(u.node)]] for u in value.uses() if id(u.node) in index), default=-1)
            for s in range(node_stage[i], last):
                out[s].append(value.name)
    return out


def _check_layer_count(model: ir.Model, num_stages: int) -> None:
    """More stages than decoder layers splits layers apart: refuse for KV-cache models."""
    kv_layers = {
        v.name.split(".")[1]
        for v in model.graph.inputs
        if v.name.startswith("past_key_values.") and len(v.name.split(".")) >= 3
    }
    if kv_layers and num_stages > len(kv_layers) + 1:
        raise InvalidOptionError(
            f"--pp {num_stages} is more stages than the model's {len(kv_layers)} decoder layers (+1 for the head): "
            f"use --pp <= {len(kv_layers) + 1}"
        )



def _infer_missing_shapes(model: ir.Model) -> None:
    """Loads and boundary types need intermediate shapes; fill them in when the producer of the model left them out."""
    untyped = sum(1 for n in model.graph for v in n.outputs if v.type is None or v.shape is None)
    if not untyped:
        return
    try:
        ShapeInferencePass()(model)
    except Exception:  # noqa: BLE001 - custom/contrib ops: loads fall back to what is known
        pass



__all__ = [
    "BALANCE_MODES",
    "PipelinePlan",
    "crossing_bytes",
    "node_loads",
    "plan_pipeline",
    "replicable_nodes",
]
