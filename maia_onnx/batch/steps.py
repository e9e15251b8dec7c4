"""Batch steps: a registry from step name to the public verb it calls and the metrics read from its typed result.

Each step builds its artifact inside an empty work directory (the cache commits it) and returns the
artifact's name there plus a flat dict of metrics for the report. The options a step accepts are the
keyword parameters of the verb it calls, so a job file can use exactly what the Python API offers.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from maia_onnx.errors import MaiaOnnxError
from maia_onnx.export import export_model
from maia_onnx.io import load_model
from maia_onnx.ortutil import compare_outputs, make_inputs, run_model
from maia_onnx.partition import partition_file
from maia_onnx.quantize import QuantizeConfig, quantize_model
from maia_onnx.report import to_jsonable
from maia_onnx.runtime.compile import compile_model
from maia_onnx.runtime.executor import run_partition
from maia_onnx.runtime.session import session_for


class StepFailed(MaiaOnnxError):
    """A step's own check failed (e.g. verify below its cosine threshold): the job stops there."""


@dataclass(frozen=True)
class StepInput:
    """What a step works on. ``source`` is the job's model reference (export) or the previous artifact."""

    source: str | Path
    work: Path  # empty directory; the artifact is written inside it
    input_hash: str  # content hash of ``source``
    reference: Path | None = None  # the job's reference model (export output or input .onnx), for verify


@dataclass
class StepOutput:
    artifact: str  # file or directory name inside the work directory
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepSpec:
    """One registered step: the callable, the options it accepts, what it consumes and produces."""

    name: str
    run: Callable[[StepInput, dict], StepOutput]
    options: frozenset[str]
    needs_model: bool  # its input must be a model file (not a partition, compiled model or report)
    produces: str  # "model", "partition", "compiled model" or "report"
    side_files: tuple[str, ...] = ()  # informational files beside the artifact, not part of its content
    check: Callable[[dict], Any] | None = None  # validates option values when the job file is read


def _keywords(fn: Callable, *internal: str) -> frozenset[str]:
    """The keyword parameters of a verb, less those the step itself supplies."""
    return frozenset(p for p in inspect.signature(fn).parameters if p not in internal)


# ---------------------------------------------------------------------------------------------- export


def _export(inp: StepInput, options: dict) -> StepOutput:
    result = export_model(str(inp.source), inp.work / "model.onnx", **options)
    parity = result.parity  # output name -> {max_abs, max_rel, cosine} against PyTorch ({} with check=False)
    return StepOutput("model.onnx", {
        "parity_min_cosine": min((p["cosine"] for p in parity.values()), default=None),
        "parity_max_abs": max((p["max_abs"] for p in parity.values()), default=None),
        "parity_max_rel": result.max_rel if parity else None,
    })


# ---------------------------------------------------------------------------------------------- quantize

QUANTIZE_REPORT = "quantize_report.json"


def _quantize(inp: StepInput, options: dict) -> StepOutput:
    config = QuantizeConfig.from_dict({**options, "show_progress": False})
    result = quantize_model(inp.source, inp.work / "model.onnx", config=config)
    report = result.quantize_report
    metrics: dict[str, Any] = {"format": report.format, "min_cosine": report.min_output_cosine,
                               "size_ratio": report.size_ratio}
    summary = report.accuracy.summary if report.accuracy is not None else None  # None: accuracy run skipped
    if summary is not None:
        metrics.update(max_rel_err=summary.max_output_rel_err, quantized_layers=summary.quantized_layers)
    if report.sizes is not None:
        metrics.update(input_bytes=report.sizes.input_bytes, output_bytes=report.sizes.output_bytes)
    (inp.work / QUANTIZE_REPORT).write_text(json.dumps(to_jsonable(result.report), indent=2, sort_keys=True, default=str))
    return StepOutput("model.onnx", metrics)


# ---------------------------------------------------------------------------------------------- partition


def _partition(inp: StepInput, options: dict) -> StepOutput:
    # the manifest records the source by content hash, not by its (cache) path, so artifacts are location-free
    manifest = partition_file(inp.source, inp.work / "partition", record_source_path=False, **options)
    pipeline = manifest.data.get("extra", {}).get("pipeline", {})
    return StepOutput("partition", {
        "tp": manifest.tp, "pp": manifest.pp, "ranks": len(manifest.ranks),
        "collectives": len(manifest.collectives),
        "weight_bytes": sum(int(r.get("weight_bytes") or 0) for r in manifest.ranks),
        "imbalance_pct": pipeline.get("imbalance_pct"),
        "verified": manifest.verification.verified,
        "verified_max_rel": manifest.verification.max_rel,
    })


# ---------------------------------------------------------------------------------------------- compile


def _compile(inp: StepInput, options: dict) -> StepOutput:
    result = compile_model(inp.source, inp.work / "model.onnx", **options)
    summary = result.placement.summary()
    return StepOutput("model.onnx", {key: summary[key] for key in (
        "device", "partitions", "nodes_device", "nodes_cpu", "flops_device", "flops_cpu", "est_device_time_s")})


# ---------------------------------------------------------------------------------------------- verify

VERIFY_OPTIONS = frozenset({"min_cosine", "seed", "dims", "device"})


def _verify_dims(model) -> dict:
    dims = {"batch": 1, "seq": 8, "past": 4}
    for value in model.graph.inputs:
        for d in value.shape or ():
            if not isinstance(d, int):
                dims.setdefault(str(d), 2)
    return dims


def _run_artifact(path: Path, feeds: dict, device: str) -> dict:
    """Outputs of a partition directory, a compiled model (Maia session) or a plain model (ORT)."""
    if path.is_dir():
        return run_partition(path, feeds)
    if any(n.op_type == "EPContext" for n in load_model(path).graph):
        sess = session_for(path, providers=["MaiaExecutionProvider", "CPUExecutionProvider"], device=device)
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))
    return run_model(path, feeds)


def _verify(inp: StepInput, options: dict) -> StepOutput:
    if inp.reference is None:
        raise StepFailed("verify: the job has no reference model (neither an export step nor a .onnx model)")
    reference = load_model(inp.reference)
    dims = {**_verify_dims(reference), **(options.get("dims") or {})}
    feeds = make_inputs(reference, seed=int(options.get("seed", 0)), dims=dims)
    expected = run_model(inp.reference, feeds)
    actual = _run_artifact(Path(inp.source), feeds, options.get("device", "maia100"))
    per_output = compare_outputs(expected, {k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else v
                                            for k, v in actual.items()})
    cosines = [v["cosine"] for v in per_output.values() if v.get("cosine") is not None]
    min_cos = min(cosines) if cosines else None
    max_abs = max((v["max_abs"] for v in per_output.values()), default=None)
    (inp.work / "verify.json").write_text(json.dumps(to_jsonable(
        {"min_cosine": min_cos, "max_abs": max_abs, "outputs": per_output}), indent=2, sort_keys=True))
    threshold = float(options.get("min_cosine", 0.99))
    if min_cos is None or min_cos < threshold:
        raise StepFailed(f"verify: min cosine {min_cos} against the reference is below {threshold} "
                         f"(outputs: {', '.join(per_output)})")
    return StepOutput("verify.json", {"min_cosine": min_cos, "max_abs": max_abs})


# ---------------------------------------------------------------------------------------------- registry

_SUPPLIED = ("model_or_path", "model", "model_path", "ref", "out_path", "out_dir", "output", "progress",
             "show_progress", "report_path", "check", "record_source_path", "source_hash")

STEPS: dict[str, StepSpec] = {spec.name: spec for spec in (
    StepSpec("export", _export, _keywords(export_model, *_SUPPLIED), needs_model=False, produces="model"),
    StepSpec("quantize", _quantize, frozenset(QuantizeConfig.option_names()) - set(_SUPPLIED), needs_model=True,
             produces="model", side_files=(QUANTIZE_REPORT,), check=QuantizeConfig.from_dict),
    StepSpec("partition", _partition, _keywords(partition_file, *_SUPPLIED), needs_model=True, produces="partition"),
    StepSpec("compile", _compile, _keywords(compile_model, *_SUPPLIED), needs_model=True, produces="compiled model"),
    StepSpec("verify", _verify, VERIFY_OPTIONS, needs_model=False, produces="report"),
)}

SIDE_FILES: tuple[str, ...] = tuple(f for spec in STEPS.values() for f in spec.side_files)
