"""Run onnx_ir passes in memory: time each, validate after each, optionally check numerics, report the changes."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.errors import ValidationError
from maia_onnx.io import EXTERNAL_DATA_THRESHOLD_BYTES, initializer_bytes
from maia_onnx.ortutil import compare_outputs, run_model


def model_summary(model: ir.Model) -> dict[str, Any]:
    """Op histogram and initializer bytes by dtype: the basis of per-pass change reports."""
    ops = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[f"{node.domain + '::' if node.domain else ''}{node.op_type}"] += 1
    bytes_by_dtype = Counter()
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            bytes_by_dtype[str(value.const_value.dtype.name)] += value.const_value.nbytes
    return {"nodes": sum(ops.values()), "ops": dict(ops), "bytes_by_dtype": dict(bytes_by_dtype)}


def summary_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    ops = {}
    for k in set(before["ops"]) | set(after["ops"]):
        d = after["ops"].get(k, 0) - before["ops"].get(k, 0)
        if d:
            ops[k] = d
    byts = {}
    for k in set(before["bytes_by_dtype"]) | set(after["bytes_by_dtype"]):
        d = after["bytes_by_dtype"].get(k, 0) - before["bytes_by_dtype"].get(k, 0)
        if d:
            byts[k] = d
    return {"nodes": after["nodes"] - before["nodes"], "ops": ops, "bytes_by_dtype": byts}


def validate_model(model: ir.Model, shape_inference: bool = True) -> None:
    """ONNX checker + strict shape inference; skipped above the protobuf limit (checked per file then)."""

    if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES:
        return
    proto = ir.to_proto(model)
    # External tensors stay as references in the proto: the checker only sees the graph.
    try:
        onnx.checker.check_model(proto)
        if shape_inference:
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ValidationError(f"model failed ONNX validation: {str(exc).splitlines()[0]}") from exc


@dataclass
class PassReport:
    name: str
    modified: bool
    seconds: float
    delta: dict[str, Any]
    numeric: dict[str, dict[str, float]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "modified": self.modified, "seconds": self.seconds, "delta": self.delta, "numeric": self.numeric}


@dataclass
class PipelineResult:
    model: ir.Model
    modified: bool
    reports: list[PassReport] = field(default_factory=list)
    results: list[onnx_ir.passes.PassResult] = field(default_factory=list)  # each pass's own (typed) result

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for r in self.reports:
            worst = min((m["cosine"] for m in (r.numeric or {}).values()), default=None)
            out.append(
                {
                    "pass": r.name,
                    "modified": r.modified,
                    "seconds": round(r.seconds, 3),
                    "d_nodes": r.delta["nodes"],
                    "ops_changed": ", ".join(f"{k}{v:+d}" for k, v in sorted(r.delta["ops"].items())) or "-",
                    "min_cosine": "-" if worst is None else worst,
                }
            )
        return out


class Pipeline:
    """A PassManager-like runner that validates and reports after every pass.

    ``check_inputs``: feeds for an ORT numeric check of every pass's output against the
    pipeline's input model; ``min_cosine`` fails the pipeline when a pass drifts further.
    """

    def __init__(
        self,
        passes: Sequence[onnx_ir.passes.PassBase],
        validate: bool = True,
        check_inputs: Mapping[str, np.ndarray] | None = None,
        min_cosine: float | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.passes = list(passes)
        self.validate = validate
        self.check_inputs = check_inputs
        self.min_cosine = min_cosine
        self.progress = progress

    def __call__(self, model: ir.Model) -> PipelineResult:
        reference = run_model(model, self.check_inputs) if self.check_inputs is not None else None
        reports = []
        results = []
        any_modified = False
        for p in self.passes:
            name = type(p).__name__
            if self.progress:
                self.progress(name)
            before = model_summary(model)
            t0 = time.perf_counter()
            result = p(model)
            results.append(result)
            seconds = time.perf_counter() - t0
            model = result.model
            any_modified |= result.modified
            if self.validate and result.modified:
                try:
                    validate_model(model)
                except ValidationError as exc:
                    raise ValidationError(f"after {name}: {exc}") from exc
            numeric = None
            if reference is not None and result.modified:
                # pair outputs by position: a pass may rename a graph output
                actual = dict(zip(reference, run_model(model, self.check_inputs).values()))
                numeric = compare_outputs(reference, actual)
                if self.min_cosine is not None:
                    for out, m in numeric.items():
                        if m["cosine"] < self.min_cosine:
                            raise ValidationError(
                                f"after {name}: output {out!r} cosine {m['cosine']:.6f} < {self.min_cosine}"
                            )
            reports.append(PassReport(name, result.modified, seconds, summary_delta(before, model_summary(model)), numeric))
        return PipelineResult(model, any_modified, reports, results)
