"""Python API of `maia-onnx quantize`: load -> calibrate -> run the format's recipe -> accuracy report -> save.

``quantize_model(model_or_path, output, config=None, **overrides)`` (overrides: any ``QuantizeConfig`` field,
e.g. ``format="fp8-e4m3", calib="random"``) returns a ``QuantizeResult``: the quantized onnx_ir model, the
typed ``QuantizeReport`` (``.report`` is its JSON dict) and the activation scales.  The input is never
modified; the output (and its external data) appears atomically.  Weights memory-mapped from external
data are quantized lazily while saving, one tensor at a time.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import onnx_ir as ir

from maia_onnx.accuracy import evaluate_accuracy
from maia_onnx.calib import CalibrationSource, calibrate, make_source, split_holdout
from maia_onnx.evaluate import evaluate_models
from maia_onnx.decode import decode_report
from maia_onnx.errors import InvalidOptionError, UnsupportedModelError, UserError
from maia_onnx.io import check_output_path, initializer_bytes, load_model, save_model, write_text_atomic
from maia_onnx.passes.gptq import GptqPassResult
from maia_onnx.passes.hadamard import HadamardPassResult
from maia_onnx.passes.kv_cache import KvCachePassResult, kv_pairs
from maia_onnx.passes.mixed_precision import kept_passes
from maia_onnx.passes.quantize_fp8 import DEFAULT_OP_TYPES, Fp8PassResult, LayerRecord, activation_values, find_targets
from maia_onnx.passes.quantize_mx import MxPassResult
from maia_onnx.pipeline import Pipeline
from maia_onnx.quantize.config import QuantizeConfig
from maia_onnx.quantize.recipes import RecipeInputs, mixed_precision_pass, qat_passes, quantize_passes
from maia_onnx.quantize.report import CalibrationInfo, KvCacheReport, QuantizeReport, ScalesImport, measure_sizes
from maia_onnx.report import dumps
from maia_onnx.scales import as_scale_array, emit_scales, load_scales, map_scales, write_scales
from maia_onnx.serving import emit_checkpoint, read_checkpoint_scales, source_directory

logger = logging.getLogger(__name__)

# above this many weight bytes the accuracy run (two ORT sessions holding all weights) is skipped
EVAL_MAX_BYTES = 2_000_000_000
DECODE_REPORT_STEPS = 32  # greedy steps reported for an FP8 KV cache (issue 3: 32-step decode vs FP32)
KV_CALIB_BATCHES = 8


@dataclass
class QuantizeResult:
    model: ir.Model
    output: Path | None
    quantize_report: QuantizeReport
    activation_scales: dict[str, float] = field(default_factory=dict)
    config: QuantizeConfig | None = None

    @cached_property
    def report(self) -> dict[str, Any]:
        """The report as plain data (the ``--report`` JSON layout)."""
        return self.quantize_report.to_dict()

    @property
    def min_output_cosine(self) -> float | None:
        return self.quantize_report.min_output_cosine

    @property
    def size_ratio(self) -> float | None:
        return self.quantize_report.size_ratio

    @property
    def output_bytes(self) -> int | None:
        sizes = self.quantize_report.sizes
        return sizes.output_bytes if sizes is not None else None

    @property
    def seconds(self) -> float:
        return self.quantize_report.seconds


def _discard(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _load(model_or_path) -> tuple[ir.Model, ir.Model, Path | None]:
    """(reference, working copy, source path): two independent models, the reference never touched."""
    if isinstance(model_or_path, ir.Model):
        # the clone shares tensor objects (external weights stay mapped); passes replace them, never mutate
        return model_or_path, model_or_path.clone(), None
    path = Path(model_or_path)
    # both loads are lazy: external weights stay memory-mapped, nothing is read twice into memory
    return load_model(path), load_model(path), path


def _import_scales(model: ir.Model, path: str, inputs: RecipeInputs) -> tuple[ScalesImport, dict[str, float]]:
    """Imported scales (vLLM / ModelOpt names) mapped onto this graph; returns the report entry and activation scales."""
    if Path(path).is_dir():  # a compressed-tensors / ModelOpt checkpoint directory: its scale tensors by module name
        loaded = {name: as_scale_array(name, value, Path(path)) for name, value in read_checkpoint_scales(path).items()}
    else:
        loaded = load_scales(path)
    scale_map, unmatched = map_scales(model, loaded)
    if unmatched and len(unmatched) == len(loaded):
        # not one name fits: almost surely the scales of another model; quantizing anyway would ignore them silently
        raise UserError(
            f"none of the {len(unmatched)} scale names in {path} matches a layer of this model "
            f"(e.g. {unmatched[0]!r}): pass the scales file exported for this model")
    if unmatched:
        logger.warning("%d scale name(s) in %s matched no layer: %s", len(unmatched), path, ", ".join(list(unmatched)[:5]))
    inputs.weight_scales = dict(scale_map.weight_scales)
    inputs.kv_scales = scale_map.kv
    return ScalesImport(str(path), list(unmatched)), {k: float(v) for k, v in scale_map.activation_scales.items()}


class _Sources:
    """Calibration / evaluation sources, made on first use exactly as the config asks (one place for the rules)."""

    def __init__(self, config: QuantizeConfig):
        self.config = config
        self.calib: CalibrationSource | None = None
        self.eval: CalibrationSource | None = None

    def make(self, spec=None) -> CalibrationSource:
        c = self.config
        return make_source(spec if spec is not None else c.calib, c.num_samples, c.batch_size, c.seed, c.dims_map,
                           tokenizer=c.tokenizer, seq_len=c.seq_len, image_size=c.image_size)

    def split(self) -> None:
        """Calibration samples, holding some out for the accuracy report only when there is one."""
        base = self.make()
        self.calib, self.eval = split_holdout(base, self.config.eval_samples) if self.config.evaluate else (base, None)

    def calib_or(self, spec) -> CalibrationSource:
        return self.calib or self.make(spec)

    def evaluation(self) -> CalibrationSource:
        if self.eval is None:
            _, self.eval = split_holdout(self.make(self.config.calib if self.config.calib is not None else "random"),
                                         self.config.eval_samples)
        return self.eval


def _calibrate_fp8(config: QuantizeConfig, reference: ir.Model, model: ir.Model, imported: dict[str, float],
                   sources: _Sources, source_path: Path | None, report: QuantizeReport) -> dict[str, float]:
    """FP8 static activation scales: imported ones first, the rest calibrated on the reference model."""
    op_types = DEFAULT_OP_TYPES + (("Gather",) if config.embeddings else ())
    targets = find_targets(model, op_types, exclude=config.exclude, attention=config.attention)
    if not targets:
        raise UserError(
            f"nothing to quantize in {source_path or 'the model'}: no MatMul/Gemm/Conv/ConvTranspose left after --exclude"
        )
    act_names = [] if config.weights_only else activation_values(targets)
    # imported input scales are keyed by activation value name already (maia_onnx.scales.map_scales)
    scales = {k: v for k, v in imported.items() if k in act_names}
    to_calibrate = [n for n in act_names if n not in scales]
    if not to_calibrate:
        return scales
    if config.calib is None:
        raise InvalidOptionError(
            f"{len(to_calibrate)} activation(s) have no scale (e.g. {to_calibrate[0]!r}): pass --calib "
            f"(text:FILE, images:DIR, npz, directory or 'random'), --no-attention for attention-matmul inputs, "
            f"or --weights-only"
        )
    if str(config.calib) == "random":
        warnings.warn(
            "calibrating on random inputs synthesized from the input specs: pass --calib data.npz for real scales",
            stacklevel=3,
        )
    sources.split()
    t0 = time.perf_counter()
    found, _stats = calibrate(reference, to_calibrate, sources.calib, config.method, config.spec.fp8, config.percentile,
                              show_progress=config.show_progress)
    scales.update(found)
    report.calibration = CalibrationInfo(
        source=sources.calib.description,
        method=config.method,
        percentile=config.percentile if config.method == "percentile" else None,
        samples=sources.calib.total_samples(),
        activations=len(to_calibrate),
        seconds=time.perf_counter() - t0,
    )
    return scales


def quantize_model(
    model_or_path: ir.Model | str | os.PathLike,
    output: str | os.PathLike | None = None,
    config: QuantizeConfig | None = None,
    **overrides: Any,
) -> QuantizeResult:
    """Quantize a model as ``config`` (with ``overrides``) says; see the module docstring.

    ``calib``: ``"random"`` (inputs synthesized from the input specs), ``text:FILE`` / ``images:DIR`` (see
    maia_onnx.data; ``tokenizer``, ``seq_len``, ``image_size``), an ``.npz`` file (one array per graph input, first
    axis = samples) or a directory of ``.npz`` files; ``None`` with ``weights_only``.  The accuracy report runs on
    held-out samples (the last ``eval_samples`` of the source, or random inputs with another seed); on text / image
    data it adds ``maia_onnx.evaluate``'s task metrics.  ``emit_checkpoint``: also a compressed-tensors FP8 checkpoint.
    """
    config = (config or QuantizeConfig()).replace(**overrides)
    spec = config.spec
    t_start = time.perf_counter()
    source_path = None if isinstance(model_or_path, ir.Model) else Path(model_or_path)
    for path in (output, config.report_path, config.emit_scales, config.emit_checkpoint):
        if path is not None:
            check_output_path(path, *([source_path] if source_path else []))
    reference, model, source_path = _load(model_or_path)
    if config.emit_checkpoint is not None:
        source_directory(reference, config.tokenizer)  # no source checkpoint to complete: refused before any work
    if config.kv_cache is not None and not kv_pairs(model):
        raise UnsupportedModelError(
            f"--kv-cache: {source_path or 'the model'} has no KV cache (past_key_values.{{i}}.key/value inputs "
            f"and present.{{i}}.key/value outputs); drop --kv-cache for this model"
        )
    external_source = _has_external(model)
    weight_bytes_in = initializer_bytes(model)
    report = QuantizeReport(str(source_path) if source_path else None, str(output) if output else None, config.format,
                            config.granularity, config.block_size, list(config.exclude))
    inputs = RecipeInputs()
    imported_act_scales: dict[str, float] = {}
    if config.scales is not None:
        report.scales_import, imported_act_scales = _import_scales(model, config.scales, inputs)
    for qat_pass in qat_passes(config, inputs.weight_scales):
        report.qat_import = list(qat_pass(model).records)

    sources = _Sources(config)
    if spec.calibrated_activations:  # fp8, w4a8
        inputs.activation_scales = _calibrate_fp8(config, reference, model, imported_act_scales, sources, source_path, report)
    real_data = config.calib is not None and str(config.calib) != "random"
    if config.rounding == "gptq" or (config.hadamard and real_data):
        # GPTQ (and --hadamard's choice, given real data) stream the calibration samples for layer-input Hessians
        if config.rounding == "gptq" and not real_data:
            warnings.warn("GPTQ on random inputs: pass --calib text:FILE (or .npz) for Hessians of real data", stacklevel=2)
        if sources.calib is None:
            sources.split()
        inputs.calib_batches = sources.calib.batches
    elif spec.block_scaled and config.activations and config.calib not in (None, "random"):
        logger.info("%s needs no activation scales (dynamic); calibration data is used for the accuracy report only", spec.name)
    if config.kv_cache is not None and config.calib is not None:
        inputs.kv_feeds = list(itertools.islice(sources.calib_or(config.calib).batches(reference), KV_CALIB_BATCHES))

    # validation serializes every tensor: skip it for memory-mapped models (lazy FP8 bytes come at save time)
    t0 = time.perf_counter()
    if config.target_cosine is not None:
        source = sources.calib_or(config.calib if config.calib is not None else "random")
        planned = Pipeline([mixed_precision_pass(config, inputs, source)], validate=False)(model)
        report.mixed_precision = plan = planned.results[0].plan
        report.passes += planned.reports
        model = planned.model
        passes = kept_passes(lambda kept: quantize_passes(config, inputs, kept), plan.kept_layers, plan.keep_dtype)
    else:
        passes = quantize_passes(config, inputs)
    result = Pipeline(passes, validate=not external_source)(model)
    model = result.model
    report.passes += result.reports
    report.quantize_seconds = time.perf_counter() - t0
    records: list[LayerRecord] = []
    for pass_result in result.results:
        if isinstance(pass_result, Fp8PassResult):
            records += pass_result.records
        elif isinstance(pass_result, MxPassResult):
            report.mx_layers = list(pass_result.layers)
            if isinstance(pass_result, GptqPassResult):
                report.gptq = list(pass_result.gptq)
        elif isinstance(pass_result, HadamardPassResult):
            report.rotations = list(pass_result.rotations)
        elif isinstance(pass_result, KvCachePassResult):
            report.kv_cache = KvCacheReport(config.kv_cache, pass_result.record)
    report.activation_scales = inputs.activation_scales

    # accuracy on held-out samples (needs both models in ORT: skipped for multi-GB models)
    if config.evaluate and weight_bytes_in <= EVAL_MAX_BYTES:
        eval_source = sources.evaluation()
        t0 = time.perf_counter()
        fmt_max = spec.fp8.max if spec.family == "fp8" else 448.0
        report.accuracy = evaluate_accuracy(reference, model, eval_source.batches(reference), records, fmt_max)
        if getattr(eval_source, "kind", None) in ("text", "images"):
            # the task itself, with the code `maia-onnx eval` runs: perplexity / KL for decoders, embeddings for encoders
            task = evaluate_models(model, reference, eval_source.batches(reference))
            report.accuracy.task, report.accuracy.task_metrics = task["task"], task["task_metrics"]
        report.accuracy.summary.source = eval_source.description
        report.accuracy.summary.seconds = time.perf_counter() - t0
        if config.kv_cache is not None:
            # the FP8 cache's real test: a greedy decode that feeds its own quantised cache back, step by step
            t0 = time.perf_counter()
            report.decode = decode_report(reference, model, steps=DECODE_REPORT_STEPS, seed=config.seed)
            report.decode["seconds"] = time.perf_counter() - t0
    elif config.evaluate:
        report.accuracy_skipped = (f"weights are {weight_bytes_in / 1e9:.1f} GB (> {EVAL_MAX_BYTES / 1e9:.0f} GB): "
                                   f"run the report on a smaller variant")

    if output is not None:
        use_external = config.external_data if config.external_data is not None else (True if external_source else None)
        t0 = time.perf_counter()
        save_model(model, output, external_data=use_external)
        report.save_seconds = time.perf_counter() - t0
        report.sizes = measure_sizes(source_path, Path(output))
    if config.emit_checkpoint is not None:
        try:
            report.checkpoint = emit_checkpoint(model, config.emit_checkpoint, source=config.tokenizer,
                                                activation_scheme=config.checkpoint_scheme)
        except Exception:
            if output is not None:  # no half-done run: the model goes with the checkpoint that could not be written
                _discard(Path(output))
            raise
    if config.emit_scales is not None:
        write_scales(config.emit_scales, emit_scales(model))
    report.seconds = time.perf_counter() - t_start
    if config.report_path is not None:
        write_text_atomic(config.report_path, dumps(report.to_dict()) + "\n")
    return QuantizeResult(model, Path(output) if output else None, report, dict(inputs.activation_scales), config)

