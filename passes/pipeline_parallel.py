"""Pipeline parallelism: assign every node to one of K stages (balanced cuts) and extract per-stage models.

``PipelineParallelPass`` plans the cut points on a topologically sorted graph and records each
node's stage in ``node.metadata_props["maia.pipeline_stage"]``; ``extract_stages`` turns an
annotated model into K standalone stage models whose boundary tensors are explicit stage
outputs/inputs. Graph inputs (tokens, KV cache) are fed to whichever stage consumes them and
graph outputs come from the stage producing them, so a layer's KV cache stays with its layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.errors import InvalidOptionError, UnsupportedModelError

STAGE_KEY = "maia.pipeline_stage"
BALANCE_MODES = ("flops", "params", "memory")
# A cut set with fewer crossing bytes is accepted when its largest stage is at most this much (25%)
# above the best balance any cut set reaches: short boundaries beat a few % of balance.
BALANCE_SLACK = 0.25
# Symbolic dims (batch, sequence) only scale every node alike; one value keeps loads comparable.
SYMBOLIC_DIM_VALUE = 16

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


def _dims(shape: ir.Shape | None, default: int = SYMBOLIC_DIM_VALUE) -> list[int] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) else default for d in shape]


def _numel(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    if value.const_value is not None:
        return int(np.prod(value.const_value.shape.numpy())) if value.const_value.shape is not None else None
    dims = _dims(value.shape)
    return None if dims is None else int(np.prod(dims, dtype=np.int64))


def _itemsize(value: ir.Value) -> float:
    try:
        return value.dtype.itemsize if value.dtype is not None else 4
    except Exception:  # noqa: BLE001 - sub-byte or unknown dtypes
        return 1


def _fallback_flops(node: ir.Node) -> float:
    """FLOPs of one node with symbolic dims at SYMBOLIC_DIM_VALUE (used until inspect.node_flops exists)."""
    op = node.op_type
    out = node.outputs[0] if node.outputs else None
    out_numel = _numel(out) or 0
    if op in ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul") and len(node.inputs) >= 2:
        a, b = node.inputs[0], node.inputs[1]
        b_dims = _dims(b.shape) if b is not None else None
        if b is not None and b.const_value is not None:
            b_dims = list(b.const_value.shape.numpy())
        a_dims = _dims(a.shape) if a is not None else None
        if b_dims and len(b_dims) >= 2:
            k = b_dims[-1] if (op == "Gemm" and any(a.name == "transB" and a.value for a in node.attributes.values())) else b_dims[-2]
            if out_numel:
                return 2.0 * out_numel * k
            if a_dims:
                return 2.0 * float(np.prod(a_dims[:-1])) * float(np.prod(b_dims[-2:]))
        if a_dims and out_numel:
            return 2.0 * out_numel * a_dims[-1]
        return 0.0
    if op in ("Conv", "ConvTranspose") and len(node.inputs) >= 2 and node.inputs[1] is not None:
        w = node.inputs[1]
        w_dims = list(w.const_value.shape.numpy()) if w.const_value is not None else _dims(w.shape)
        if w_dims and out_numel:
            if op == "Conv":
                per_out = float(np.prod(w_dims[1:]))  # Cin/group * kernel
            else:
                group = node.attributes["group"].value if "group" in node.attributes else 1
                per_out = float(w_dims[0]) / group * float(np.prod(w_dims[2:]))
            return 2.0 * out_numel * per_out
        return 0.0
    return float(out_numel)


def _node_flops_fn():
    try:
        # The shared estimator; it answers None where a shape is symbolic, then ours (dims at 16) decides.
        from maia_onnx.inspect import node_flops_or_none as node_flops
    except Exception:  # noqa: BLE001 - not written yet, or failing to import
        return _fallback_flops

    def flops(node: ir.Node) -> float:
        try:
            value = node_flops(node)
        except Exception:  # noqa: BLE001 - its estimator may not know every op / symbolic shape
            return _fallback_flops(node)
        return float(value) if value is not None else _fallback_flops(node)

    return flops


def node_loads(nodes: Sequence[ir.Node], balance: str) -> list[float]:
    """Load of each node under ``balance``; each initializer counts once, at its first consumer."""
    if balance not in BALANCE_MODES:
        raise InvalidOptionError(f"--balance {balance!r} is not one of {', '.join(BALANCE_MODES)}: pick one of them")
    seen: set[int] = set()
    flops_fn = _node_flops_fn() if balance == "flops" else None
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
            loads.append(flops_fn(node))
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
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        ShapeInferencePass()(model)
    except Exception:  # noqa: BLE001 - custom/contrib ops: loads fall back to what is known
        pass


class PipelineParallelPass(onnx_ir.passes.InPlacePass):
    """Assign each node a pipeline stage (``metadata_props['maia.pipeline_stage']``) and keep the plan.

    After the pass, ``self.plan`` holds the loads and boundaries; ``extract_stages(model)`` splits.
    """

    def __init__(self, num_stages: int, balance: str = "flops"):
        super().__init__()
        self.num_stages = num_stages
        self.balance = balance
        self.plan: PipelinePlan | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        _check_layer_count(model, self.num_stages)
        model.graph.sort()
        self.plan = plan_pipeline(model, self.num_stages, self.balance)
        for node, stage in zip(model.graph, self.plan.node_stage):
            node.metadata_props[STAGE_KEY] = str(stage)
        model.metadata_props["maia.pipeline_stages"] = str(self.num_stages)
        model.metadata_props["maia.pipeline_balance"] = self.balance
        return ir.passes.PassResult(model, modified=True)


# ---------------------------------------------------------------- stage extraction


@dataclass
class Stage:
    """One pipeline stage as a standalone model plus where its inputs come from."""

    index: int
    model: ir.Model
    inputs: list[str]  # stage input names, in order
    outputs: list[str]
    graph_inputs: list[str]  # of which: inputs of the whole model
    recv: dict[str, int] = field(default_factory=dict)  # boundary input -> producing stage
    send: dict[str, list[int]] = field(default_factory=dict)  # boundary output -> consuming stages


def _stage_of(node: ir.Node) -> int:
    try:
        return int(node.metadata_props[STAGE_KEY])
    except KeyError as exc:
        raise UnsupportedModelError(
            f"node {node.name!r} has no pipeline stage: run PipelineParallelPass before extract_stages"
        ) from exc


def _ensure_types(model: ir.Model, names: set[str]) -> None:
    """Boundary tensors become graph I/O, which needs a type; infer shapes when the exporter left none."""
    missing = [v for n in model.graph for v in n.outputs if v.name in names and v.type is None]
    if not missing:
        return
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass()(model)
    still = [v.name for n in model.graph for v in n.outputs if v.name in names and v.type is None]
    if still:
        raise UnsupportedModelError(
            f"cannot type the stage boundary tensor(s) {still[:3]}: run shape inference on the model first"
        )


def extract_stages(model: ir.Model, in_place: bool = False) -> list[Stage]:
    """Split a stage-annotated model into standalone models (weights shared with ``model``, not copied).

    ``in_place``: a single stage is ``model`` itself, rewritten in place (no clone; the caller gives it up).
    """
    nodes = list(model.graph)
    stages_of = [_stage_of(n) for n in nodes]
    num_stages = max(stages_of) + 1 if stages_of else 1
    index = _producer_index(nodes)
    graph_input_names = [v.name for v in model.graph.inputs]
    graph_output_names = [v.name for v in model.graph.outputs]
    replicable = replicable_nodes(nodes)
    # Replicable nodes: duplicated into every stage that uses them, directly or through other replicable nodes.
    consumers_stages: list[set[int]] = [{st} for st in stages_of]
    for i in range(len(nodes) - 1, -1, -1):
        if not replicable[i]:
            continue
        used: set[int] = set()
        for o in nodes[i].outputs:
            for u in o.uses():
                j = index.get(id(u.node))
                if j is not None:
                    used |= consumers_stages[j]
            if o.is_graph_output():
                used.add(stages_of[i])
        consumers_stages[i] = used or {stages_of[i]}
    # Boundary tensors: produced in stage a, consumed in stage b > a.
    producer_stage: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if not replicable[i]:
            for o in node.outputs:
                producer_stage[o.name] = stages_of[i]
    boundary: set[str] = set()
    for i, node in enumerate(nodes):
        for s in consumers_stages[i]:
            for inp in node.inputs:
                if inp is not None and inp.name in producer_stage and producer_stage[inp.name] != s:
                    if producer_stage[inp.name] > s:
                        raise UnsupportedModelError(
                            f"tensor {inp.name!r} flows from stage {producer_stage[inp.name]} back to stage {s}: "
                            "the stage assignment is not in topological order"
                        )
                    boundary.add(inp.name)
    _ensure_types(model, boundary)
    value_consumer_stages: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        for inp in node.inputs:
            if inp is not None:
                value_consumer_stages.setdefault(inp.name, set()).update(consumers_stages[i])

    stages = []
    for s in range(num_stages):
        clone = model if in_place and num_stages == 1 else model.clone()
        cnodes = list(clone.graph)
        keep = [s in consumers_stages[i] for i in range(len(cnodes))]
        values = {v.name: v for n in cnodes for v in n.outputs}
        for v in clone.graph.inputs:
            values[v.name] = v
        keep_ids = {id(n) for n, k in zip(cnodes, keep) if k}
        needed_inputs: list[ir.Value] = []
        seen_in: set[str] = set()
        recv: dict[str, int] = {}
        for n, k in zip(cnodes, keep):
            if not k:
                continue
            for inp in n.inputs:
                if inp is None or inp.name in seen_in:
                    continue
                if inp.is_graph_input() or (inp.name in boundary and producer_stage[inp.name] != s):
                    seen_in.add(inp.name)
                    needed_inputs.append(inp)
                    if inp.name in boundary and not inp.is_graph_input():
                        recv[inp.name] = producer_stage[inp.name]
        outs: list[ir.Value] = []
        send: dict[str, list[int]] = {}
        for name in graph_output_names:
            v = values.get(name)
            producer = v.producer() if v is not None else None
            if producer is None or id(producer) not in keep_ids:
                continue
            if replicable[cnodes.index(producer)]:
                if stages_of[cnodes.index(producer)] == s:
                    outs.append(v)
            elif producer_stage[name] == s:
                outs.append(v)
        for i, n in enumerate(cnodes):
            if not keep[i] or replicable[i]:
                continue
            for o in n.outputs:
                if o.name in boundary:
                    send[o.name] = sorted(value_consumer_stages[o.name] - {s})
                    if o not in outs:
                        outs.append(o)
        # Graph inputs feeding later stages only are dropped here; boundary inputs become graph inputs.
        drop = [n for n, k in zip(cnodes, keep) if not k]
        clone.graph.outputs.clear()
        # Detach boundary values from their (dropped) producers by giving the stage fresh input values.
        new_inputs = []
        for v in needed_inputs:
            if v.is_graph_input():
                new_inputs.append(v)
            else:
                fresh = ir.Value(name=v.name, type=v.type, shape=v.shape)
                v.replace_all_uses_with(fresh)
                new_inputs.append(fresh)
        clone.graph.remove(drop, safe=True)  # safe: also detaches them from the initializers they read
        clone.graph.inputs.clear()
        clone.graph.inputs.extend(new_inputs)
        clone.graph.outputs.extend(outs)
        for name in [n for n, v in clone.graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
            clone.graph.initializers.pop(name)
        for n in clone.graph:
            n.metadata_props.pop(STAGE_KEY, None)
        clone.metadata_props["maia.pipeline_stage"] = str(s)
        stages.append(
            Stage(
                index=s,
                model=clone,
                inputs=[v.name for v in new_inputs],
                outputs=[v.name for v in outs],
                graph_inputs=[v.name for v in new_inputs if v.name in graph_input_names],
                recv=recv,
                send=send,
            )
        )
    return stages


def split_pipeline(model: ir.Model, num_stages: int, balance: str = "flops",
                   in_place: bool = False) -> tuple[PipelinePlan, list[Stage]]:
    """Plan and extract in one call (the model is annotated in place; ``in_place``: see ``extract_stages``)."""
    p = PipelineParallelPass(num_stages, balance)
    p(model)
    assert p.plan is not None
    return p.plan, extract_stages(model, in_place=in_place)


def run_stages(stages: Sequence[Stage], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference sequential executor for a stage list (one ORT session per stage, in order)."""
    from maia_onnx.ortutil import make_session

    env: dict[str, np.ndarray] = dict(feeds)
    results: dict[str, np.ndarray] = {}
    for stage in stages:
        sess = make_session(stage.model)
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, {n: env[n] for n in stage.inputs})
        for n, v in zip(names, outs):
            env[n] = v
            results[n] = v
    return results


def microbatch_run(stages: Sequence[Stage], feeds: Mapping[str, np.ndarray], microbatches: int, batch_axis: int = 0,
                   output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Split feeds along the batch axis, push each microbatch through all stages, concatenate the outputs."""
    batch = next(iter(feeds.values())).shape[batch_axis]
    if microbatches < 1 or batch % microbatches:
        raise InvalidOptionError(
            f"--microbatches {microbatches} does not divide the batch size {batch}: choose a divisor of {batch}"
        )
    size = batch // microbatches
    parts = []
    for m in range(microbatches):
        sl = {k: np.take(v, range(m * size, (m + 1) * size), axis=batch_axis) for k, v in feeds.items()}
        parts.append(run_stages(stages, sl))
    names = output_names or list(parts[0])
    return {n: np.concatenate([p[n] for p in parts], axis=batch_axis) for n in names}


__all__ = [
    "BALANCE_MODES",
    "PipelineParallelPass",
    "PipelinePlan",
    "Stage",
    "crossing_bytes",
    "extract_stages",
    "microbatch_run",
    "node_loads",
    "plan_pipeline",
    "run_stages",
    "split_pipeline",
]


# ---------------------------------------------------------------- partition directories (PP, PP x TP)

# tp_fn(stage_model, tp) -> (rank_models, fragment): the TP engineer's split of one in-memory model into tp
# rank models plus its manifest pieces ("inputs", "outputs", "collectives", "tensors") for that model.
TpSplitFn = Any


def _replicated_tensors(stage_models: Sequence[ir.Model]) -> dict[str, dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {}
    for s, m in enumerate(stage_models):
        for name, value in m.graph.initializers.items():
            t = value.const_value
            entry = tensors.setdefault(
                name,
                {"kind": "replicated", "axis": None, "full_shape": [int(d) for d in t.shape.numpy()] if t is not None else None,
                 "shards": {}, "stages": []},
            )
            entry["stages"].append(s)
    return tensors


def _shape_probe_clone(model: ir.Model) -> ir.Model:
    """The model, or a clone of it, for whole-model shape inference that never materialises lazy weights.

    Shape inference serialises the graph; lazily computed weights (e.g. rebuilt from shards by reshard)
    would all be evaluated into one protobuf. Above the size where the TP shape probe skips its ORT run
    (which needs real weights), large non-file tensors become external references to nothing.
    """
    from maia_onnx.io import initializer_bytes

    if initializer_bytes(model) < 512 * 1024 * 1024:
        return model  # shape inference only reads the model
    if not any(
        v.const_value is not None and v.const_value.nbytes > 1024 and not isinstance(v.const_value, ir.ExternalTensor)
        for v in model.graph.initializers.values()
    ):
        return model  # all large weights are file references already: nothing would be materialised
    clone = model.clone()
    for name, value in clone.graph.initializers.items():
        t = value.const_value
        if t is not None and t.nbytes > 1024 and not isinstance(t, ir.ExternalTensor):
            value.const_value = ir.ExternalTensor("__maia_shape_probe__", 0, t.nbytes, t.dtype, shape=t.shape, name=name)
    return clone


def partition_model(
    model: ir.Model,
    out_dir,
    tp: int = 1,
    pp: int = 1,
    balance: str = "flops",
    source_path=None,
    source_hash: str | None = None,
    tp_fn: TpSplitFn | None = None,
    progress=None,
    consume_model: bool = False,
) -> tuple[Any, PipelinePlan]:
    """Write a partition directory: PP cut first, then (tp > 1) the TP split of every stage.

    Stage s on tp rank t is ``rank{t}_stage{s}.onnx``; the directory also holds ``source_graph.onnx``
    (the unsharded graph without its weights) so it can be re-sharded without the original model.
    ``consume_model``: the caller gives ``model`` up, so a single stage (pp 1) and the last TP rank are
    rewritten in place instead of cloned (the output is the same; only ``model`` is left rewritten).
    """
    from pathlib import Path

    from maia_onnx import partition as part
    from maia_onnx.io import atomic_dir
    from maia_onnx.passes.reshard import SOURCE_GRAPH, write_source_graph

    if tp < 1:
        raise InvalidOptionError(f"--tp {tp} is invalid: the tensor-parallel degree must be >= 1")
    skeleton_model = model.clone()  # the unsharded graph before PP/TP rewrite anything (tensors are shared)
    source_io = skeleton_model  # its graph inputs/outputs describe the source
    full_shapes = None
    default_tp = tp > 1 and tp_fn is None
    if default_tp:
        # Shapes come from the whole model: a stage alone has boundary inputs (sizes, masks) that a shape
        # probe cannot fill in consistently.
        from maia_onnx.passes import tensor_parallel

        tp_fn = tensor_parallel.split_model
        full_shapes = tensor_parallel.infer_full_shapes(_shape_probe_clone(model))
    plan, stages = split_pipeline(model, pp, balance, in_place=consume_model)
    manifest = part.new_manifest(tp, pp, source_io, source_path, source_hash)
    manifest["stages"] = [{"stage": st.index, "inputs": st.inputs, "outputs": st.outputs} for st in stages]
    out_stage = {name: st.index for st in stages for name in st.outputs if name in {v.name for v in source_io.graph.outputs}}
    manifest["inputs"] = {v.name: {"sharding": "replicated", "axis": None} for v in source_io.graph.inputs}
    manifest["outputs"] = {
        v.name: {"sharding": "replicated", "axis": None, "stage": out_stage.get(v.name, pp - 1)} for v in source_io.graph.outputs
    }
    manifest["tensors"] = _replicated_tensors([st.model for st in stages])
    manifest["extra"] = {
        "pipeline": {
            "balance": balance,
            "loads": plan.loads,
            "imbalance_pct": round(plan.imbalance_pct, 3),
            "boundaries": plan.boundaries,
        }
    }
    rank_models: dict[tuple[int, int], ir.Model] = {}
    if tp == 1:
        for st in stages:
            rank_models[(0, st.index)] = st.model
    else:
        collectives: list[dict[str, Any]] = []
        tensors: dict[str, dict[str, Any]] = {}
        inputs: dict[str, dict[str, Any]] = {}
        outputs: dict[str, dict[str, Any]] = {}
        for st in stages:
            if default_tp:
                # stage models are ours (clones, or the given-up model): the last rank may rewrite one in place
                ranks, fragment = tp_fn(st.model, tp, shapes=dict(full_shapes), consume=True)
            else:
                ranks, fragment = tp_fn(st.model, tp, shapes=dict(full_shapes)) if full_shapes is not None else tp_fn(st.model, tp)
            for t, rm in enumerate(ranks):
                rank_models[(t, st.index)] = rm
            for c in fragment.get("collectives", []):
                c = dict(c)
                c["stage"] = st.index
                c["group"] = [part.global_rank(t, st.index, tp) for t in range(tp)]
                c["id"] = len(collectives)
                collectives.append(c)
            for name, spec in fragment.get("tensors", {}).items():
                entry = tensors.setdefault(name, dict(spec, stages=[]))
                entry["stages"].append(st.index)
            for name, spec in fragment.get("inputs", {}).items():
                if name in manifest["inputs"]:
                    inputs[name] = spec
            for name, spec in fragment.get("outputs", {}).items():
                if name in manifest["outputs"]:
                    outputs[name] = dict(spec, stage=st.index)
                elif spec.get("sharding") not in (None, "replicated"):
                    raise UnsupportedModelError(
                        f"stage {st.index} boundary tensor {name!r} would leave the stage sharded: use --pp with fewer stages or --tp 1"
                    )
        manifest["collectives"] = collectives
        manifest["tensors"] = tensors
        manifest["inputs"].update(inputs)
        manifest["outputs"].update(outputs)
    in_shards = {name for m in rank_models.values() for name in m.graph.initializers}
    in_shards |= {name[: -len("__tp")] for name in in_shards if name.endswith("__tp")}
    # A small constant a rank model rewrote under its source name (e.g. a shape vector) is not that weight:
    # keep the source's value inline in source_graph.onnx.
    sharded = {n for n, spec in manifest["tensors"].items() if spec.get("axis") is not None}
    source_inits = skeleton_model.graph.initializers
    for (t, s), m in rank_models.items():
        for name, value in m.graph.initializers.items():
            src = source_inits.get(name)
            if name in sharded or src is None or src.const_value is None or value.const_value is None:
                continue
            if src.const_value.nbytes <= 1024 and src.const_value.tobytes() != value.const_value.tobytes():
                in_shards.discard(name)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        written = part.write_partition(tmp / "partition", rank_models, manifest, progress)
        for f in sorted((tmp / "partition").iterdir()):
            f.rename(tmp / f.name)
        (tmp / "partition").rmdir()
        write_source_graph(skeleton_model, tmp / SOURCE_GRAPH, in_shards)
    return part.Manifest(written.data, out_dir), plan
