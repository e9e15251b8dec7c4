"""The partition API: cut a model into pipeline stages, split each stage into tensor-parallel ranks, write it.

``partition_model`` runs the passes (``PipelineParallelPass`` + stage extraction, then the TP split of every
stage), merges their plans into one manifest (``manifest.py`` describes the schema) and hands the rank models
to the writer; ``partition_file`` is the same for a model file (the ``partition`` verb). Before the staging
directory is renamed into place, the written shards are run against the unsharded model (``verify.py``), so a
wrong partition is refused and leaves nothing behind. ``summary_rows`` is the per-rank table the CLI prints.
"""

from __future__ import annotations

import gc
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import onnx
import onnx_ir as ir
from onnx.external_data_helper import uses_external_data

from maia_onnx.errors import InvalidOptionError, UnsupportedModelError, UserError
from maia_onnx.io import atomic_dir, check_output_path, initializer_bytes, load_model, model_content_hash, sha256_file
from maia_onnx.partition.manifest import SOURCE_GRAPH, Manifest, global_rank, new_manifest, read_manifest
from maia_onnx.partition.verify import make_probe, skipped, verify_partition
from maia_onnx.partition.writer import PartitionWriter, write_source_graph
from maia_onnx.passes import tensor_parallel
from maia_onnx.passes.pipeline_parallel import PipelinePlan, Stage, split_pipeline
from maia_onnx.passes.tensor_parallel import TpFragment
from maia_onnx.passes.tensor_parallel.slices import SourceCache
from maia_onnx.passes.unpack_weights import UnpackWeightsPass
from maia_onnx.runtime.perfmodel import allgather_time, allreduce_time

PREPARE_BUFFERS_BYTES = 256 << 20  # above this much weight, staging buffers are allocated while the graph is rewritten


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


def pipeline_manifest(source: ir.Model, plan: PipelinePlan, stages: Sequence[Stage], tp: int,
                      source_path, source_hash: str | None) -> dict[str, Any]:
    """The manifest of a pipeline split before any TP split: stage I/O, replicated tensors, the plan's loads."""
    pp = len(stages)
    manifest = new_manifest(tp, pp, source, source_path, source_hash)
    manifest["stages"] = [{"stage": st.index, "inputs": st.inputs, "outputs": st.outputs} for st in stages]
    source_outputs = {v.name for v in source.graph.outputs}
    out_stage = {name: st.index for st in stages for name in st.outputs if name in source_outputs}
    manifest["inputs"] = {v.name: {"sharding": "replicated", "axis": None} for v in source.graph.inputs}
    manifest["outputs"] = {
        v.name: {"sharding": "replicated", "axis": None, "stage": out_stage.get(v.name, pp - 1)} for v in source.graph.outputs
    }
    manifest["tensors"] = _replicated_tensors([st.model for st in stages])
    manifest["extra"] = {
        "pipeline": {
            "balance": plan.balance,
            "loads": plan.loads,
            "imbalance_pct": round(plan.imbalance_pct, 3),
            "boundaries": plan.boundaries,
        }
    }
    return manifest


def merge_tp_fragments(manifest: dict[str, Any], fragments: Sequence[tuple[int, Mapping[str, Any] | TpFragment]], tp: int) -> None:
    """Fold the TP split of every stage (``(stage, fragment)``: a ``TpFragment`` or its dict, as
    ``tensor_parallel.split_model`` returns it) into ``manifest``: collectives get ids and device groups,
    sharded inputs/outputs and tensors replace the replicated defaults. A stage boundary left sharded is refused."""
    collectives: list[dict[str, Any]] = []
    tensors: dict[str, dict[str, Any]] = {}
    inputs: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Any]] = {}
    for stage, fragment in fragments:
        if isinstance(fragment, TpFragment):
            fragment = fragment.as_dict()
        for c in fragment.get("collectives", []):
            c = dict(c)
            c["stage"] = stage
            c["group"] = [global_rank(t, stage, tp) for t in range(tp)]
            c["id"] = len(collectives)
            collectives.append(c)
        for name, spec in fragment.get("tensors", {}).items():
            entry = tensors.setdefault(name, dict(spec, stages=[]))
            entry["stages"].append(stage)
        for name, spec in fragment.get("inputs", {}).items():
            if name in manifest["inputs"]:
                inputs[name] = spec
        for name, spec in fragment.get("outputs", {}).items():
            if name in manifest["outputs"]:
                outputs[name] = dict(spec, stage=stage)
            elif spec.get("sharding") not in (None, "replicated"):
                raise UnsupportedModelError(
                    f"stage {stage} boundary tensor {name!r} would leave the stage sharded: use --pp with fewer stages or --tp 1"
                )
    manifest["collectives"] = collectives
    manifest["tensors"] = tensors
    manifest["inputs"].update(inputs)
    manifest["outputs"].update(outputs)


def _names_in_shards(manifest: Mapping[str, Any], source: ir.Model, rank_models: Mapping[tuple[int, int], ir.Model]) -> set[str]:
    """Source initializers some rank file holds (as is or sliced): ``source_graph.onnx`` keeps placeholders for them."""
    in_shards = {name for m in rank_models.values() for name in m.graph.initializers}
    in_shards |= {name[: -len("__tp")] for name in in_shards if name.endswith("__tp")}
    # A small constant a rank model rewrote under its source name (e.g. a shape vector) is not that weight:
    # keep the source's value inline in source_graph.onnx.
    sharded = {n for n, spec in manifest["tensors"].items() if spec.get("axis") is not None}
    source_inits = source.graph.initializers
    for m in rank_models.values():
        for name, value in m.graph.initializers.items():
            src = source_inits.get(name)
            if name in sharded or src is None or src.const_value is None or value.const_value is None:
                continue
            if src.const_value.nbytes <= 1024 and src.const_value.tobytes() != value.const_value.tobytes():
                in_shards.discard(name)
    return in_shards


def expert_parallel_degree(tp: int, ep: int) -> int:
    """The tp degree for ``--tp tp --ep ep``: experts are placed on the tensor-parallel ranks, so ep is 1 or tp
    (``--ep N`` alone means N ranks)."""
    if ep < 1:
        raise InvalidOptionError(f"--ep {ep} is invalid: the expert-parallel degree must be >= 1")
    if ep > 1 and tp == 1:
        return ep
    if ep > 1 and ep != tp:
        raise InvalidOptionError(f"--ep {ep} with --tp {tp}: experts are placed on the tensor-parallel ranks, so --ep "
                                 "must equal --tp (or give --ep alone)")
    return tp


def partition_model(
    model: ir.Model,
    out_dir,
    tp: int = 1,
    pp: int = 1,
    balance: str = "flops",
    source_path=None,
    source_hash: str | None = None,
    progress: Callable[[int], None] | None = None,
    consume_model: bool = False,
    writer: PartitionWriter | None = None,
    verify: bool = True,
    reference: str | os.PathLike | None = None,
    ep: int = 1,
) -> tuple[Manifest, PipelinePlan]:
    """Write a partition directory: PP cut first, then (tp > 1) the TP split of every stage.

    Stage s on tp rank t is ``rank{t}_stage{s}.onnx``; the directory also holds ``source_graph.onnx``
    (the unsharded graph without its weights) so it can be re-sharded without the original model.
    ``consume_model``: the caller gives ``model`` up, so a single stage (pp 1) and the last TP rank are
    rewritten in place instead of cloned (the output is the same; only ``model`` is left rewritten).
    ``writer``: a writer whose buffers were prepared in advance (``partition_file``); default a fresh one.
    ``verify``: run the written shards against the unsharded model before the directory appears (a
    disagreement raises ``ValidationError`` and nothing is written); ``reference``: the unsharded model's
    file for that run (default: ``model`` as it was before the split). The result's ``verification`` says
    what the check found. ``ep`` > 1: MoE experts are placed whole on the tp ranks (expert parallel; ``ep``
    must equal ``tp``, or set it when tp is 1) instead of each expert being split over them.
    """
    tp = expert_parallel_degree(tp, ep)
    if tp < 1:
        raise InvalidOptionError(f"--tp {tp} is invalid: the tensor-parallel degree must be >= 1")
    # the check's inputs come from the unsharded graph, before any pass rewrites it
    probe = make_probe(model, tp, pp) if verify else None
    # packed 4-bit / mx9 / mx6 weights are decoded subgraphs no rewrite can slice: shards hold their exact values
    unpacked = UnpackWeightsPass()(model) if tp > 1 else None
    skeleton_model = model.clone()  # the unsharded graph before PP/TP rewrite anything (tensors are shared)
    full_shapes = None
    if tp > 1:
        # Shapes come from the whole model: a stage alone has boundary inputs (sizes, masks) that a shape
        # probe cannot fill in consistently.
        full_shapes = tensor_parallel.infer_full_shapes(_shape_probe_clone(model))
    plan, stages = split_pipeline(model, pp, balance, in_place=consume_model)
    manifest = pipeline_manifest(skeleton_model, plan, stages, tp, source_path, source_hash)
    rank_models: dict[tuple[int, int], ir.Model] = {}
    if tp == 1:
        for st in stages:
            rank_models[(0, st.index)] = st.model
    else:
        fragments = []
        for st in stages:
            # stage models are ours (clones, or the given-up model): the last rank may rewrite one in place
            ranks, fragment = tensor_parallel.split_model(st.model, tp, shapes=dict(full_shapes), consume=True, ep=ep > 1)
            for t, rm in enumerate(ranks):
                rank_models[(t, st.index)] = rm
            fragments.append((st.index, fragment))
        merge_tp_fragments(manifest, fragments, tp)
        if ep > 1:
            manifest["extra"]["expert_parallel"] = ep
        if unpacked is not None and unpacked.modified:
            manifest["extra"]["unpacked_weights"] = {"count": len(unpacked.weights), "packed_bytes": unpacked.packed_bytes,
                                                     "unpacked_bytes": unpacked.unpacked_bytes}
    in_shards = _names_in_shards(manifest, skeleton_model, rank_models)
    out_dir = Path(out_dir)
    own_writer = writer is None
    writer = writer or PartitionWriter()
    try:
        with atomic_dir(out_dir) as tmp:
            written = writer.write_partition(tmp / "partition", rank_models, manifest, progress)
            for f in sorted((tmp / "partition").iterdir()):
                f.rename(tmp / f.name)
            (tmp / "partition").rmdir()
            write_source_graph(skeleton_model, tmp / SOURCE_GRAPH, in_shards)
            verification = skipped()
            if probe is not None:
                # the rank models' lazy slices and cached source tensors are done with: drop them before the
                # check loads the shards
                rank_models.clear()
                stages = None
                SourceCache.release_buffers()
                verification = verify_partition(tmp, reference if reference is not None else skeleton_model, probe)
    finally:
        if own_writer:
            writer.close()
    return Manifest(written.data, out_dir, plan=plan, verification=verification), plan


# ---------------------------------------------------------------------------------------------- files


def _external_files(path: Path) -> list[Path]:
    proto = onnx.load(str(path), load_external_data=False)
    names = set()
    for t in proto.graph.initializer:
        if uses_external_data(t):
            for entry in t.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    return [path.parent / n for n in sorted(names)]


def source_fingerprint(path: str | os.PathLike, full_limit_bytes: int = 1 << 30) -> str:
    """sha256 identifying a model: full content below 1 GiB; above, the graph file plus each external
    data file's size and first/middle/last MiB (a full hash would cost as much as the partition itself)."""
    path = Path(path)
    proto_size = path.stat().st_size
    data_files = _external_files(path)
    total = proto_size + sum(f.stat().st_size for f in data_files)
    if total <= full_limit_bytes:
        return model_content_hash(path)
    h = hashlib.sha256()
    h.update(sha256_file(path).encode())
    chunk = 1 << 20
    for f in data_files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for offset in (0, max(0, size // 2 - chunk // 2), max(0, size - chunk)):
                fh.seek(offset)
                h.update(fh.read(chunk))
    return "sampled:" + h.hexdigest()


def _prefetch(model_path: str | os.PathLike) -> None:
    """Ask the kernel to read the external weights ahead (asynchronously) while the graph is rewritten.

    (A reader thread instead measured slower on 2 cores: it competes with the rewrite for CPU.)
    """
    if not hasattr(os, "posix_fadvise"):
        return
    for f in _external_files(Path(model_path)):
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass


def partition_file(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    balance: str = "flops",
    progress: bool = False,
    *,
    source_hash: str | None = None,
    record_source_path: bool = True,
    verify: bool = True,
    ep: int = 1,
) -> Manifest:
    """Partition an ONNX file into ``tp`` x ``pp`` rank files under ``out_dir`` (atomic; input untouched).

    The manifest records the source's path and fingerprint; ``source_hash`` replaces the fingerprint (a
    caller that already hashed the file) and ``record_source_path=False`` leaves the path out (artifacts
    that must not depend on where the source lay). The result's ``plan`` is the pipeline plan and its
    ``verification`` the self-check of the shards against the source run in ORT (``verify=False``: skipped,
    for models too large to run twice in the time a partition takes). ``ep``: expert parallel (see
    ``partition_model``).
    """
    tp = expert_parallel_degree(tp, ep)
    if tp < 1 or pp < 1:
        raise InvalidOptionError(f"--tp {tp} --pp {pp}: both degrees must be >= 1")
    out_dir = Path(out_dir)
    check_output_path(out_dir, model_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir} is a file: give a directory path for the partition")
    # The graph work allocates ~10^5 IR objects in reference cycles; the cyclic collector rescanning them
    # all measured ~0.1-0.2 s of a multi-GB partition. Nothing here relies on it: paused, then restored.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _partition_file(model_path, out_dir, tp, pp, balance, progress, source_hash, record_source_path, verify, ep)
    finally:
        if gc_was_enabled:
            gc.enable()


def _partition_file(model_path, out_dir: Path, tp: int, pp: int, balance: str, progress: bool,
                    source_hash: str | None, record_source_path: bool, verify: bool, ep: int = 1) -> Manifest:
    model = load_model(model_path)
    _prefetch(model_path)
    total = initializer_bytes(model)
    bar = None

    def advance(nbytes: int) -> None:
        # the bar appears with the first weight written, so option errors print alone
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"partition tp{tp} pp{pp}", file=sys.stderr)
        bar.update(nbytes)

    with PartitionWriter() as writer:
        if total > PREPARE_BUFFERS_BYTES:
            writer.prepare(tp * pp)
        try:
            written, plan = partition_model(
                model, out_dir, tp=tp, pp=pp, balance=balance,
                source_path=str(model_path) if record_source_path else None,
                source_hash=source_hash or source_fingerprint(model_path), progress=advance if progress else None,
                consume_model=True,  # loaded here for this call only: rewrite it instead of cloning it
                writer=writer,
                verify=verify,
                reference=model_path,  # ORT loads the source file itself: no in-memory copy of the weights
                ep=ep,
            )
        finally:
            SourceCache.release_buffers()
            if bar is not None:
                bar.close()
    manifest = read_manifest(out_dir)
    manifest.plan = plan
    manifest.verification = written.verification
    return manifest


# ---------------------------------------------------------------------------------------------- summary


def _itemsize(dtype_name: str | None) -> int:
    try:
        return ir.DataType[dtype_name or "FLOAT"].itemsize
    except (KeyError, TypeError):
        return 4


def summary_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """Per rank file: weights (and their share of the stage's), collectives per forward and collective payload
    bytes per token.

    Wire bytes are what a ring algorithm moves per rank (the performance model's formulas at unit bandwidth).
    """
    rows = []
    n = manifest.tp
    stage_bytes: dict[int, int] = {}
    for entry in manifest.ranks:
        stage_bytes[entry["stage"]] = stage_bytes.get(entry["stage"], 0) + entry["weight_bytes"]
    for entry in manifest.ranks:
        colls = [c for c in manifest.collectives if c.get("stage") == entry["stage"]]
        sizes = [((c.get("elements_per_token") or 0) * _itemsize(c.get("dtype")), c["op"]) for c in colls]
        per_token = sum(size for size, _ in sizes)
        wire = sum(allreduce_time(size, n, 1.0) if op == "AllReduce" else allgather_time(size, n, 1.0) for size, op in sizes)
        rows.append(
            {
                "rank": entry["rank"],
                "tp_rank": entry["tp_rank"],
                "stage": entry["stage"],
                "file": entry["file"],
                "weight_bytes": entry["weight_bytes"],
                # this rank's part of its stage's weights (1/tp when balanced; replicated weights count on every rank)
                "weight_share": round(entry["weight_bytes"] / stage_bytes[entry["stage"]], 4) if stage_bytes[entry["stage"]] else 0.0,
                "collectives": len(colls),
                "allreduce": sum(1 for c in colls if c["op"] == "AllReduce"),
                "allgather": sum(1 for c in colls if c["op"] == "AllGather"),
                "payload_bytes_per_token": int(per_token),
                "wire_bytes_per_token": int(round(wire)),
            }
        )
    return rows


__all__ = ["merge_tp_fragments", "partition_file", "partition_model", "pipeline_manifest", "source_fingerprint", "summary_rows"]
