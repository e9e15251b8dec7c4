"""Re-sharding: turn a partition directory into another TP/PP layout from its shards alone.

A partition written by ``partition_model`` carries ``source_graph.onnx``: the unsharded graph whose
large initializers are placeholders. ``rebuild_source`` puts every full tensor back lazily (one
tensor at a time, concatenating the tp shards along the axis the manifest records) and
``reshard`` partitions that rebuilt model again, so TP4 -> TP2 gives the same files as a direct TP2; the new
shards are checked against the rebuilt unsharded model (run in ORT) before the output directory appears.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError, UserError
from maia_onnx.io import check_output_path, load_model
import maia_onnx.partition.checkpoint as ckpt
from maia_onnx.partition.manifest import PLACEHOLDER_LOCATION, SOURCE_GRAPH, Manifest, read_manifest
from maia_onnx.partition.plan import partition_model
from maia_onnx.passes.pipeline_parallel import PipelinePlan


class _ShardReader:
    """Lazy access to every rank file's initializers of a partition (memory-mapped; nothing read eagerly)."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.where: dict[str, list[tuple[int, int]]] = {}
        for entry in manifest.ranks:
            proto = onnx.load(str(manifest.directory / entry["file"]), load_external_data=False)
            for init in proto.graph.initializer:
                self.where.setdefault(init.name, []).append((entry["tp_rank"], entry["stage"]))
        self._models: dict[tuple[int, int], ir.Model] = {}

    def model(self, tp_rank: int, stage: int) -> ir.Model:
        key = (tp_rank, stage)
        if key not in self._models:
            self._models[key] = load_model(self.manifest.rank_path(tp_rank, stage))
        return self._models[key]

    def shard(self, name: str, tp_rank: int, sharded: bool = False) -> np.ndarray:
        # The TP pass names a shard ``<name>__tp`` while the full weight is still used in the same file.
        if sharded and any(k[0] == tp_rank for k in self.where.get(f"{name}__tp", [])):
            name = f"{name}__tp"
        holders = [k for k in self.where.get(name, []) if k[0] == tp_rank]
        if not holders:
            raise UserError(
                f"weight {name!r} of tp rank {tp_rank} is in no shard file of {self.manifest.directory}: the partition is "
                "incomplete or mismatched with its manifest; re-run partition"
            )
        tensor = self.model(*holders[0]).graph.initializers[name].const_value
        # A private copy, then drop the memory map: mapped pages would otherwise stay resident for every
        # tensor read so far and the whole partition would end up in this process's RSS.
        array = np.array(tensor.numpy(), copy=True)
        release = getattr(tensor, "release", None)
        if callable(release):
            release()
        return array


def _ranges(spec_range) -> list[tuple[int, int]]:
    if spec_range is None:
        return []
    if isinstance(spec_range[0], (list, tuple)):
        return [(int(a), int(b)) for a, b in spec_range]
    return [(int(spec_range[0]), int(spec_range[1]))]


def _full_tensor(reader: _ShardReader, name: str, placeholder: ir.TensorProtocol) -> Callable[[], ir.Tensor]:
    spec = reader.manifest.tensors.get(name, {"kind": "replicated"})
    shape = tuple(int(d) for d in placeholder.shape.numpy())

    def build() -> ir.Tensor:
        axis = spec.get("axis")
        shards = spec.get("shards") or {}
        if spec.get("kind", "replicated") == "replicated" or axis is None or not shards:
            arr = reader.shard(name, 0)
        else:
            first = reader.shard(name, 0, sharded=True)
            arr = np.empty(shape, dtype=first.dtype)
            covered = np.zeros(shape[axis], dtype=bool)  # fused blocks held by every rank (a lone K/V head) overlap
            for t_key, rng in sorted(shards.items(), key=lambda kv: int(kv[0])):
                piece = first if int(t_key) == 0 else reader.shard(name, int(t_key), sharded=True)
                offset = 0
                for start, stop in _ranges(rng):
                    index = [slice(None)] * len(shape)
                    index[axis] = slice(start, stop)
                    src = [slice(None)] * len(shape)
                    src[axis] = slice(offset, offset + stop - start)
                    arr[tuple(index)] = piece[tuple(src)]
                    offset += stop - start
                    covered[start:stop] = True
            if not covered.all():
                raise UserError(
                    f"shards of {name!r} cover {int(covered.sum())} of {shape[axis]} rows on axis {axis}: the manifest is mismatched; re-run partition"
                )
        if tuple(arr.shape) != shape:
            raise UserError(
                f"weight {name!r} rebuilt as {list(arr.shape)} but the source graph expects {list(shape)}: manifest and shards are mismatched"
            )
        return ir.Tensor(arr, dtype=placeholder.dtype, name=name)

    return build


def rebuild_source(partition_dir: str | os.PathLike) -> ir.Model:
    """The unsharded model of a partition, weights rebuilt lazily from its shards (no original model needed)."""
    manifest = read_manifest(partition_dir)
    graph_path = Path(partition_dir) / SOURCE_GRAPH
    if not graph_path.is_file():
        raise UserError(
            f"{partition_dir} has no {SOURCE_GRAPH}: it was written without re-sharding support; partition the original model again"
        )
    skeleton = ir.load(graph_path)
    reader = _ShardReader(manifest)
    for name, value in skeleton.graph.initializers.items():
        t = value.const_value
        if isinstance(t, ir.ExternalTensor) and t.location == PLACEHOLDER_LOCATION:
            value.const_value = ir.LazyTensor(_full_tensor(reader, name, t), dtype=t.dtype, shape=t.shape, name=name)
    return skeleton


def reshard(partition_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int | None = None, pp: int | None = None,
            balance: str | None = None, progress=None, verify: bool = True) -> tuple[Manifest, PipelinePlan]:
    """Write ``out_dir``: the partition at ``partition_dir`` re-split to ``tp`` x ``pp`` (defaults: unchanged).

    ``verify``: run the new shards against the unsharded model rebuilt from the old ones before ``out_dir``
    appears (``ValidationError`` and nothing written on disagreement); the manifest's ``verification`` says so.
    """
    partition_dir = Path(partition_dir)
    out_dir = Path(out_dir)
    manifest = read_manifest(partition_dir)
    if out_dir.resolve() == partition_dir.resolve():
        raise UserError(f"-o {out_dir} is the input partition: choose a different output directory")
    tp = manifest.tp if tp is None else tp
    pp = manifest.pp if pp is None else pp
    old_balance = manifest.data.get("extra", {}).get("pipeline", {}).get("balance", "flops")
    balance = balance or old_balance
    if tp < 1 or pp < 1:
        raise InvalidOptionError(f"--tp {tp} --pp {pp} is invalid: both must be >= 1")
    model = rebuild_source(partition_dir)
    source = manifest.data["source"]
    return partition_model(
        model, out_dir, tp=tp, pp=pp, balance=balance, source_path=source.get("path"), source_hash=source.get("sha256"),
        progress=progress, verify=verify,
    )


def stage_report(manifest: Manifest, plan: PipelinePlan) -> dict[str, Any]:
    """JSON-able summary of a written partition: mesh, per-stage load/boundaries/weights, imbalance."""
    weights: dict[int, int] = {}
    for entry in manifest.ranks:
        weights[entry["stage"]] = weights.get(entry["stage"], 0) + int(entry.get("weight_bytes") or 0)
    stages = []
    for row, stage in zip(plan.rows(), manifest.stages):
        stages.append(
            {
                "stage": row["stage"],
                "nodes": row["nodes"],
                "load": row[f"load_{plan.balance}"],
                "share_pct": row["share_pct"],
                "inputs": len(stage["inputs"]),
                "boundary_out": row["boundary_out"],
                "weight_bytes": weights.get(row["stage"], 0),
            }
        )
    return {
        "output": str(manifest.directory),
        "tp": manifest.tp,
        "pp": manifest.pp,
        "balance": plan.balance,
        "imbalance_pct": round(plan.imbalance_pct, 3),
        "collectives": len(manifest.collectives),
        "stages": stages,
    }


def reshard_directory(partition_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int | None = None,
                      pp: int | None = None, balance: str | None = None, load_checkpoint: str | os.PathLike | None = None,
                      save_checkpoint: str | os.PathLike | None = None, progress: bool = False,
                      verify: bool = True) -> dict[str, Any]:
    """The `reshard` verb: optional checkpoint swap, re-split (checked against the unsharded model unless
    ``verify`` is off), optional checkpoint of the result; returns a report (``verification`` included)."""
    partition_dir = Path(partition_dir)
    out_dir = Path(out_dir)
    check_output_path(out_dir, partition_dir)
    source = partition_dir
    with tempfile.TemporaryDirectory(prefix=".reshard-", dir=out_dir.parent if str(out_dir.parent) else ".") as scratch:
        if load_checkpoint is not None:
            source = Path(scratch) / "swapped"
            ckpt.load_checkpoint(partition_dir, load_checkpoint, source, progress=progress)
        bar = None
        callback = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="write shards", unit="B", unit_scale=True, file=sys.stderr)
            callback = bar.update
        try:
            manifest, plan = reshard(source, out_dir, tp=tp, pp=pp, balance=balance, progress=callback, verify=verify)
        finally:
            if bar is not None:
                bar.close()
    report = stage_report(manifest, plan)
    report["input"] = str(partition_dir)
    report["verification"] = manifest.verification.as_dict()
    if load_checkpoint is not None:
        report["loaded_checkpoint"] = str(load_checkpoint)
    if save_checkpoint is not None:
        index = ckpt.save_checkpoint(out_dir, save_checkpoint, progress=progress)
        report["checkpoint"] = {"dir": str(save_checkpoint), "files": len(index["files"])}
    return report


__all__ = ["rebuild_source", "reshard", "reshard_directory", "stage_report"]
