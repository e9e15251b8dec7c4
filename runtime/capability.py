"""Maia GetCapability in Python: a declarative op x dtype x attribute table per device, and the partitioner.

``get_capability(model, device)`` decides for every node whether Maia runs it (and if not, why), then groups
the supported nodes into maximal connected device partitions that never form a cycle through CPU nodes, the way
ONNX Runtime's GetCapability + partitioner do for an execution provider.

Cycle freedom: every node gets a *level* with level(c) >= level(p) + 1 on every device->CPU edge p->c and
level(c) >= level(p) on every other edge. A path from device node A through a CPU node to device node B then forces
level(B) > level(A), so device nodes of one level can share a partition without a cycle; partitions are the
connected components of the device-device edges inside one level. Levels start as early as possible (the most
device->CPU hand-offs on any path from the graph inputs); then the nodes computed from initializers and constants
alone (a weight DequantizeLinear, a weight Transpose), or index arithmetic on graph inputs alone (shapes, masks), are
pulled as late as their consumers allow, so they join the partition of the node that uses them.

Host hoisting: a CPU node whose ancestors on the device only do index arithmetic (int64/int32/bool outputs: the
shape and attention-mask code of exported decoders) would cut every device path through it into two partitions;
its ancestors run on the host instead (computed first, fed in), so the CPU node sits at level 0 and splits nothing.
The C++ plugin EP (runtime/ep/capability.cc) must place and group plain models by these same rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError
from maia_onnx.graph.costs import ANY_DIM, node_flops, value_numel
from maia_onnx.graph.shapes import infer_shapes

# The table itself is data (capability_table.json), read here and by the C++ plugin EP (runtime/ep): one source.
TABLE_PATH = Path(__file__).resolve().parent / "capability_table.json"
_TABLE = json.loads(TABLE_PATH.read_text())

# ONNX element type -> canonical dtype name used by the device profiles (runtime/profiles.py DTYPE_BYTES).
CANONICAL_DTYPE = {getattr(ir.DataType, name): canon for name, canon in _TABLE["canonical_dtypes"].items()
                   if hasattr(ir.DataType, name)}

FLOAT = frozenset(_TABLE["dtype_groups"]["float"])
INDEX = frozenset(_TABLE["dtype_groups"]["index"])
QUANT = frozenset(_TABLE["dtype_groups"]["quant"])

# Op kinds: the unit that runs them and how the roofline charges them.
TENSOR, VECTOR, DATA, QDQ = "tensor", "vector", "data", "qdq"
COMPUTE_KINDS = frozenset(_TABLE["compute_kinds"])


@dataclass(frozen=True)
class OpRule:
    """One row of the capability table: an op, the unit that runs it, allowed dtypes and attribute limits."""

    op_type: str
    kind: str
    dtypes: frozenset
    domain: str = ""
    check: Callable[[ir.Node], str | None] | None = None  # returns a reason when an attribute is out of range


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _spatial_check(max_dims: int) -> Callable[[ir.Node], str | None]:
    allowed = " and ".join(f"{d}-D" for d in range(1, max_dims + 1))

    def check(node: ir.Node) -> str | None:
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        rank = len(weight.shape) if weight is not None and weight.shape is not None else None
        if rank is not None and rank - 2 > max_dims:
            return f"{node.op_type} with {rank - 2} spatial dims ({allowed} only)"
        return None

    return check


def _attribute_check(name: str, default: str, allowed: list[str]) -> Callable[[ir.Node], str | None]:
    def check(node: ir.Node) -> str | None:
        value = _attr(node, name, default)
        if value not in allowed:
            return f"attribute {name}={value!r} unsupported ({', '.join(allowed)})"
        return None

    return check


def _rule_check(row: dict) -> Callable[[ir.Node], str | None] | None:
    if "max_spatial_dims" in row:
        return _spatial_check(int(row["max_spatial_dims"]))
    if "attribute" in row:
        spec = row["attribute"]
        return _attribute_check(spec["name"], spec["default"], list(spec["allowed"]))
    return None


def _rules() -> list[OpRule]:
    groups = _TABLE["dtype_groups"]
    rules = []
    for row in _TABLE["rules"]:
        dtypes = frozenset(d for entry in row["dtypes"] for d in groups.get(entry, [entry]))
        check = _rule_check(row)
        rules += [OpRule(op, row["kind"], dtypes, domain=row.get("domain", ""), check=check) for op in row["ops"]]
    return rules


CAPABILITY_TABLE: dict[tuple[str, str], OpRule] = {(r.domain, r.op_type): r for r in _rules()}

# Canonical dtypes that need the tensor unit in that precision (checked against the device profile).
_TENSOR_PRECISION = {d: d for d in _TABLE["tensor_precision"]}


@dataclass
class NodePlacement:
    index: int
    name: str
    op_type: str
    device: str  # "maia" or "cpu"
    reason: str = ""
    value: str = ""  # the input/output the reason is about, when it is about one
    partition: int | None = None
    flops: float = 0.0
    compute_dtype: str = "fp32"


@dataclass
class PartitionInfo:
    index: int
    name: str
    node_indices: list[int]
    flops: float = 0.0
    bytes: float = 0.0
    est_time_s: float = 0.0


@dataclass
class Placement:
    """Where every node runs (and why not on the device), the device partitions and their roofline estimate."""

    device: str
    nodes: list[NodePlacement]
    partitions: list[PartitionInfo] = field(default_factory=list)

    def summary(self) -> dict:
        dev = [n for n in self.nodes if n.device == "maia"]
        cpu = [n for n in self.nodes if n.device == "cpu"]
        reasons: dict[str, int] = {}
        for n in cpu:
            reasons[n.reason] = reasons.get(n.reason, 0) + 1
        return {
            "device": self.device,
            "nodes_device": len(dev),
            "nodes_cpu": len(cpu),
            "flops_device": sum(n.flops for n in dev),
            "flops_cpu": sum(n.flops for n in cpu),
            "partitions": len(self.partitions),
            "est_device_time_s": sum(p.est_time_s for p in self.partitions),
            "fallback_reasons": dict(sorted(reasons.items())),
        }

    def to_dict(self) -> dict:
        return {
            "summary": self.summary(),
            "partitions": [vars(p) for p in self.partitions],
            "nodes": [vars(n) for n in self.nodes],
        }


def _device_profile(device):
    from maia_onnx.runtime.profiles import DeviceProfile, load_device

    return device if isinstance(device, DeviceProfile) else load_device(device)


def _supports_precision(profile, canon: str) -> bool:
    return profile.compute_dtype(canon) in profile.peak_flops


def _value_dtype(value: ir.Value | None) -> str | None:
    if value is None or value.type is None:
        return None
    dtype = value.dtype
    return CANONICAL_DTYPE.get(dtype, dtype.name.lower() if dtype is not None else None)


def node_reason(node: ir.Node, profile, excluded_ops: Iterable[str] = ()) -> tuple[str, str] | None:
    """Why ``node`` cannot run on the device, as (reason, offending value name or ""); None when it can."""
    if node.op_type in set(excluded_ops):
        return f"op {node.op_type} excluded by the user (--cpu-ops)", ""
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
        return f"control-flow op {node.op_type} (subgraphs run on the host)", ""
    rule = CAPABILITY_TABLE.get((node.domain or "", node.op_type))
    if rule is None:
        domain = f"{node.domain}::" if node.domain else ""
        return f"unsupported op {domain}{node.op_type} (not in the {profile.name} capability table)", ""
    for value in list(node.inputs) + list(node.outputs):
        if value is None:
            continue
        canon = _value_dtype(value)
        if canon is None:
            continue
        if canon not in rule.dtypes:
            return f"dtype {canon} unsupported for {node.op_type} (allowed: {', '.join(sorted(rule.dtypes))})", value.name
        precision = _TENSOR_PRECISION.get(canon)
        if precision and not _supports_precision(profile, precision):
            return f"dtype {canon} has no {profile.name} tensor format", value.name
    for value in list(node.inputs) + list(node.outputs):
        if value is not None and value.type is not None and value.shape is None:
            return "dynamic rank: tensor rank unknown (export with static rank or run shape inference)", value.name
    if rule.check is not None:
        reason = rule.check(node)
        if reason:
            return reason, ""
    return None


def _sized(dims: Mapping[str, int]) -> dict[str, int]:
    """Placement estimates size every symbolic dim nobody named at 1."""
    return {ANY_DIM: 1, **dims}


def _numel(value: ir.Value | None, dims: Mapping[str, int]) -> float:
    return float(value_numel(value, _sized(dims)) or 0)


def _node_flops(node: ir.Node, dims: Mapping[str, int]) -> float:
    """The project's one FLOP count (maia_onnx.graph.costs) at ``dims``."""
    return node_flops(node, _sized(dims))


def _compute_dtype(node: ir.Node) -> str:
    """Precision of a tensor op: the stored format of a weight fed through DequantizeLinear, else the value dtype."""
    best = "fp32"
    for value in node.inputs:
        if value is None:
            continue
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0] is not None:
            canon = _value_dtype(producer.inputs[0])
            block = _attr(producer, "block_size", 0)
            if canon in ("fp8", "int8", "fp4", "int4"):
                return f"mx{canon}" if block else canon
        canon = _value_dtype(value)
        if canon in ("bf16", "fp16"):
            best = canon
    return best


def _unique_names(graph: ir.Graph) -> None:
    """Give every node and value a unique name: partitions and EPContext wiring are by name."""
    seen: set[str] = set()
    for i, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    counter = 0
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        for value in node.outputs:
            if not value.name:
                while f"_maia_v{counter}" in names:
                    counter += 1
                value.name = f"_maia_v{counter}"
            names.add(value.name)


def ensure_shapes(model: ir.Model) -> None:
    """Infer the shapes a model lacks (exported models already carry them); weights are never read."""
    if any(v.type is None or v.shape is None for node in model.graph for v in node.outputs):
        infer_shapes(model)


def get_capability(
    model: ir.Model,
    device="maia100",
    excluded_ops: Iterable[str] = (),
    dims: Mapping[str, int] | None = None,
) -> Placement:
    """Place every node of ``model`` (device or CPU with a reason) and group device nodes into partitions."""
    profile = _device_profile(device)
    dims = dict(dims or {})
    graph = model.graph
    _unique_names(graph)
    ensure_shapes(model)
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    excluded = set(excluded_ops)
    unknown = excluded - {op for _, op in CAPABILITY_TABLE} - {n.op_type for n in nodes}
    if unknown:
        raise InvalidOptionError(f"--cpu-ops names ops absent from the model and table: {', '.join(sorted(unknown))}; check the spelling")
    verdicts = [node_reason(n, profile, excluded) for n in nodes]
    on_device = [v is None for v in verdicts]
    reasons = [v[0] if v else None for v in verdicts]
    reason_values = [v[1] if v else "" for v in verdicts]

    def preds(i: int) -> list[int]:
        out = []
        for v in nodes[i].inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in index:
                out.append(index[id(p)])
        return out

    pred_lists = [preds(i) for i in range(len(nodes))]
    _hoist_index_ancestors(nodes, pred_lists, on_device, reasons)
    pullable = _pullable(nodes, pred_lists, {id(v) for v in graph.inputs if v.name not in graph.initializers})
    # Demote partitions that compute nothing (only shapes/constants/reshapes): no device launch pays off for them.
    while True:
        groups = _group(nodes, pred_lists, on_device, pullable)
        demoted = False
        for members in groups:
            kinds = {CAPABILITY_TABLE[(nodes[i].domain or "", nodes[i].op_type)].kind for i in members}
            if not kinds & COMPUTE_KINDS:
                for i in members:
                    on_device[i] = False
                    reasons[i] = "partition without compute (shape/data ops only) stays on the host"
                demoted = True
        if not demoted:
            break

    placements = []
    for i, node in enumerate(nodes):
        placements.append(
            NodePlacement(
                index=i, name=node.name, op_type=node.op_type, device="maia" if on_device[i] else "cpu",
                reason=reasons[i] or "", value=reason_values[i], flops=_node_flops(node, dims), compute_dtype=_compute_dtype(node),
            )
        )
    partitions = []
    for p, members in enumerate(groups):
        for i in members:
            placements[i].partition = p
        info = PartitionInfo(index=p, name=f"maia_partition_{p}", node_indices=members)
        _estimate(info, nodes, placements, profile, dims)
        partitions.append(info)
    return Placement(device=profile.name, nodes=placements, partitions=partitions)


HOISTED = "host-side index arithmetic feeding a host op (computed first, fed to the device)"


def _index_only(node: ir.Node) -> bool:
    """Whether ``node`` only computes indices, shapes or masks (every output int64/int32/bool, not a tensor op)."""
    rule = CAPABILITY_TABLE.get((node.domain or "", node.op_type))
    if rule is None or rule.kind == TENSOR:
        return False
    return bool(node.outputs) and all(_value_dtype(v) == "index" for v in node.outputs)


def _hoist_index_ancestors(nodes: list[ir.Node], pred_lists: list[list[int]], on_device: list[bool],
                           reasons: list[str | None]) -> None:
    """Move to the host the device ancestors of a CPU node when all of them are index arithmetic.

    Such a CPU node (a GatherND of the attention-mask code) then depends on graph inputs and initializers only:
    the host computes it before the device runs and feeds it in, instead of cutting the device graph in two.
    """
    for c in range(len(nodes)):
        if on_device[c]:
            continue
        ancestors: set[int] = set()
        stack = list(pred_lists[c])
        while stack:
            a = stack.pop()
            if a not in ancestors:
                ancestors.add(a)
                stack.extend(pred_lists[a])
        device = [a for a in ancestors if on_device[a]]
        if device and all(_index_only(nodes[a]) for a in device):
            for a in device:
                on_device[a] = False
                reasons[a] = HOISTED


def _pullable(nodes: list[ir.Node], pred_lists: list[list[int]], graph_inputs: set[int]) -> list[bool]:
    """Nodes computed from initializers/constants alone, or index arithmetic on graph inputs alone (see module doc)."""
    pull = [False] * len(nodes)
    for i, node in enumerate(nodes):
        reads_input = any(v is not None and id(v) in graph_inputs for v in node.inputs)
        pull[i] = all(pull[p] for p in pred_lists[i]) and (not reads_input or _index_only(node))
    return pull


def _levels(pred_lists: list[list[int]], on_device: list[bool], pullable: list[bool]) -> list[int]:
    """Levels as early as possible, then pullable nodes as late as their consumers allow (see the module doc)."""
    n = len(pred_lists)

    def hand_off(p: int, c: int) -> int:
        return 1 if on_device[p] and not on_device[c] else 0

    level = [0] * n
    # nodes are in topological order (onnx_ir keeps graph order, which ONNX requires to be topological)
    for i in range(n):
        level[i] = max((level[p] + hand_off(p, i) for p in pred_lists[i]), default=0)
    consumers: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for p in pred_lists[i]:
            consumers[p].append(i)
    for i in reversed(range(n)):  # consumers are final before their producers are visited
        if consumers[i] and pullable[i]:
            level[i] = max(level[i], min(level[c] - hand_off(i, c) for c in consumers[i]))
    return level


def _group(nodes: list[ir.Node], pred_lists: list[list[int]], on_device: list[bool], pullable: list[bool]) -> list[list[int]]:
    """Device partitions: connected components of device-device edges among nodes of equal level."""
    level = _levels(pred_lists, on_device, pullable)
    parent = list(range(len(nodes)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in range(len(nodes)):
        if not on_device[i]:
            continue
        for p in pred_lists[i]:
            if on_device[p] and level[p] == level[i]:
                parent[find(p)] = find(i)
    comps: dict[int, list[int]] = {}
    for i in range(len(nodes)):
        if on_device[i]:
            comps.setdefault(find(i), []).append(i)
    return sorted(comps.values(), key=lambda m: m[0])


def _bytes_of(value: ir.Value | None, dims: Mapping[str, int]) -> float:
    if value is None or value.type is None:
        return 0.0
    from maia_onnx.runtime.profiles import DTYPE_BYTES

    canon = _value_dtype(value)
    size = {"index": value.dtype.itemsize if value.dtype is not None else 8}.get(canon, DTYPE_BYTES.get(canon, 4))
    return _numel(value, dims) * size


def _estimate(info: PartitionInfo, nodes, placements, profile, dims) -> None:
    """Roofline time of one partition: max(tensor+vector compute time, bytes moved / HBM bandwidth)."""
    members = set(info.node_indices)
    member_nodes = {id(nodes[i]) for i in members}
    compute_s = 0.0
    flops = 0.0
    moved = 0.0
    seen: set[int] = set()
    for i in info.node_indices:
        node = nodes[i]
        rule = CAPABILITY_TABLE[(node.domain or "", node.op_type)]
        f = placements[i].flops
        flops += f
        if rule.kind == TENSOR:
            compute_s += f / profile.peak(placements[i].compute_dtype)
        elif f:
            compute_s += f / profile.vector_flops
        for v in node.inputs:
            if v is None or id(v) in seen:
                continue
            producer = v.producer()
            if producer is None or id(producer) not in member_nodes:  # weights and partition inputs are read once
                seen.add(id(v))
                moved += _bytes_of(v, dims)
        for v in node.outputs:
            if id(v) in seen:
                continue
            external = v.is_graph_output() or any(id(c) not in member_nodes for c, _ in v.uses())
            if external:
                seen.add(id(v))
                moved += _bytes_of(v, dims)
    info.flops = flops
    info.bytes = moved
    info.est_time_s = max(compute_s, moved / profile.memory_bandwidth) if (flops or moved) else 0.0


def placement_rows(placement: Placement) -> list[dict]:
    """Per-op-type rows for a terminal table: how many nodes run where, FLOPs, and why not on the device."""
    rows: dict[tuple[str, str, str], dict] = {}
    for n in placement.nodes:
        key = (n.op_type, n.device, n.reason)
        row = rows.setdefault(key, {"op": n.op_type, "where": n.device, "nodes": 0, "flops": 0.0, "reason": n.reason})
        row["nodes"] += 1
        row["flops"] += n.flops
    return sorted(rows.values(), key=lambda r: (r["where"], r["op"], r["reason"]))


def partition_rows(placement: Placement) -> list[dict]:
    return [
        {"partition": p.name, "nodes": len(p.node_indices), "flops": p.flops, "bytes": p.bytes,
         "est_time_us": p.est_time_s * 1e6}
        for p in placement.partitions
    ]
