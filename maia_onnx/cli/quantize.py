"""`maia-onnx quantize`: FP8 / MX / BF16 quantization with calibration and an accuracy report (thin click layer)."""

from __future__ import annotations

import logging
import sys
import warnings

import click

from maia_onnx.accuracy import format_report
from maia_onnx.calib import METHODS
from maia_onnx.cli.options import (
    dims_option,
    echo_json,
    external_data_option,
    json_option,
    model_argument,
    output_option,
    parse_dims,
    report_option,
)
from maia_onnx.decode import step_rows
from maia_onnx.formats.registry import FORMAT_NAMES, KV_CACHE_FORMATS, MX_FORMS, ROUNDINGS
from maia_onnx.passes.kv_cache import GRANULARITIES as KV_GRANULARITIES
from maia_onnx.passes.quantize_fp8 import GRANULARITIES
from maia_onnx.quantize import QuantizeConfig, QuantizeReport, quantize_model
from maia_onnx.report import human_bytes, print_table


@click.command("quantize", help="Quantize MODEL to FP8 (QDQ, 1-byte weights), an MX format or BF16, "
               "calibrating activation scales and reporting accuracy against the original.\n\n"
               "Calibration data (--calib): text:FILE (one sample a line, or JSONL with a 'text' field; tokenized "
               "with --tokenizer, default the checkpoint the model was exported from), images:DIR, an .npz with one "
               "array per graph input (first axis = samples), a directory of such files, or 'random' (synthesized "
               "from the input specs).")
@model_argument()
@output_option(help="Quantized model path (.onnx); external data goes to <out>.data.")
@click.option("--format", "fmt", type=click.Choice(FORMAT_NAMES), default="fp8-e4m3", show_default=True,
              help="Target number format.")
@click.option("--calib", default="random", show_default=True, metavar="text:FILE|images:DIR|NPZ|DIR|random",
              help="Calibration data for activation scales (its last --eval-samples feed the accuracy report).")
@click.option("--tokenizer", type=click.Path(), default=None, metavar="DIR",
              help="Tokenizer for --calib text:FILE (default: the hf: directory the model was exported from).")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per text sample at most (--calib text:).")
@click.option("--image-size", default=None, metavar="H,W", help="Resize --calib images: to H,W (default: the graph's input size "
              "or the checkpoint's preprocessor config).")
@click.option("--method", type=click.Choice(METHODS), default="minmax", show_default=True, help="Activation calibration method.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="Percentile of |x| for --method percentile.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="channel", show_default=True,
              help="FP8 weight scales: per output channel, per tensor, or per block along the reduction axis.")
@click.option("--block-size", type=int, default=None, help="Block size for --granularity block (FP8) or MX formats.")
@click.option("--mx-form", type=click.Choice(MX_FORMS), default="ort", show_default=True,
              help="OCP MX / 4-bit weight encoding: 'ort' (float32 power-of-two scales; 4-bit elements packed two per "
                   "byte and decoded in the graph: runs in ONNX Runtime) or 'standard' (FLOAT8E8M0 scales, FLOAT4E2M1 "
                   "elements, opset 24; ORT cannot run it yet: needs --no-eval).")
@click.option("--rounding", type=click.Choice(ROUNDINGS), default="rtn", show_default=True,
              help="4-bit weights (mxfp4, fp4-e4m3, w4a8): round to nearest, or GPTQ (error-compensating rounding from "
                   "calibration Hessians of each layer's inputs; needs --calib).")
@click.option("--hadamard", is_flag=True,
              help="mxfp4 / fp4-e4m3: rotate each linear's input channels by a block Hadamard (the format's block size) "
                   "where that lowers the weights' 4-bit error; one small MatMul per rotated input at run time.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Leave nodes matching this fnmatch pattern (node name, op type or layer name, e.g. '*lm_head*') unquantized.")
@click.option("--weights-only", is_flag=True, help="Quantize weights only; activations stay in float (no calibration).")
@click.option("--no-attention", is_flag=True, help="Do not quantize the attention matmuls (Q.K^T, P.V).")
@click.option("--embeddings", is_flag=True, help="FP8: also store embedding tables (Gather) in FP8 with per-row scales.")
@click.option("--samples", "num_samples", type=int, default=None, help="Calibration samples to use (default: all; random: 8).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Samples per calibration batch.")
@click.option("--eval-samples", type=int, default=4, show_default=True, help="Held-out samples for the accuracy report.")
@dims_option("Symbolic dim size for random inputs, e.g. --dim seq=16.")
@click.option("--kv-cache", type=click.Choice(KV_CACHE_FORMATS), default=None, help="Quantize the KV cache too.")
@click.option("--kv-granularity", type=click.Choice(KV_GRANULARITIES), default="tensor", show_default=True,
              help="KV-cache scales: one per cache tensor or one per KV head.")
@click.option("--scales", "scales_path", type=click.Path(), default=None,
              help="Import scales (vLLM / ModelOpt names) from JSON, safetensors or a compressed-tensors checkpoint directory.")
@click.option("--emit-scales", type=click.Path(), default=None, help="Write the scales used, in vLLM / ModelOpt naming.")
@click.option("--emit-checkpoint", type=click.Path(), default=None, metavar="DIR",
              help="Also write a Hugging Face checkpoint in the compressed-tensors FP8 format (vLLM / SGLang load it).")
@click.option("--activation-scheme", type=click.Choice(["static", "dynamic", "none"]), default=None,
              help="--emit-checkpoint input activations (default: static when activations are quantized, else none).")
@click.option("--qat", is_flag=True, help="Turn fake-quant (QAT) chains into FP8 QDQ with their learned scales first.")
@click.option("--target-cosine", type=float, default=None, help="Mixed precision: keep the most sensitive layers wider until output cosine >= X.")
@click.option("--no-eval", is_flag=True, help="Skip the accuracy report.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random calibration inputs.")
@click.option("--layers", "max_layers", type=int, default=40, show_default=True, help="Per-layer rows shown (worst SQNR first; 0: all).")
@external_data_option
@report_option
@json_option
def command(model, output, fmt, calib, tokenizer, seq_len, image_size, method, percentile, granularity, block_size, mx_form, rounding, hadamard, exclude, weights_only, no_attention,
            embeddings, num_samples, batch_size, eval_samples, dims, kv_cache, kv_granularity, scales_path, emit_scales, emit_checkpoint, activation_scheme, qat,
            target_cosine, no_eval, seed, max_layers, external_data, report_path, as_json):
    config = QuantizeConfig(
        format=fmt, calib=calib, tokenizer=tokenizer, seq_len=seq_len, image_size=image_size, method=method, percentile=percentile, granularity=granularity, block_size=block_size,
        mx_form=mx_form, rounding=rounding, hadamard=hadamard, exclude=exclude, weights_only=weights_only, attention=not no_attention, embeddings=embeddings,
        num_samples=num_samples, batch_size=batch_size, eval_samples=eval_samples, dims=parse_dims(dims), kv_cache=kv_cache,
        kv_granularity=kv_granularity, scales=scales_path, emit_scales=emit_scales,
        emit_checkpoint=emit_checkpoint, activation_scheme=activation_scheme, qat=qat, target_cosine=target_cosine,
        evaluate=not no_eval, report_path=report_path, external_data=external_data, show_progress=not as_json, seed=seed,
    )

    def show_warning(message, category, filename, lineno, file=None, line=None):
        click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show_warning
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    result = quantize_model(model, output, config)
    if as_json:
        echo_json(result.report)
        return
    _print_report(result.quantize_report, config, output, max_layers)


def _print_report(report: QuantizeReport, config: QuantizeConfig, output, max_layers: int) -> None:
    if report.accuracy is not None and (report.accuracy.layers or report.accuracy.outputs):
        click.echo(format_report(report.accuracy, max_layers or None))
        click.echo()
    elif report.accuracy_skipped:
        click.echo(f"accuracy report skipped: {report.accuracy_skipped}")
    mixed = report.mixed_precision
    if mixed is not None:
        kept = ", ".join(k.get("module") or k["layer"] for k in mixed.kept) or "none"
        click.echo(f"mixed precision: kept {len(mixed.kept)} layer(s) in {mixed.keep_dtype} ({kept}); "
                   f"cosine {mixed.cosine_all_quantized:.6f} -> {mixed.final_cosine:.6f} "
                   f"(target {mixed.target_cosine}, {'met' if mixed.met else 'NOT met'})")
    if report.gptq:
        rtn = sum(r.rtn_error for r in report.gptq)
        better = sum(r.gptq_error < r.rtn_error for r in report.gptq)
        click.echo(f"GPTQ: {len(report.gptq)} layers, calibration output error {sum(r.gptq_error for r in report.gptq) / rtn:.3f}x "
                   f"of round-to-nearest's (lower on {better} of {len(report.gptq)})" if rtn else f"GPTQ: {len(report.gptq)} layers")
    if report.rotations:
        turned = [r for r in report.rotations if r.rotated]
        click.echo(f"Hadamard: rotated {len(turned)} of {len(report.rotations)} layer inputs (weight error "
                   f"{sum(r.error_rotated for r in turned) / max(sum(r.error_plain for r in turned), 1e-30):.3f}x where rotated)")
    if report.kv_cache is not None:
        click.echo(f"KV cache: {report.kv_cache.format} ({len(report.kv_cache.record.scales)} cache tensors)")
    if report.decode:
        rows = step_rows(report.decode)
        cosines = [r["cosine"] for r in rows]
        click.echo(f"greedy decode, {len(rows)} steps with the quantized cache vs FP32: min logits cosine "
                   f"{min(cosines):.6f}, mean {sum(cosines) / len(cosines):.6f}, token agreement "
                   f"{report.decode['token_agreement']:.3f} (teacher-forced), "
                   f"{report.decode['free_running_agreement']:.3f} (free-running)")
        print_table(rows, ["step", "cosine", "max_abs", "fp32_token", "token", "agree"])
    sizes = report.sizes
    size_text = human_bytes(sizes.output_bytes if sizes else 0)
    if sizes is not None and sizes.input_bytes:
        size_text += f" ({sizes.ratio:.3f}x of {human_bytes(sizes.input_bytes)})"
    calib = report.calibration
    calib_text = f", calibrated {calib.activations} activations on {calib.samples} samples ({calib.method})" if calib else ""
    click.echo(f"wrote {output}: {report.format}, {size_text}{calib_text}, {report.seconds:.1f}s")
    if config.report_path:
        click.echo(f"report: {config.report_path}")
    if config.emit_scales:
        click.echo(f"scales: {config.emit_scales}")
    if report.checkpoint is not None:
        ckpt = report.checkpoint
        click.echo(f"checkpoint: {ckpt['path']} (compressed-tensors FP8, {ckpt['linears']} linears, "
                   f"{ckpt['weight_strategy']} weights, {ckpt['activation_scheme']} activations"
                   f"{', KV-cache scales' if ckpt['kv_cache_layers'] else ''})")
