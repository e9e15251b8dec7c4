"""`maia-onnx quantize`: FP8 / MX / BF16 quantization with calibration and an accuracy report (thin click layer)."""

from __future__ import annotations

import click

from maia_onnx.cli.options import dims_option, echo_json, parse_dims, external_data_option, json_option, model_argument, output_option, report_option

FORMAT_CHOICES = ["fp8-e4m3", "fp8-e5m2", "mxfp8-e4m3", "mxfp8-e5m2", "mxint8", "mxfp4", "mx9", "mx6", "bf16"]


@click.command("quantize", help="Quantize MODEL to FP8 (QDQ, 1-byte weights), an MX format or BF16, "
               "calibrating activation scales and reporting accuracy against the original.\n\n"
               "Calibration data (--calib): an .npz with one array per graph input (first axis = samples), "
               "a directory of such files, or 'random' (synthesized from the input specs).")
@model_argument()
@output_option(help="Quantized model path (.onnx); external data goes to <out>.data.")
@click.option("--format", "fmt", type=click.Choice(FORMAT_CHOICES), default="fp8-e4m3", show_default=True,
              help="Target number format.")
@click.option("--calib", default="random", show_default=True, metavar="NPZ|DIR|random",
              help="Calibration data for activation scales.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "mse", "entropy"]), default="minmax",
              show_default=True, help="Activation calibration method.")
@click.option("--percentile", type=float, default=99.99, show_default=True, help="Percentile of |x| for --method percentile.")
@click.option("--granularity", type=click.Choice(["channel", "tensor", "block"]), default="channel", show_default=True,
              help="FP8 weight scales: per output channel, per tensor, or per block along the reduction axis.")
@click.option("--block-size", type=int, default=None, help="Block size for --granularity block (FP8) or MX formats.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Leave nodes matching this fnmatch pattern (node name, op type or layer name, e.g. '*lm_head*') unquantized.")
@click.option("--weights-only", is_flag=True, help="Quantize weights only; activations stay in float (no calibration).")
@click.option("--no-attention", is_flag=True, help="Do not quantize the attention matmuls (Q.K^T, P.V).")
@click.option("--embeddings", is_flag=True, help="FP8: also store embedding tables (Gather) in FP8 with per-row scales.")
@click.option("--samples", "num_samples", type=int, default=None, help="Calibration samples to use (default: all; random: 8).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Samples per calibration batch.")
@click.option("--eval-samples", type=int, default=4, show_default=True, help="Held-out samples for the accuracy report.")
@dims_option("Symbolic dim size for random inputs, e.g. --dim seq=16.")
@click.option("--kv-cache", type=click.Choice(["fp8-e4m3", "fp8-e5m2"]), default=None, help="Quantize the KV cache too.")
@click.option("--scales", "scales_path", type=click.Path(), default=None, help="Import scales (vLLM / ModelOpt names) from JSON or safetensors.")
@click.option("--emit-scales", type=click.Path(), default=None, help="Write the scales used, in vLLM / ModelOpt naming.")
@click.option("--qat", is_flag=True, help="Turn fake-quant (QAT) chains into FP8 QDQ with their learned scales first.")
@click.option("--target-cosine", type=float, default=None, help="Mixed precision: keep the most sensitive layers wider until output cosine >= X.")
@click.option("--no-eval", is_flag=True, help="Skip the accuracy report.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random calibration inputs.")
@click.option("--layers", "max_layers", type=int, default=40, show_default=True, help="Per-layer rows shown (worst SQNR first; 0: all).")
@external_data_option
@report_option
@json_option
def command(model, output, fmt, calib, method, percentile, granularity, block_size, exclude, weights_only, no_attention, embeddings,
            num_samples, batch_size, eval_samples, dims, kv_cache, scales_path, emit_scales, qat, target_cosine, no_eval, seed,
            max_layers, external_data, report_path, as_json):
    import logging
    import sys
    import warnings

    from maia_onnx.quantize import quantize_model

    def show_warning(message, category, filename, lineno, file=None, line=None):
        click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show_warning
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    result = quantize_model(
        model,
        output,
        format=fmt,
        calib=calib,
        method=method,
        percentile=percentile,
        granularity=granularity,
        block_size=block_size,
        exclude=exclude,
        weights_only=weights_only,
        attention=not no_attention,
        embeddings=embeddings,
        num_samples=num_samples,
        batch_size=batch_size,
        eval_samples=eval_samples,
        dims=parse_dims(dims),
        kv_cache=kv_cache,
        scales=scales_path,
        emit_scales=emit_scales,
        target_cosine=target_cosine,
        qat=qat,
        report_path=report_path,
        evaluate=not no_eval,
        external_data=external_data,
        show_progress=not as_json,
        seed=seed,
    )
    report = result.report
    if as_json:
        echo_json(report)
        return
    from maia_onnx.accuracy import format_report
    from maia_onnx.report import human_bytes

    accuracy = report.get("accuracy") or {}
    if accuracy.get("layers") or accuracy.get("outputs"):
        click.echo(format_report(accuracy, max_layers or None))
        click.echo()
    elif accuracy.get("skipped"):
        click.echo(f"accuracy report skipped: {accuracy['skipped']}")
    mixed = report.get("mixed_precision")
    if mixed:
        kept = ", ".join(k.get("module") or k["layer"] for k in mixed["kept"]) or "none"
        click.echo(f"mixed precision: kept {len(mixed['kept'])} layer(s) in {mixed['keep_dtype']} ({kept}); "
                   f"cosine {mixed['cosine_all_quantized']:.6f} -> {mixed['final_cosine']:.6f} "
                   f"(target {mixed['target_cosine']}, {'met' if mixed['met'] else 'NOT met'})")
    if report.get("kv_cache"):
        click.echo(f"KV cache: {report['kv_cache']['format']} ({len(report['kv_cache']['scales'])} cache tensors)")
    decode = report.get("decode")
    if decode:
        from maia_onnx.decode import step_rows
        from maia_onnx.report import print_table

        rows = step_rows(decode)
        cosines = [r["cosine"] for r in rows]
        click.echo(f"greedy decode, {len(rows)} steps with the quantized cache vs FP32: min logits cosine "
                   f"{min(cosines):.6f}, mean {sum(cosines) / len(cosines):.6f}, token agreement "
                   f"{decode['token_agreement']:.3f} (teacher-forced), {decode['free_running_agreement']:.3f} (free-running)")
        print_table(rows, ["step", "cosine", "max_abs", "fp32_token", "token", "agree"])
    sizes = report.get("sizes", {})
    size_text = human_bytes(sizes.get("output_bytes", 0))
    if sizes.get("input_bytes"):
        size_text += f" ({sizes['ratio']:.3f}x of {human_bytes(sizes['input_bytes'])})"
    calib_info = report.get("calibration")
    calib_text = f", calibrated {calib_info['activations']} activations on {calib_info['samples']} samples ({calib_info['method']})" if calib_info else ""
    click.echo(f"wrote {output}: {fmt}, {size_text}{calib_text}, {report['seconds']:.1f}s")
    if report_path:
        click.echo(f"report: {report_path}")
    if emit_scales:
        click.echo(f"scales: {emit_scales}")
