"""Analyse a model or a partition directory: per-op roofline per phase and the TP x PP x interconnect what-if.

A single model is priced analytically (``perfmodel.sweep``); a partition directory is priced from what
its rank files contain: each rank's own ops, its collective nodes, and the pipeline sends of the stage
boundary tensors it actually outputs (dtype and shape from the rank file).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import onnx_ir as ir

from maia_onnx.analyze.workload import build_workload, load_graph, past_inputs
from maia_onnx.errors import InvalidOptionError, UnsupportedModelError
from maia_onnx.graph.costs import value_bytes
from maia_onnx.partition.manifest import Manifest, is_partition_dir, load_rank_model, read_manifest
from maia_onnx.runtime.perfmodel import (
    Workload,
    arithmetic_intensity,
    best_config,
    bubble_fraction,
    default_microbatches,
    estimate_rank,
    op_time,
    p2p_time,
    sweep,
)
from maia_onnx.runtime.profiles import DeviceProfile, InterconnectProfile, load_device, load_interconnect

PHASES = ("prefill", "decode")
DEFAULT_TPS = (1, 2, 4, 8)
DEFAULT_PPS = (1, 2, 4)


def op_rows(work: Workload, device: DeviceProfile) -> list[dict]:
    rows = []
    for op in work.ops:
        if op.kind == "folded":
            continue
        t, bound = op_time(op, device)
        rows.append({
            "name": op.name, "op_type": op.op_type, "kind": op.kind, "dtype": op.compute_dtype,
            "flops": op.flops, "bytes": op.bytes_moved, "intensity": arithmetic_intensity(op.flops, op.bytes_moved),
            "time_s": t, "bound": bound,
        })
    return rows


def phase_summary(work: Workload, device: DeviceProfile) -> dict:
    rows = op_rows(work, device)
    total_t = sum(r["time_s"] for r in rows)
    by_type: dict[str, dict] = defaultdict(lambda: {"count": 0, "flops": 0.0, "bytes": 0.0, "time_s": 0.0})
    for r in rows:
        agg = by_type[r["op_type"]]
        agg["count"] += 1
        agg["flops"] += r["flops"]
        agg["bytes"] += r["bytes"]
        agg["time_s"] += r["time_s"]
    flops = sum(r["flops"] for r in rows)
    moved = sum(r["bytes"] for r in rows)
    return {
        "phase": work.phase, "batch": work.batch, "seq": work.seq, "past": work.past,
        "flops": flops, "bytes": moved, "intensity": arithmetic_intensity(flops, moved),
        "time_s": total_t,
        "compute_bound_time_s": sum(r["time_s"] for r in rows if r["bound"] == "compute"),
        "memory_bound_time_s": sum(r["time_s"] for r in rows if r["bound"] == "memory"),
        "weight_bytes": work.weight_bytes, "kv_cache_bytes": work.kv_bytes,
        "by_op_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["time_s"])),
        "ops": rows,
    }


def _phases_for(model: ir.Model, batch: int, seq: int, past: int | None, phases: Sequence[str]) -> list[tuple[str, int, int, int]]:
    past = seq if past is None else past
    if not past_inputs(model):
        return [("forward", batch, seq, 0)]
    plan = []
    if "prefill" in phases:
        plan.append(("prefill", batch, seq, 0))
    if "decode" in phases:
        plan.append(("decode", batch, 1, past))
    return plan


def _device_and_links(
    device: str | DeviceProfile, interconnects: Sequence[str] | None
) -> tuple[DeviceProfile, list[InterconnectProfile]]:
    """The device profile and the interconnects to price (the device's default one when none is named)."""
    dev = device if isinstance(device, DeviceProfile) else load_device(device)
    names = list(interconnects or []) or [dev.default_interconnect or "nvlink4"]
    return dev, [load_interconnect(n) for n in names]


def _check_degrees(values: Sequence[int], what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if not out or out[0] < 1:
        raise InvalidOptionError(f"{what} degrees must be positive integers, got {list(values)}")
    return out


def _check_sizes(batch: int, seq: int, past: int | None) -> None:
    if batch < 1 or seq < 1 or (past is not None and past < 0):
        raise InvalidOptionError(f"--batch and --seq must be >= 1 and --past >= 0 (got {batch}, {seq}, {past})")


def analyze_model(
    path: str | Path,
    device: str | DeviceProfile = "maia100",
    interconnects: Sequence[str] | None = None,
    batch: int = 1,
    seq: int = 128,
    past: int | None = None,
    memory_limit: float | None = None,
    tps: Sequence[int] = DEFAULT_TPS,
    pps: Sequence[int] = DEFAULT_PPS,
    microbatches: int | None = None,
    dims: Mapping[str, int] | None = None,
    compute_dtype: str | None = None,
    phases: Sequence[str] = PHASES,
) -> dict:
    """Roofline per op plus the TP x PP x interconnect what-if for one ONNX model (weights not loaded)."""
    _check_sizes(batch, seq, past)
    dev, links = _device_and_links(device, interconnects)
    tps, pps = _check_degrees(tps, "TP"), _check_degrees(pps, "PP")
    model = load_graph(path)
    report = {"model": str(path), "kind": "model", "device": dev.to_dict(),
              "interconnects": [link.to_dict() for link in links],
              "memory_limit": memory_limit or dev.memory_capacity, "phases": {}}
    for phase, b, s, p in _phases_for(model, batch, seq, past, phases):
        work = build_workload(model, phase, b, s, p, dims, compute_dtype)
        summary = phase_summary(work, dev)
        summary["structure"] = {k: getattr(work, k) for k in ("layers", "hidden", "vocab", "num_heads", "kv_heads", "head_dim")}
        estimates = sweep(work, dev, links, tps, pps, microbatches, memory_limit)
        summary["configs"] = [e.to_dict() for e in estimates]
        best = best_config(estimates)
        summary["best"] = best.to_dict() if best else None
        report["phases"][phase] = summary
    return report


# ---------------------------------------------------------------------------------------------- partitions


def stage_sends(manifest: Manifest, models: Mapping[tuple[int, int], ir.Model]) -> dict[tuple[int, int], list[tuple[str, int, float]]]:
    """Pipeline point-to-point sends per (tp_rank, stage): [(tensor, receiving stage, bytes per forward)].

    A boundary tensor is an output of stage s that a later stage t takes as input; tp rank r of stage s
    sends its own full copy to tp rank r of stage t, once per receiving stage. Sizes are the rank file's
    output value at its stored dtype and the shapes ``build_workload`` inferred for the phase.
    """
    consumers = manifest.stage_consumers()
    sends: dict[tuple[int, int], list[tuple[str, int, float]]] = {}
    for (r, st), model in sorted(models.items()):
        rows = []
        for value in model.graph.outputs:
            later = sorted({t for t in consumers.get(value.name, ()) if t > st})
            if not later:
                continue
            size = value_bytes(value)
            if size is None:
                raise UnsupportedModelError(f"cannot infer the shape of boundary tensor {value.name!r} of stage {st}: "
                                            "pass its symbolic dims with --dim NAME=VALUE")
            rows.extend((value.name, t, size) for t in later)
        sends[(r, st)] = rows
    return sends


def analyze_partition(
    directory: str | Path,
    device: str | DeviceProfile = "maia100",
    interconnects: Sequence[str] | None = None,
    batch: int = 1,
    seq: int = 128,
    past: int | None = None,
    memory_limit: float | None = None,
    microbatches: int | None = None,
    dims: Mapping[str, int] | None = None,
    compute_dtype: str | None = None,
    phases: Sequence[str] = PHASES,
) -> dict:
    """Price an existing partition: each rank file's ops, the collectives and the pipeline sends it contains."""
    _check_sizes(batch, seq, past)
    directory = Path(directory)
    manifest = read_manifest(directory)
    dev, links = _device_and_links(device, interconnects)
    tp, pp = manifest.tp, manifest.pp
    limit = memory_limit or dev.memory_capacity
    models = {(r, s): load_rank_model(manifest, r, s) for r, s, _ in manifest.rank_files()}
    first = models[min(models)]
    report = {"model": str(directory), "kind": "partition", "tp": tp, "pp": pp, "device": dev.to_dict(),
              "interconnects": [link.to_dict() for link in links], "memory_limit": limit, "phases": {}}
    for phase, b, s, p in _phases_for(first, batch, seq, past, phases):
        m = microbatches or default_microbatches(b, pp)
        m = max(1, min(m, b))
        works = {key: build_workload(model, phase, b, s, p, dims, compute_dtype) for key, model in models.items()}
        sends = stage_sends(manifest, models)  # shapes as build_workload just inferred them for this phase
        ranks, configs = [], []
        for link in links:
            stage_time: dict[int, tuple[float, float, float, float]] = {}
            for (r, st), work in sorted(works.items()):
                est = estimate_rank(work.ops, dev, link, r, st)
                kv = work.kv_io_bytes
                memory = est.weight_bytes + kv + est.activation_bytes
                # one send per microbatch per boundary tensor, like the analytic what-if (estimate_config)
                rank_sends = sends.get((r, st), [])
                p2p_bytes = sum(size for _, _, size in rank_sends)
                p2p_s = sum(m * p2p_time(size / m, link.bandwidth, link.alpha) for _, _, size in rank_sends)
                comm_s = est.comm_s + p2p_s
                ranks.append({"interconnect": link.name, "rank": r, "stage": st, "compute_s": est.compute_s,
                              "comm_s": comm_s, "p2p_s": p2p_s, "p2p_bytes": p2p_bytes,
                              "p2p_tensors": [name for name, _, _ in rank_sends], "collectives": est.collectives,
                              "collective_bytes": est.collective_bytes, "by_collective": est.by_kind,
                              "weight_bytes": est.weight_bytes, "kv_bytes": kv,
                              "activation_bytes": est.activation_bytes, "memory_bytes": memory,
                              "fits": memory <= limit})
                prev = stage_time.get(st, (0.0, 0.0, 0.0, 0.0))
                if est.compute_s + comm_s > prev[0] + prev[1]:
                    stage_time[st] = (est.compute_s, comm_s, p2p_s, p2p_bytes)
            # the whole batch through the slowest stage (its sends included); GPipe bubble on top
            compute, comm, p2p_s, p2p_bytes = max(stage_time.values(), key=lambda v: v[0] + v[1])
            busy = compute + comm
            bubble = busy * (pp - 1) / m if pp > 1 else 0.0
            link_ranks = [x for x in ranks if x["interconnect"] == link.name]
            configs.append({"phase": phase, "interconnect": link.name, "tp": tp, "pp": pp, "microbatches": m,
                            "compute_s": compute, "comm_s": comm, "p2p_s": p2p_s, "p2p_bytes": p2p_bytes,
                            "bubble_s": bubble, "total_s": busy + bubble,
                            "bubble_fraction": bubble_fraction(pp, m),
                            "collectives": max(x["collectives"] for x in link_ranks),
                            "collective_bytes": max(x["collective_bytes"] for x in link_ranks),
                            "memory_bytes": max(x["memory_bytes"] for x in link_ranks),
                            "fits": all(x["fits"] for x in link_ranks), "devices": tp * pp, "valid": True, "note": ""})
        summary = phase_summary(works[min(works)], dev)
        summary["ranks"] = ranks
        summary["configs"] = configs
        fitting = [c for c in configs if c["fits"]]
        summary["best"] = min(fitting, key=lambda c: c["total_s"]) if fitting else None
        report["phases"][phase] = summary
    return report


def analyze(path: str | Path, **options) -> dict:
    """Entry point: a partition directory (manifest.json) or a single ONNX model."""
    path = Path(path)
    if is_partition_dir(path):
        options.pop("tps", None)
        options.pop("pps", None)
        return analyze_partition(path, **options)
    return analyze_model(path, **options)
