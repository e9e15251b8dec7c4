"""Export of one ModelSpec: torch dynamo exporter -> clean graph -> atomic save -> ORT-vs-PyTorch parity check."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from maia_onnx.errors import InvalidOptionError, UserError, ValidationError
from maia_onnx.extras import require
from maia_onnx.export.graph import _symbolic_shape, clean_exported_model, fold_weight_transposes
from maia_onnx.io import check_output_path, save_model
from maia_onnx.ortutil import compare, make_session

# Opset 21: FP8 QuantizeLinear/DequantizeLinear with blocked quantization, and the dynamo exporter
# (torchlib targets 18) version-converts to it cleanly.
DEFAULT_OPSET = 21
MIN_OPSET = 18
REL_TOLERANCE = 1e-4  # FP32 parity bound: max|ort - torch| / max|torch| per output


@dataclass
class ExportResult:
    """One exported graph (``path`` a file), or a multi-graph export (``path`` a directory, one result per file in ``parts``)."""

    path: Path
    parity: dict[str, dict[str, float]]  # output name -> {max_abs, max_rel, cosine}
    model: str = ""
    opset: int = DEFAULT_OPSET
    dynamic: bool = True
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    inputs: dict[str, list] = field(default_factory=dict)  # ONNX input name -> symbolic shape
    outputs: dict[str, list] = field(default_factory=dict)
    parts: dict[str, "ExportResult"] = field(default_factory=dict)  # file name -> result (multi-graph exports)
    checks: dict[str, Any] = field(default_factory=dict)  # whole-model checks (e.g. greedy generation tokens)

    @property
    def max_rel(self) -> float:
        own = max((p["max_rel"] for p in self.parity.values()), default=0.0)
        return max([own] + [part.max_rel for part in self.parts.values()])

    def as_dict(self) -> dict[str, Any]:
        report = {
            "path": str(self.path),
            "model": self.model,
            "opset": self.opset,
            "dynamic": self.dynamic,
            "seconds": round(self.seconds, 3),
            "parity": self.parity,
            "max_rel": self.max_rel,
            "tolerance": REL_TOLERANCE,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "config": self.config,
        }
        if self.parts:
            report["parts"] = {name: part.as_dict() for name, part in self.parts.items()}
        if self.checks:
            report["checks"] = self.checks
        return report


def log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


# ----------------------------------------------------------------------------------------------
# parity


def _to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def call_module(module, inputs: Mapping[str, Any], by_name: bool = False):
    """module(**inputs) when the inputs bind to forward() by name, else module(*inputs.values()); no grad."""
    import torch

    with torch.no_grad():
        return module(**inputs) if by_name else module(*inputs.values())


def torch_outputs(module, inputs: Mapping[str, Any], output_names: list[str] | None = None,
                  by_name: bool = False) -> dict[str, np.ndarray]:
    """Run the module on inputs (in forward() order, or by name) and flatten its outputs into name -> array."""
    flat = flatten_outputs(call_module(module, inputs, by_name))
    names = output_names or [f"output_{i}" for i in range(len(flat))]
    if len(names) != len(flat):
        raise ValidationError(f"module returned {len(flat)} tensors but {len(names)} output names were given")
    return {n: _to_numpy(t) for n, t in zip(names, flat)}


def flatten_outputs(out) -> list:
    """Tensors of a (nested) tuple/list/dict output in the order the exporter flattens them."""
    return [t for _, t in named_outputs(out)]


def named_outputs(out, prefix: str = "") -> list[tuple[str, Any]]:
    """(name, tensor) pairs: dict keys (``past.0.key`` for nesting), else ``output_i``; None entries are skipped."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix or "output", out)]
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items() if v is not None]
    elif isinstance(out, (list, tuple)):
        items = [(str(i) if prefix else f"output_{i}", v) for i, v in enumerate(out)]
    else:
        raise ValidationError(f"module returned a {type(out).__name__}; expected tensors (tuple/list/dict of tensors)")
    named = []
    for key, value in items:
        named += named_outputs(value, f"{prefix}.{key}" if prefix else key)
    return named


def ort_run(onnx_path: str | os.PathLike, feeds: Mapping[str, np.ndarray], session=None) -> dict[str, np.ndarray]:
    sess = session or make_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    result = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, result))


def check_parity(
    onnx_path: str | os.PathLike,
    module=None,
    inputs: Mapping[str, Any] | None = None,
    tolerance: float = REL_TOLERANCE,
    reference: Mapping[str, np.ndarray] | None = None,
    output_names: list[str] | None = None,
    by_name: bool = False,
) -> dict[str, dict[str, float]]:
    """Run the ONNX model in ORT (optimizations off) and the module in PyTorch on the same inputs.

    Returns output name -> {max_abs, max_rel, cosine}; raises ValidationError when any output's relative
    error exceeds ``tolerance``. Pass ``reference`` (precomputed torch outputs) to skip running the module.
    """
    feeds = {k: _to_numpy(v) for k, v in (inputs or {}).items()}
    got = ort_run(onnx_path, feeds)
    if reference is None:
        if module is None:
            raise ValueError("check_parity needs module or reference")
        reference = torch_outputs(module, inputs, output_names or list(got), by_name=by_name)
    report = {}
    for name, ref in reference.items():
        if name not in got:
            raise ValidationError(f"exported model {onnx_path} lacks output {name!r} (has {', '.join(got)})")
        if tuple(np.shape(ref)) != tuple(np.shape(got[name])):
            raise ValidationError(f"output {name!r} shape {np.shape(got[name])} in ONNX vs {np.shape(ref)} in PyTorch")
        report[name] = compare(ref, got[name])
    bad = {n: r for n, r in report.items() if not r["max_rel"] <= tolerance}
    if bad:
        worst = max(bad, key=lambda n: bad[n]["max_rel"] if bad[n]["max_rel"] == bad[n]["max_rel"] else float("inf"))
        raise ValidationError(
            f"ONNX/PyTorch mismatch in {onnx_path}: output {worst!r} relative error {bad[worst]['max_rel']:.3e} "
            f"> {tolerance:g} (max abs {bad[worst]['max_abs']:.3e}); the export is numerically wrong"
        )
    return report


# ----------------------------------------------------------------------------------------------
# export


def export_spec(
    spec,
    out_path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    external_data: bool | None = None,
    check: bool = True,
    tolerance: float = REL_TOLERANCE,
    source: str | None = None,
    progress: Callable[[str], None] | None = None,
    release_module: bool = False,
) -> ExportResult:
    """Export a ModelSpec to ``out_path`` (atomic), then parity-check it in ORT against PyTorch.

    ``release_module=True`` drops the spec's module before ORT loads the model, so a multi-GB model is
    never resident twice (torch + ORT).
    """
    torch = require("torch", "export", "exporting to ONNX")

    if opset < MIN_OPSET:
        raise InvalidOptionError(f"--opset {opset} is too old for the dynamo exporter: use {MIN_OPSET} or newer (default {DEFAULT_OPSET})")
    out_path = check_output_path(out_path)
    if out_path.is_dir():
        raise UserError(f"-o {out_path} is a directory: give a file path such as {out_path / (spec.name.split(':')[-1].split('/')[-1] + '.onnx')}")
    start = time.perf_counter()
    module = spec.module
    module.eval()
    reference = None
    if check:
        log(progress, f"running {spec.name} in PyTorch on example inputs")
        reference = torch_outputs(module, spec.example_inputs, spec.output_names, by_name=spec.by_name)
    log(progress, f"exporting {spec.name} with torch.onnx.export(dynamo=True, opset={opset}, dynamic={dynamic})")
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                module,
                () if spec.by_name else spec.args,
                kwargs=dict(spec.example_inputs) if spec.by_name else None,
                dynamo=True,
                opset_version=opset,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_shapes=spec.dynamic_shapes if dynamic else None,
                optimize=False,
                verbose=False,
            )
    except Exception as exc:  # torch raises many internal types; the user needs to know the model is not exportable
        raise UnsupportedExportError(
            f"torch.onnx.export cannot export {spec.name}: {_export_failure_reason(exc)} "
            "(rewrite the unsupported part or wrap the model in a package.module:factory)"
        ) from exc
    model = program.model
    log(progress, "folding weight transposes, optimizing graph")
    # fold Transpose(weight) first: lazily, so the optimizer's size limits never leave a Transpose behind
    fold_weight_transposes(model)
    import onnxscript.optimizer

    model = onnxscript.optimizer.optimize(model)
    clean_exported_model(model, spec.config, source or spec.name, getattr(spec, "param_prefix", ""))
    # stage beside the output: the model only replaces out_path once it is saved and parity-checked, so a
    # failed check (or an interrupt) leaves any previous file untouched and no partial output behind
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".export", dir=out_path.parent))
    try:
        staged = staging / out_path.name
        log(progress, f"saving {out_path}")
        save_model(model, staged, external_data=external_data)
        inputs_desc = {v.name: _symbolic_shape(v) for v in model.graph.inputs}
        outputs_desc = {v.name: _symbolic_shape(v) for v in model.graph.outputs}
        if release_module:
            # onnxscript's rewrite rules keep module-level references to the last graph they matched, which
            # would keep every weight alive; detach the data so only the torch module (released next) owns it
            for value in model.graph.initializers.values():
                value.const_value = None
        del program, model
        if release_module:
            spec.module = None
            del module
        gc.collect()
        parity: dict = {}
        if check:
            log(progress, "checking parity in ONNX Runtime (ORT_DISABLE_ALL)")
            parity = check_parity(staged, inputs=spec.example_inputs, reference=reference, tolerance=tolerance)
        _publish(staged, out_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(
        path=Path(out_path),
        parity=parity,
        model=spec.name,
        opset=opset,
        dynamic=dynamic,
        seconds=time.perf_counter() - start,
        config=dict(spec.config),
        inputs=inputs_desc,
        outputs=outputs_desc,
    )


def _export_failure_reason(exc: BaseException) -> str:
    """The informative line of a torch exporter error (its first line is a generic banner)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        idx = lines.index("## Exception summary")
        if idx + 1 < len(lines):
            return lines[idx + 1][:300]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:300]}"
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's warnings (missing torchvision, axis renames) are noise for users of this tool."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        # torch.export prints graph dumps on some failures; the one-line reason goes into our error instead
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class UnsupportedExportError(UserError):
    """The PyTorch model cannot be traced/exported by torch.export (first line of torch's reason)."""


def _publish(staged: Path, out_path: Path) -> None:
    """Move a staged model (and its .data side file) onto out_path; drop a stale side file of an older export."""
    data_name = f"{out_path.name}.data"
    try:
        if (staged.parent / data_name).exists():
            os.replace(staged.parent / data_name, out_path.parent / data_name)
        elif (out_path.parent / data_name).exists():
            os.unlink(out_path.parent / data_name)
        os.replace(staged, out_path)
    except OSError as exc:
        raise UserError(f"cannot write {out_path}: {exc.strerror or exc}; choose a writable -o") from exc
