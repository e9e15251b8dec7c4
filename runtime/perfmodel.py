"""Analytic performance model: roofline per op, alpha-beta ring collectives, pipeline bubble, TP x PP what-if.

Everything here is pure arithmetic on numbers (no ONNX): ``maia_onnx.analyze`` turns a model into a
:class:`Workload` (a list of :class:`OpCost`) and this module prices it on a device + interconnect.

Formulas (n ranks, S bytes, per-direction link bandwidth B, per-step latency alpha):
  ring all-reduce   2(n-1) alpha + 2(n-1)/n * S/B
  ring all-gather    (n-1) alpha +  (n-1)/n * S/B   (S = size of the gathered result)
  point-to-point           alpha +            S/B
  pipeline bubble  (p-1)/(m+p-1) of the step time, for p stages and m microbatches
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from maia_onnx.runtime.profiles import DeviceProfile, InterconnectProfile

# ---------------------------------------------------------------------------------------------- formulas


def roofline_time(flops: float, bytes_moved: float, peak_flops: float, bandwidth: float) -> tuple[float, str]:
    """(seconds, "compute" | "memory"): the op runs at the slower of its compute and memory limits."""
    t_compute = flops / peak_flops if flops else 0.0
    t_memory = bytes_moved / bandwidth if bytes_moved else 0.0
    return (t_compute, "compute") if t_compute >= t_memory else (t_memory, "memory")


def arithmetic_intensity(flops: float, bytes_moved: float) -> float:
    return flops / bytes_moved if bytes_moved else math.inf if flops else 0.0


def allreduce_time(size_bytes: float, ranks: int, bandwidth: float, alpha: float = 0.0) -> float:
    """Ring all-reduce of ``size_bytes`` per rank: 2(n-1) alpha + 2(n-1)/n S/B."""
    if ranks <= 1 or size_bytes <= 0:
        return 0.0
    return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * size_bytes / bandwidth


def allgather_time(size_bytes: float, ranks: int, bandwidth: float, alpha: float = 0.0) -> float:
    """Ring all-gather producing ``size_bytes`` on every rank: (n-1) alpha + (n-1)/n S/B."""
    if ranks <= 1 or size_bytes <= 0:
        return 0.0
    return (ranks - 1) * alpha + (ranks - 1) / ranks * size_bytes / bandwidth


def p2p_time(size_bytes: float, bandwidth: float, alpha: float = 0.0) -> float:
    return alpha + size_bytes / bandwidth if size_bytes > 0 else 0.0


def collective_time(kind: str, size_bytes: float, ranks: int, link: InterconnectProfile) -> float:
    if kind == "AllReduce":
        return allreduce_time(size_bytes, ranks, link.bandwidth, link.alpha)
    if kind == "AllGather":
        return allgather_time(size_bytes, ranks, link.bandwidth, link.alpha)
    if kind in ("Send", "Recv", "P2P"):
        return p2p_time(size_bytes, link.bandwidth, link.alpha)
    raise ValueError(f"unknown collective {kind!r}")


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of a GPipe-style pipeline step: (p-1)/(m+p-1)."""
    if stages <= 1:
        return 0.0
    return (stages - 1) / (microbatches + stages - 1)


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, batch: int, bytes_per_elem: float) -> float:
    """Keys + values for all layers: 2 * layers * kv_heads * head_dim * tokens * batch * bytes."""
    return 2.0 * layers * kv_heads * head_dim * tokens * batch * bytes_per_elem


# ---------------------------------------------------------------------------------------------- workload


@dataclass
class OpCost:
    """One node's work at the analysed (batch, seq, past).

    ``kind``: "matmul" (tensor unit), "vector" (element-wise/reductions), "data" (copies, gathers),
    "folded" (weight transforms done offline: zero cost), "collective".
    ``act_bytes`` scale with the batch; ``weight_bytes`` (constant operands, stored dtype) do not.
    ``sharded``: the op's work splits across tensor-parallel ranks (Megatron-style column/row matmuls).
    """

    name: str
    op_type: str
    kind: str
    flops: float = 0.0
    weight_bytes: float = 0.0
    act_bytes: float = 0.0
    compute_dtype: str = "fp32"
    sharded: bool = False
    param_bytes: float = 0.0  # initializers this op owns (memory), stored dtype; each counted once
    tp_allreduce_bytes: float = 0.0  # generic TP: this op ends a column/row pair and all-reduces its output
    out_shape: tuple = ()  # first output's shape at the analysed dims (used to tell residual-stream ops)
    collective: str | None = None  # AllReduce / AllGather nodes of partition ranks
    collective_bytes: float = 0.0
    group_size: int = 1

    @property
    def bytes_moved(self) -> float:
        return self.weight_bytes + self.act_bytes


@dataclass
class Workload:
    """A model's ops for one phase (prefill or decode) plus the structure the TP/PP what-if needs."""

    phase: str
    ops: list[OpCost]
    batch: int
    seq: int
    past: int = 0
    layers: int = 0
    hidden: int = 0
    vocab: int = 0
    num_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    act_bytes_per_elem: float = 4.0
    kv_bytes_per_elem: float = 4.0
    weight_bytes: float = 0.0
    sharded_weight_bytes: float = 0.0
    kv_io_bytes: float = 0.0  # the KV cache tensors as the graph stores them (present.* outputs)

    @property
    def kv_bytes(self) -> float:
        return kv_cache_bytes(self.layers, self.kv_heads, self.head_dim, self.past + self.seq, self.batch,
                              self.kv_bytes_per_elem)


def op_time(op: OpCost, device: DeviceProfile, tp: int = 1, batch_fraction: float = 1.0) -> tuple[float, str]:
    """Roofline time of ``op`` on one rank with TP degree ``tp`` and a microbatch of ``batch_fraction``."""
    if op.kind in ("folded", "collective"):
        return 0.0, "-"
    div = tp if op.sharded else 1
    flops = op.flops * batch_fraction / div
    moved = (op.weight_bytes + op.act_bytes * batch_fraction) / div
    peak = device.peak(op.compute_dtype) if op.kind == "matmul" else device.vector_flops
    return roofline_time(flops, moved, peak, device.memory_bandwidth)


def split_stages(costs: Sequence[float], stages: int) -> list[tuple[int, int]]:
    """Cut a topologically ordered cost list into ``stages`` contiguous [start, end) ranges of ~equal cost.

    Each cut goes where the running sum comes closest to k/stages of the total (ties: the earlier cut).
    """
    n = len(costs)
    if stages <= 1 or n == 0:
        return [(0, n)]
    weights = list(costs) if sum(costs) > 0 else [1.0] * n
    total = sum(weights)
    prefix = [0.0]
    for c in weights:
        prefix.append(prefix[-1] + c)
    cuts = [0]
    for k in range(1, stages):
        target = total * k / stages
        lo = cuts[-1] + 1 if cuts[-1] < n else n  # every stage gets an op while ops last
        hi = max(lo, n - (stages - k))  # and leaves one for each later stage
        cuts.append(min(range(lo, hi + 1), key=lambda i: (abs(prefix[i] - target) + 1e-12 * abs(prefix[i]), i)))
    cuts.append(n)
    return [(cuts[k], cuts[k + 1]) for k in range(stages)]


@dataclass
class ConfigEstimate:
    """One TP x PP configuration on one interconnect: time per forward, its breakdown and memory per device."""

    phase: str
    interconnect: str
    tp: int
    pp: int
    microbatches: int
    compute_s: float
    comm_s: float
    bubble_s: float
    total_s: float
    collectives: int
    collective_bytes: float
    weight_bytes: float
    kv_bytes: float
    activation_bytes: float
    memory_bytes: float
    fits: bool
    valid: bool = True
    note: str = ""
    # pipeline point-to-point sends of the slowest stage (already inside comm_s / collective_bytes)
    p2p_s: float = 0.0
    p2p_bytes: float = 0.0

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"devices": self.devices}


def default_microbatches(batch: int, pp: int) -> int:
    """Enough microbatches to keep a pipeline busy, never more than the batch can be split into."""
    return max(1, min(batch, 4 * pp)) if pp > 1 else 1


def estimate_config(
    work: Workload,
    device: DeviceProfile,
    link: InterconnectProfile,
    tp: int,
    pp: int,
    microbatches: int | None = None,
    memory_limit: float | None = None,
) -> ConfigEstimate:
    """Analytic TP x PP estimate for a single (unpartitioned) model, Megatron-style TP.

    Per rank: sharded ops cost 1/tp, replicated ops full; ops are split into pp contiguous stages of
    ~equal cost and the slowest stage sets the pace. TP collectives per microbatch per stage: two
    all-reduces of (microbatch x seq x hidden) per layer it holds, plus the logits all-gather on the
    last stage. PP adds the bubble and one send per microbatch per stage boundary: every tp rank sends
    the full (microbatch x seq x hidden) activation to its peer of the next stage, as partition
    directories do (the hidden state is replicated over tp after the row-parallel all-reduce).
    """
    m = microbatches or default_microbatches(work.batch, pp)
    m = max(1, min(m, work.batch))
    frac = 1.0 / m
    base = [op_time(op, device, 1, 1.0)[0] for op in work.ops]
    stages = split_stages(base, pp)
    per_rank = [op_time(op, device, tp, frac)[0] for op in work.ops]

    mb = work.batch / m
    hidden_msg = mb * work.seq * work.hidden * work.act_bytes_per_elem
    logits_msg = mb * work.seq * work.vocab * work.act_bytes_per_elem
    transformer = bool(work.layers and work.hidden)
    ar_per_mb = 2 * work.layers / pp if (tp > 1 and transformer) else 0.0
    ag_last = 1 if (tp > 1 and transformer and work.vocab) else 0
    ar_time = allreduce_time(hidden_msg, tp, link.bandwidth, link.alpha)
    send_bytes = hidden_msg if transformer else 0.0

    best = None
    for index, (a, b) in enumerate(stages):
        compute = m * sum(per_rank[a:b])
        count = m * ar_per_mb
        moved = m * ar_per_mb * hidden_msg
        comm = m * ar_per_mb * ar_time
        p2p_s = p2p_bytes = 0.0
        if tp > 1 and not transformer:  # generic column/row pairs found by the analyser
            for op in work.ops[a:b]:
                if op.tp_allreduce_bytes:
                    comm += m * allreduce_time(op.tp_allreduce_bytes * frac, tp, link.bandwidth, link.alpha)
                    count += m
                    moved += m * op.tp_allreduce_bytes * frac
        if index == len(stages) - 1 and ag_last:
            comm += m * allgather_time(logits_msg, tp, link.bandwidth, link.alpha)
            count += m
            moved += m * logits_msg
        if pp > 1 and index < len(stages) - 1:
            out_bytes = send_bytes or (work.ops[b - 1].act_bytes * frac / 2 if b > a else 0.0)
            p2p_s = m * p2p_time(out_bytes, link.bandwidth, link.alpha)
            p2p_bytes = m * out_bytes
            comm += p2p_s
            count += m
            moved += p2p_bytes
        if best is None or compute + comm > best[0] + best[1]:
            best = (compute, comm, count, moved, p2p_s, p2p_bytes)
    compute, comm, count, moved, p2p_s, p2p_bytes = best
    busy = compute + comm
    bubble = busy * (pp - 1) / m if pp > 1 else 0.0  # = bubble_fraction(pp, m) of the total

    # memory: the heaviest stage's parameters (sharded ones split by tp), KV heads split by tp, activations
    stage_weights = [sum(op.param_bytes / (tp if op.sharded else 1) for op in work.ops[a:b]) for a, b in stages]
    weights = max(stage_weights) if stage_weights else 0.0
    kv_split = min(tp, work.kv_heads) if work.kv_heads else 1
    kv = work.kv_bytes / (pp * kv_split)
    act = max((op.act_bytes * frac / (tp if op.sharded else 1) for op in work.ops), default=0.0)
    memory = weights + kv + act
    limit = memory_limit if memory_limit else device.memory_capacity

    valid, note = True, ""
    if work.num_heads and tp > 1 and work.num_heads % tp:
        valid, note = False, f"{work.num_heads} heads do not split over tp={tp}"
    elif work.layers and pp > work.layers:
        valid, note = False, f"{work.layers} layers do not fill pp={pp} stages"
    elif work.kv_heads and tp > work.kv_heads:
        note = f"KV heads ({work.kv_heads}) replicated over tp={tp}"
    return ConfigEstimate(
        phase=work.phase, interconnect=link.name, tp=tp, pp=pp, microbatches=m,
        compute_s=compute, comm_s=comm, bubble_s=bubble, total_s=busy + bubble,
        collectives=int(round(count)), collective_bytes=moved, weight_bytes=weights, kv_bytes=kv,
        activation_bytes=act, memory_bytes=memory, fits=memory <= limit, valid=valid, note=note,
        p2p_s=p2p_s, p2p_bytes=p2p_bytes,
    )


def sweep(
    work: Workload,
    device: DeviceProfile,
    links: Iterable[InterconnectProfile],
    tps: Sequence[int] = (1, 2, 4, 8),
    pps: Sequence[int] = (1, 2, 4),
    microbatches: int | None = None,
    memory_limit: float | None = None,
) -> list[ConfigEstimate]:
    out = []
    for link in links:
        for tp in tps:
            for pp in pps:
                if microbatches or pp == 1:
                    out.append(estimate_config(work, device, link, tp, pp, microbatches, memory_limit))
                    continue
                # no microbatch count given: take the best of a few (more hides the bubble, but each
                # microbatch re-reads the stage's weights, which dominates memory-bound decode)
                options = sorted({m for m in (1, pp, 2 * pp, 4 * pp) if m <= work.batch} or {1})
                out.append(min((estimate_config(work, device, link, tp, pp, m, memory_limit) for m in options),
                               key=lambda e: e.total_s))
    return out


def best_config(estimates: Iterable[ConfigEstimate]) -> ConfigEstimate | None:
    """Fastest valid configuration that fits memory; ties go to fewer devices."""
    ok = [e for e in estimates if e.fits and e.valid]
    if not ok:
        return None
    return min(ok, key=lambda e: (round(e.total_s, 12), e.devices))


@dataclass
class RankEstimate:
    """A real partition rank: its own ops and the collectives it contains."""

    rank: int
    stage: int
    compute_s: float
    comm_s: float
    collectives: int
    collective_bytes: float
    weight_bytes: float
    activation_bytes: float
    by_kind: dict = field(default_factory=dict)


def estimate_rank(ops: Sequence[OpCost], device: DeviceProfile, link: InterconnectProfile, rank: int = 0,
                  stage: int = 0) -> RankEstimate:
    """Price one rank file of a partition: roofline of its ops plus its actual collective nodes."""
    compute = sum(op_time(op, device)[0] for op in ops)
    comm, count, moved, kinds = 0.0, 0, 0.0, {}
    for op in ops:
        if op.kind == "collective" and op.collective:
            comm += collective_time(op.collective, op.collective_bytes, op.group_size, link)
            count += 1
            moved += op.collective_bytes
            kinds[op.collective] = kinds.get(op.collective, 0) + 1
    return RankEstimate(rank, stage, compute, comm, count, moved,
                        sum(op.param_bytes for op in ops), max((op.act_bytes for op in ops), default=0.0), kinds)
