"""Partition directories: the manifest schema and its only reader and validator.

A partition directory holds one ONNX model per (tensor-parallel rank, pipeline stage) plus ``manifest.json``::

    DIR/manifest.json
    DIR/rank{t}_stage{s}.onnx          # standalone, checker-clean ONNX (imports com.microsoft for collectives)
    DIR/rank{t}_stage{s}.onnx.data     # that file's own external weights (absent when it has none)
    DIR/source_graph.onnx              # the unsharded graph, its sharded weights as placeholders (for reshard)

``t`` is the tensor-parallel rank inside a stage (0..tp-1), ``s`` the pipeline stage (0..pp-1); the global
device rank is ``s * tp + t``.

Manifest (``format: "maia-onnx-partition"``, ``version: 1``; JSON, keys sorted)::

    mesh:        {tp, pp, world_size}
    source:      {path, sha256, inputs: [io], outputs: [io]}   # io = {name, dtype, shape}; shape items int|str|null
    ranks:       [{rank, tp_rank, stage, file, data|null, weight_bytes, sha256}]      # one per file
                 # sha256 of the .onnx file: the reader refuses a rank file edited or swapped afterwards
    stages:      [{stage, inputs: [names], outputs: [names]}]
                 # a stage's graph inputs are source inputs or outputs of earlier stages (same tp_rank feeds
                 # same tp_rank); its outputs are source outputs or tensors later stages consume
    inputs:      {name: {sharding: "replicated"|"split", axis: int|null}}
                 # how the executor feeds a full source input to each tp rank: "split" = rank t gets
                 # the t-th of tp equal chunks along axis (e.g. a KV cache split by heads)
    outputs:     {name: {sharding: "replicated"|"split", axis: int|null, stage: int}}
                 # how the full output is assembled: replicated = take tp rank 0, split = concat along axis
    collectives: [{id, stage, op: "AllReduce"|"AllGather", node, input, output, axis|null, group_size,
                   group: [global ranks], dtype, elements_per_token}]
                 # in execution order; node/input/output are the same names in every tp rank of the stage
    tensors:     {source initializer name: {kind, axis|null, full_shape, shards: {tp_rank: [start, stop]},
                   sections?: k}}
                 # kind: column | row | vocab | replicated | sliced (which part of the weight went where);
                 # fused weights (GPT-2 Q|K|V, sections=k) list k [start, stop] ranges per rank, concatenated
                 # in that order in the rank's tensor
    microbatch:  {axis: 0}     # axis along which run_partition splits inputs into pipeline microbatches
    extra:       {...}         # free-form provenance (pass options, PP balance, etc.)

The schema is shared by the partition writer (``plan``, ``writer``), resharding, checkpoints, the in-process
executor, the torchrun worker, ``analyze`` and ``batch``; everything that reads a partition directory reads it
through ``read_manifest`` and the ``Manifest`` accessors here, never by parsing file names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from maia_onnx.errors import UserError
from maia_onnx.io import load_model, model_content_hash, sha256_file

FORMAT = "maia-onnx-partition"
VERSION = 1
MANIFEST = "manifest.json"
SOURCE_GRAPH = "source_graph.onnx"
PLACEHOLDER_LOCATION = "__maia_sharded__"  # in source_graph.onnx: a weight stored in the shards, not in the file
INLINE_LIMIT_BYTES = 1024  # smaller tensors stay inside the .onnx file (rank files and source_graph.onnx)

COLLECTIVE_DOMAIN = "com.microsoft"
COLLECTIVE_OPS = ("AllReduce", "AllGather")


def rank_file_name(tp_rank: int, stage: int) -> str:
    return f"rank{tp_rank}_stage{stage}.onnx"


def global_rank(tp_rank: int, stage: int, tp: int) -> int:
    return stage * tp + tp_rank


class PartitionError(UserError):
    """A partition directory is missing, inconsistent or does not match its manifest."""


@dataclass
class Manifest:
    """Typed access to manifest.json (``data`` is the plain dict that is written).

    ``plan``: the pipeline plan (stage loads, imbalance) of the call that wrote the directory, when this
    object comes from that call; it is not persisted beyond what ``extra.pipeline`` records. ``verification``:
    that call's self-check of the shards against the unsharded model (``verify.Verification``), not persisted.
    """

    data: dict[str, Any]
    directory: Path | None = None
    plan: Any = field(default=None, repr=False, compare=False)
    verification: Any = field(default=None, repr=False, compare=False)  # the writing call's self-check (verify.py)

    @property
    def tp(self) -> int:
        return int(self.data["mesh"]["tp"])

    @property
    def pp(self) -> int:
        return int(self.data["mesh"]["pp"])

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def source(self) -> dict[str, Any]:
        return self.data["source"]

    @property
    def extra(self) -> dict[str, Any]:
        return self.data.get("extra", {})

    @property
    def microbatch_axis(self) -> int:
        return int(self.data.get("microbatch", {}).get("axis", 0))

    @property
    def ranks(self) -> list[dict[str, Any]]:
        return self.data["ranks"]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.data["stages"]

    @property
    def collectives(self) -> list[dict[str, Any]]:
        return self.data.get("collectives", [])

    @property
    def inputs(self) -> dict[str, dict[str, Any]]:
        return self.data.get("inputs", {})

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        return self.data.get("outputs", {})

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        return self.data.get("tensors", {})

    def rank_entry(self, tp_rank: int, stage: int) -> dict[str, Any]:
        for entry in self.ranks:
            if entry["tp_rank"] == tp_rank and entry["stage"] == stage:
                return entry
        raise PartitionError(f"manifest has no rank {tp_rank} stage {stage}: the partition is incomplete; re-run partition")

    def rank_path(self, tp_rank: int, stage: int) -> Path:
        base = self.directory or Path(".")
        return base / self.rank_entry(tp_rank, stage)["file"]

    def rank_files(self) -> list[tuple[int, int, Path]]:
        """``(tp_rank, stage, path)`` of every rank file, by global rank (stage-major)."""
        base = self.directory or Path(".")
        return [(r["tp_rank"], r["stage"], base / r["file"]) for r in sorted(self.ranks, key=lambda r: r["rank"])]

    def stage_consumers(self) -> dict[str, list[int]]:
        """Tensor name -> the stages that take it as a graph input (boundary tensors and source inputs)."""
        consumers: dict[str, list[int]] = {}
        for st in sorted(self.stages, key=lambda s: s["stage"]):
            for name in st["inputs"]:
                consumers.setdefault(name, []).append(int(st["stage"]))
        return consumers

    def source_output_names(self) -> list[str]:
        return [o["name"] for o in self.data["source"]["outputs"]]

    def source_input_names(self) -> list[str]:
        return [i["name"] for i in self.data["source"]["inputs"]]


def io_spec(value: ir.Value) -> dict[str, Any]:
    """JSON description of a graph input/output: name, dtype name, shape (ints, symbols or null)."""
    shape = None
    if value.shape is not None:
        shape = [d if isinstance(d, int) else (str(d) if d is not None and str(d) else None) for d in value.shape]
    return {"name": value.name, "dtype": value.dtype.name if value.dtype is not None else None, "shape": shape}


def new_manifest(tp: int, pp: int, source_model: ir.Model, source_path: str | os.PathLike | None, source_hash: str | None) -> dict[str, Any]:
    """A manifest skeleton with mesh and source filled in; callers add stages, inputs, outputs, collectives, tensors."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "mesh": {"tp": tp, "pp": pp, "world_size": tp * pp},
        "source": {
            "path": str(source_path) if source_path is not None else None,
            "sha256": source_hash,
            "inputs": [io_spec(v) for v in source_model.graph.inputs],
            "outputs": [io_spec(v) for v in source_model.graph.outputs],
        },
        "ranks": [],
        "stages": [],
        "inputs": {},
        "outputs": {},
        "collectives": [],
        "tensors": {},
        "microbatch": {"axis": 0},
        "extra": {},
    }


def read_manifest(directory: str | os.PathLike, check_models: bool = True) -> Manifest:
    """Load and validate ``DIR/manifest.json`` (structure and files; not the weights).

    ``check_models``: also check each rank file's sha256 and graph inputs/outputs against the manifest.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PartitionError(f"{directory} is not a partition directory: pass the folder written by 'maia-onnx partition'")
    path = directory / MANIFEST
    if not path.is_file():
        raise PartitionError(f"{directory} has no {MANIFEST}: pass the folder written by 'maia-onnx partition'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PartitionError(f"{path} is not valid JSON (line {exc.lineno}): re-run partition to rewrite it") from exc
    if not isinstance(data, dict):
        raise PartitionError(f"{path} must hold a JSON object: re-run partition to rewrite it")
    manifest = Manifest(data, directory)
    validate_partition(manifest, check_models=check_models)
    return manifest


def is_partition_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def load_rank_model(manifest: Manifest, tp_rank: int, stage: int) -> ir.Model:
    return load_model(manifest.rank_path(tp_rank, stage))


def validate_partition(manifest: Manifest, check_models: bool = True) -> None:
    """Check the manifest is self-consistent and matches the files beside it; one-line errors name the problem."""
    d = manifest.data
    where = manifest.directory / MANIFEST if manifest.directory else MANIFEST
    if d.get("format") != FORMAT:
        raise PartitionError(f"{where}: not a maia-onnx partition manifest (format={d.get('format')!r})")
    if d.get("version") != VERSION:
        raise PartitionError(f"{where}: manifest version {d.get('version')} is not supported (expected {VERSION}); re-run partition")
    for key in ("mesh", "source", "ranks", "stages"):
        if key not in d:
            raise PartitionError(f"{where}: missing key {key!r}; re-run partition")
    tp, pp = manifest.tp, manifest.pp
    if tp < 1 or pp < 1 or d["mesh"].get("world_size", tp * pp) != tp * pp:
        raise PartitionError(f"{where}: mesh {d['mesh']} is inconsistent (world_size must be tp*pp)")
    expected = {(t, s) for t in range(tp) for s in range(pp)}
    present = {(r["tp_rank"], r["stage"]) for r in d["ranks"]}
    if present != expected:
        missing = sorted(expected - present)
        extra = sorted(present - expected)
        raise PartitionError(
            f"{where}: ranks do not match mesh tp={tp} pp={pp} (missing {missing}, unexpected {extra}); re-run partition"
        )
    if len(d["stages"]) != pp or sorted(s["stage"] for s in d["stages"]) != list(range(pp)):
        raise PartitionError(f"{where}: expected {pp} stage entries 0..{pp - 1}; re-run partition")
    for c in d.get("collectives", []):
        if c.get("op") not in COLLECTIVE_OPS:
            raise PartitionError(f"{where}: collective {c.get('id')} has unknown op {c.get('op')!r}")
        if c.get("group_size") != len(c.get("group", [])) or c.get("group_size") != tp:
            raise PartitionError(f"{where}: collective {c.get('id')} group {c.get('group')} does not match tp={tp}")
    for name, spec in d.get("inputs", {}).items():
        if spec.get("sharding") not in ("replicated", "split"):
            raise PartitionError(f"{where}: input {name!r} has unknown sharding {spec.get('sharding')!r}")
    for name, spec in d.get("outputs", {}).items():
        if spec.get("sharding") not in ("replicated", "split"):
            raise PartitionError(f"{where}: output {name!r} has unknown sharding {spec.get('sharding')!r}")
    if manifest.directory is None:
        return
    for r in d["ranks"]:
        f = manifest.directory / r["file"]
        if not f.is_file():
            raise PartitionError(f"{f} listed in the manifest is missing: the partition is incomplete; re-run partition")
        if r.get("data") and not (manifest.directory / r["data"]).is_file():
            raise PartitionError(f"weights file {manifest.directory / r['data']} is missing: copy the whole partition directory")
    if check_models:
        stage_io = {s["stage"]: s for s in d["stages"]}
        for r in d["ranks"]:
            # a shard swapped or edited after partitioning would run and give wrong answers without this check
            if r.get("sha256") and sha256_file(manifest.directory / r["file"]) != r["sha256"]:
                raise PartitionError(
                    f"{manifest.directory / r['file']} does not match the sha256 in its manifest (changed after "
                    f"partitioning): re-run partition or copy the original partition directory")
            proto = onnx.load(str(manifest.directory / r["file"]), load_external_data=False)
            inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
            outputs = {o.name for o in proto.graph.output}
            stage = stage_io[r["stage"]]
            if inputs != set(stage["inputs"]) or outputs != set(stage["outputs"]):
                raise PartitionError(
                    f"{r['file']} does not match the manifest's stage {r['stage']} inputs/outputs "
                    f"(model has {sorted(inputs)} -> {sorted(outputs)}); the manifest and models are mismatched, re-run partition"
                )


def check_source(manifest: Manifest, model_path: str | os.PathLike) -> None:
    """Fail when ``model_path`` is not the model this partition was made from (content hash)."""
    want = manifest.data["source"].get("sha256")
    if want and model_content_hash(model_path) != want:
        raise PartitionError(
            f"{model_path} is not the source of partition {manifest.directory} (content hash differs); "
            "partition the model again or pass the original"
        )


__all__ = [
    "COLLECTIVE_DOMAIN",
    "COLLECTIVE_OPS",
    "FORMAT",
    "MANIFEST",
    "SOURCE_GRAPH",
    "VERSION",
    "Manifest",
    "PartitionError",
    "check_source",
    "global_rank",
    "io_spec",
    "is_partition_dir",
    "load_rank_model",
    "new_manifest",
    "rank_file_name",
    "read_manifest",
    "validate_partition",
]
