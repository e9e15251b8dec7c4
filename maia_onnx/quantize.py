"""Python API of `maia-onnx quantize`: load -> calibrate -> quantize (FP8 / MX / BF16) -> accuracy report -> save.

``quantize_model(model_or_path, output, format="fp8-e4m3", calib="random", method="minmax", ...)`` returns a
``QuantizeResult`` with the quantized onnx_ir model, the report dict and the activation scales.  The input
is never modified; the output (and its external data) appears atomically.  Weights memory-mapped from
external data are quantized lazily while saving, one tensor at a time.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError, UserError

logger = logging.getLogger(__name__)

FP8_FORMATS = {"fp8-e4m3": "e4m3fn", "fp8-e4m3fn": "e4m3fn", "fp8-e5m2": "e5m2"}
MX_FORMATS = ("mxfp8-e4m3", "mxfp8-e5m2", "mxint8", "mxfp4", "mx9", "mx6")
FORMATS = ("fp8-e4m3", "fp8-e5m2", *MX_FORMATS, "bf16")
KV_CACHE_FORMATS = ("fp8-e4m3", "fp8-e5m2")
# above this many weight bytes the accuracy run (two ORT sessions holding all weights) is skipped
EVAL_MAX_BYTES = 2_000_000_000


@dataclass
class QuantizeResult:
    model: ir.Model
    output: Path | None
    report: dict[str, Any]
    activation_scales: dict[str, float] = field(default_factory=dict)


DECODE_REPORT_STEPS = 32  # greedy steps reported for an FP8 KV cache (issue 3: 32-step decode vs FP32)


def _optional(module: str, attr: str, feature: str):
    """An object from another engineer's module, or a clear 'not available yet' error."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise UserError(f"{feature} is not available in this build yet ({module} is missing)") from exc
        raise
    if not hasattr(mod, attr):
        raise UserError(f"{feature} is not available in this build yet ({module}.{attr} is missing)")
    return getattr(mod, attr)


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _load(model_or_path) -> tuple[ir.Model, ir.Model, Path | None]:
    """(reference, working copy, source path): two independent models, the reference never touched."""
    from maia_onnx.io import load_model

    if isinstance(model_or_path, ir.Model):
        # the clone shares tensor objects (external weights stay mapped); passes replace them, never mutate
        return model_or_path, model_or_path.clone(), None
    path = Path(model_or_path)
    # both loads are lazy: external weights stay memory-mapped, nothing is read twice into memory
    return load_model(path), load_model(path), path


def _check_options(fmt, method, granularity, block_size, kv_cache, target_cosine, percentile):
    from maia_onnx.calib import check_method

    if fmt not in FORMATS and fmt not in FP8_FORMATS:
        raise InvalidOptionError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_method(method, percentile)
    if granularity not in ("channel", "tensor", "block"):
        raise InvalidOptionError(f"--granularity {granularity!r} is not one of channel, tensor, block")
    if block_size is not None and block_size <= 0:
        raise InvalidOptionError(f"--block-size must be positive, got {block_size}")
    if kv_cache is not None and kv_cache not in KV_CACHE_FORMATS:
        raise InvalidOptionError(f"--kv-cache {kv_cache!r} is not one of {', '.join(KV_CACHE_FORMATS)}")
    if target_cosine is not None and not 0 < target_cosine <= 1:
        raise InvalidOptionError(f"--target-cosine must be in (0, 1], got {target_cosine}")


def quantize_model(
    model_or_path: ir.Model | str | os.PathLike,
    output: str | os.PathLike | None = None,
    format: str = "fp8-e4m3",
    calib: str | os.PathLike | None = "random",
    method: str = "minmax",
    percentile: float = 99.99,
    granularity: str = "channel",
    block_size: int | None = None,
    exclude: Sequence[str] = (),
    weights_only: bool = False,
    attention: bool = True,
    embeddings: bool = False,
    num_samples: int | None = None,
    batch_size: int = 1,
    eval_samples: int = 4,
    dims: Mapping[str, int] | None = None,
    kv_cache: str | None = None,
    scales: str | os.PathLike | None = None,
    emit_scales: str | os.PathLike | None = None,
    target_cosine: float | None = None,
    report_path: str | os.PathLike | None = None,
    evaluate: bool = True,
    external_data: bool | None = None,
    show_progress: bool = True,
    seed: int = 0,
    mx_form: str = "ort",
    qat: bool = False,
    kv_granularity: str = "tensor",
) -> QuantizeResult:
    """Quantize a model; see the module docstring.  Returns the model, the report and the activation scales.

    ``calib``: ``"random"`` (inputs synthesized from the input specs), an ``.npz`` file (one array per graph
    input, first axis = samples) or a directory of ``.npz`` files; ``None`` with ``weights_only``.
    The accuracy report runs on held-out samples (the last ``eval_samples`` of an .npz source, or random
    inputs with another seed).
    """
    from maia_onnx.io import check_output_path, initializer_bytes, save_model, write_text_atomic

    t_start = time.perf_counter()
    fmt = format.lower()
    _check_options(fmt, method, granularity, block_size, kv_cache, target_cosine, percentile)
    source_path = None if isinstance(model_or_path, ir.Model) else Path(model_or_path)
    if output is not None:
        check_output_path(output, *([source_path] if source_path else []))
    if report_path is not None:
        check_output_path(report_path, *([source_path] if source_path else []))
    if emit_scales is not None:
        check_output_path(emit_scales, *([source_path] if source_path else []))
    # resolve optional features before any heavy work so a missing one fails fast
    if fmt in MX_FORMATS:
        QuantizeMxPass = _optional("maia_onnx.passes.quantize_mx", "QuantizeMxPass", f"--format {fmt}")
    if kv_cache is not None:
        KvCacheFp8Pass = _optional("maia_onnx.passes.kv_cache", "KvCacheFp8Pass", "--kv-cache")
    if target_cosine is not None:
        search = _optional("maia_onnx.passes.mixed_precision", "MixedPrecisionPass", "--target-cosine")
    if scales is not None:
        _optional("maia_onnx.scales", "map_scales", "--scales")
    if qat:
        QatImportPass = _optional("maia_onnx.passes.qat_import", "QatImportPass", "--qat")
    if emit_scales is not None:
        _optional("maia_onnx.scales", "emit_scales", "--emit-scales")
    reference, model, source_path = _load(model_or_path)
    if kv_cache is not None:
        kv_pairs = _optional("maia_onnx.passes.kv_cache", "kv_pairs", "--kv-cache")
        if not kv_pairs(model):
            from maia_onnx.errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"--kv-cache: {source_path or 'the model'} has no KV cache (past_key_values.{{i}}.key/value inputs "
                f"and present.{{i}}.key/value outputs); drop --kv-cache for this model"
            )
    external_source = _has_external(model)
    weight_bytes_in = initializer_bytes(model)
    report: dict[str, Any] = {
        "input": str(source_path) if source_path else None,
        "output": str(output) if output else None,
        "format": fmt,
        "weights": {"granularity": granularity, "block_size": block_size},
        "exclude": list(exclude),
    }
    activation_scales: dict[str, float] = {}
    calib_source = eval_source = None
    records: list[Any] = []
    fmt_max = 448.0

    # imported scales (vLLM / ModelOpt names), mapped onto this graph by the MX/KV/QAT engineer's module
    imported_weight_scales: dict[str, np.ndarray] = {}
    imported_act_scales: dict[str, float] = {}
    scale_map = None
    if scales is not None:
        load_scales = _optional("maia_onnx.scales", "load_scales", "--scales")
        map_scales = _optional("maia_onnx.scales", "map_scales", "--scales")
        loaded_scales = load_scales(scales)
        scale_map, unmatched = map_scales(model, loaded_scales)
        if unmatched and len(unmatched) == len(loaded_scales):
            # not one name fits: almost surely the scales of another model; quantizing anyway would ignore them silently
            raise UserError(
                f"none of the {len(unmatched)} scale names in {scales} matches a layer of this model "
                f"(e.g. {unmatched[0]!r}): pass the scales file exported for this model")
        imported_weight_scales = dict(scale_map.weight_scales)
        imported_act_scales = {k: float(v) for k, v in scale_map.activation_scales.items()}
        report["scales_import"] = {"file": str(scales), "unmatched": list(unmatched)}
        if unmatched:
            logger.warning("%d scale name(s) in %s matched no layer: %s", len(unmatched), scales, ", ".join(list(unmatched)[:5]))

    if qat:
        # fake-quant (QAT) chains become FP8 QDQ with their learned scales before targets are chosen,
        # so the FP8 pass only adds what training did not quantize
        qat_pass = QatImportPass(weight_scales=imported_weight_scales, fmt=FP8_FORMATS.get(fmt, "e4m3fn"))
        qat_pass(model)
        report["qat_import"] = list(qat_pass.records)

    from maia_onnx.calib import make_source, split_holdout

    if fmt in FP8_FORMATS or fmt == "fp8-e4m3":
        from maia_onnx.calib import calibrate
        from maia_onnx.formats.fp8 import get_fp8_format
        from maia_onnx.passes.quantize_fp8 import QuantizeFp8Pass, activation_values, find_targets

        fp8 = get_fp8_format(FP8_FORMATS[fmt])
        fmt_max = fp8.max
        if granularity == "block" and not block_size:
            raise InvalidOptionError("--granularity block needs --block-size N (e.g. 32 or 128)")
        op_types = ("MatMul", "Gemm", "Conv", "ConvTranspose") + (("Gather",) if embeddings else ())
        targets = find_targets(model, op_types, exclude=exclude, attention=attention)
        if not targets:
            raise UserError(
                f"nothing to quantize in {source_path or 'the model'}: no MatMul/Gemm/Conv/ConvTranspose left after --exclude"
            )
        act_names = [] if weights_only else activation_values(targets)
        # imported input scales are keyed by activation value name already (maia_onnx.scales.map_scales)
        activation_scales.update({k: v for k, v in imported_act_scales.items() if k in act_names})
        to_calibrate = [n for n in act_names if n not in activation_scales]
        if to_calibrate:
            if calib is None:
                raise InvalidOptionError(
                    f"{len(to_calibrate)} activation(s) have no scale (e.g. {to_calibrate[0]!r}): pass --calib "
                    f"(npz, directory or 'random'), --no-attention for attention-matmul inputs, or --weights-only"
                )
            if str(calib) == "random":
                warnings.warn(
                    "calibrating on random inputs synthesized from the input specs: pass --calib data.npz for real scales",
                    stacklevel=2,
                )
            base = make_source(calib, num_samples, batch_size, seed, dims)
            # hold samples out for the accuracy report only when there is one
            calib_source, eval_source = split_holdout(base, eval_samples) if evaluate else (base, None)
            t0 = time.perf_counter()
            scales_found, _stats = calibrate(
                reference, to_calibrate, calib_source, method, fp8, percentile, show_progress=show_progress
            )
            activation_scales.update(scales_found)
            report["calibration"] = {
                "source": calib_source.description,
                "method": method,
                "percentile": percentile if method == "percentile" else None,
                "samples": calib_source.total_samples(),
                "activations": len(to_calibrate),
                "seconds": time.perf_counter() - t0,
            }
        quant_pass = QuantizeFp8Pass(
            fmt=fp8,
            granularity=granularity,
            block_size=block_size,
            activation_scales=activation_scales,
            weight_scales=imported_weight_scales,
            exclude=exclude,
            attention=attention,
            weights_only=weights_only,
            embeddings=embeddings,
        )
        passes = [quant_pass]
    elif fmt in MX_FORMATS:
        if weights_only is False and calib not in (None, "random") and fmt in ("mxfp4", "mx9", "mx6"):
            logger.info("%s needs no activation scales (weight-only or dynamic); calibration data is used for the accuracy report only", fmt)
        quant_pass = QuantizeMxPass(fmt, form=mx_form, block_size=block_size, exclude=exclude,
                                    activations=False if weights_only else None)
        passes = [quant_pass]
    else:  # bf16
        from maia_onnx.passes.bf16 import Bf16Pass

        quant_pass = Bf16Pass(exclude=exclude, activations=not weights_only)
        passes = [quant_pass]

    if kv_cache is not None:
        kv_feeds = None
        kv_scales = scale_map.kv if scale_map is not None else {}
        if calib is not None:
            kv_source = calib_source or make_source(calib, num_samples, batch_size, seed, dims)
            kv_feeds = list(_take(kv_source.batches(reference), 8))
        passes.append(KvCacheFp8Pass(kv_cache, granularity=kv_granularity, scales=kv_scales, calib=kv_feeds))

    if target_cosine is not None:
        source = calib_source or make_source(calib if calib is not None else "random", num_samples, batch_size, seed, dims)
        passes = [search(passes, target_cosine, calib_source=source, reference=reference)]

    from maia_onnx.pipeline import Pipeline

    # validation serializes every tensor: skip it for memory-mapped models (lazy FP8 bytes come at save time)
    t0 = time.perf_counter()
    result = Pipeline(passes, validate=not external_source)(model)
    model = result.model
    report["passes"] = [r.as_dict() for r in result.reports]
    report["quantize_seconds"] = time.perf_counter() - t0
    records = list(getattr(quant_pass, "records", []))
    if hasattr(quant_pass, "layers"):
        report["mx_layers"] = list(quant_pass.layers)
    for p in passes:
        if type(p).__name__ == "MixedPrecisionPass" and getattr(p, "result", None) is not None:
            report["mixed_precision"] = p.result.as_dict()
        if type(p).__name__ == "KvCacheFp8Pass":
            report["kv_cache"] = {"format": kv_cache, "scales": dict(p.applied)}

    report["activation_scales"] = activation_scales

    # accuracy on held-out samples (needs both models in ORT: skipped for multi-GB models)
    if evaluate and weight_bytes_in <= EVAL_MAX_BYTES:
        from maia_onnx.accuracy import evaluate_accuracy

        if eval_source is None:
            base = make_source(calib if calib is not None else "random", num_samples, batch_size, seed, dims)
            _, eval_source = split_holdout(base, eval_samples)
        t0 = time.perf_counter()
        report["accuracy"] = evaluate_accuracy(reference, model, eval_source.batches(reference), records, fmt_max)
        report["accuracy"]["summary"]["source"] = eval_source.description
        report["accuracy"]["summary"]["seconds"] = time.perf_counter() - t0
        if kv_cache is not None:
            # the FP8 cache's real test: a greedy decode that feeds its own quantised cache back, step by step
            from maia_onnx.decode import decode_report

            t0 = time.perf_counter()
            report["decode"] = decode_report(reference, model, steps=DECODE_REPORT_STEPS, seed=seed)
            report["decode"]["seconds"] = time.perf_counter() - t0
    elif evaluate:
        report["accuracy"] = {"skipped": f"weights are {weight_bytes_in / 1e9:.1f} GB (> {EVAL_MAX_BYTES / 1e9:.0f} GB): run the report on a smaller variant"}

    if output is not None:
        use_external = external_data if external_data is not None else (True if external_source else None)
        t0 = time.perf_counter()
        save_model(model, output, external_data=use_external)
        report["save_seconds"] = time.perf_counter() - t0
        report["sizes"] = _sizes(source_path, Path(output))
    if emit_scales is not None:
        emit = _optional("maia_onnx.scales", "emit_scales", "--emit-scales")
        write = _optional("maia_onnx.scales", "write_scales", "--emit-scales")
        write(emit_scales, emit(model))
    report["seconds"] = time.perf_counter() - t_start
    if report_path is not None:
        from maia_onnx.report import dumps

        write_text_atomic(report_path, dumps(report) + "\n")
    return QuantizeResult(model, Path(output) if output else None, report, activation_scales)


def _take(iterable, n: int):
    for i, item in enumerate(iterable):
        if i >= n:
            return
        yield item


def _file_bytes(path: Path) -> int:
    """Bytes on disk of a model file plus the external data files it references."""
    from maia_onnx.io import external_data_files

    total = path.stat().st_size
    try:
        total += sum(p.stat().st_size for p in external_data_files(ir.load(path)) if p.exists())
    except Exception:  # sizes are informational only
        pass
    return total


def _sizes(source: Path | None, output: Path) -> dict[str, Any]:
    out = _file_bytes(output)
    sizes: dict[str, Any] = {"output_bytes": out}
    if source is not None:
        src = _file_bytes(source)
        sizes["input_bytes"] = src
        sizes["ratio"] = out / src if src else None
    return sizes
