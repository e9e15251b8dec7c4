"""`maia-onnx export MODEL -o out.onnx|DIR`: built-in / module:factory / hf:DIR / ultralytics:REF -> ONNX, parity-checked against PyTorch."""

from __future__ import annotations

import click

from maia_onnx.cli.options import dims_option, echo_json, external_data_option, json_option
from maia_onnx.cli.options import parse_dims as _parse_dims
from maia_onnx.export import DEFAULT_OPSET, export_model, REL_TOLERANCE
from maia_onnx.report import print_table


def stderr_progress(msg: str) -> None:
    click.echo(f"[export] {msg}", err=True)


def parse_dims(values) -> dict[str, int]:
    """Export example sizes must be positive (a zero-length batch/seq cannot be traced)."""
    return _parse_dims(values, minimum=1)


HELP = """Export MODEL to ONNX and check it against PyTorch (max rel error <= 1e-4).

\b
MODEL is one of:
  llama-tiny, unet-tiny, yolo-tiny     built-in models (seeded random weights)
  package.module:factory               returns (module, example_inputs[, output_names]); a dict of
                                       inputs binds to forward() by parameter name
  hf:DIR                               local checkpoint, kind detected from its files: decoder LM
                                       (dense or MoE), text encoder, image encoder (pixel_values),
                                       encoder-decoder (T5, BART, Whisper), diffusers pipeline
                                       (model_index.json) or component (UNet2DConditionModel,
                                       AutoencoderKL)
  ultralytics:yolov8n.yaml|PATH.pt     Ultralytics detector (no downloads)

\b
-o is a .onnx file, except for models that export several graphs, where it is a directory:
  encoder-decoders   DIR/encoder.onnx + DIR/decoder.onnx (self- and cross-attention KV cache),
                     verified by greedy generation in ONNX Runtime equal to PyTorch's
  diffusers pipeline DIR/<component>.onnx (unet, text_encoder, vae_decoder, vae_encoder)
  AutoencoderKL      DIR/vae_decoder.onnx + DIR/vae_encoder.onnx
"""


@click.command("export", help=HELP)
@click.argument("model_ref", metavar="MODEL")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .onnx path (a directory for multi-graph models).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 21).")
@click.option("--dynamic/--static", default=True, show_default=True, help="Symbolic batch/seq/past dims, or fixed to the example shapes.")
@click.option("--size", type=click.Choice(["tiny", "large"]), default=None, help="Built-in model size (large: multi-GB weights).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights and example inputs.")
@dims_option("Example-input size, e.g. --dim batch=1 --dim seq=16 --dim past=8 (fixes shapes with --static).")
@click.option("--no-check", is_flag=True, help="Skip the ORT-vs-PyTorch parity check.")
@external_data_option
@json_option
def command(model_ref, output, opset, dynamic, size, seed, dims, no_check, external_data, as_json):
    result = export_model(
        model_ref, output, size=size, opset=opset or DEFAULT_OPSET, dynamic=dynamic, seed=seed,
        dims=parse_dims(dims), external_data=external_data, check=not no_check, progress=stderr_progress,
    )
    if as_json:
        echo_json(result.as_dict())
        return
    graphs = result.parts or {result.path.name: result}
    rows = [{"graph": graph, "output": name, "max_abs": p["max_abs"], "max_rel": p["max_rel"], "cosine": p["cosine"]}
            for graph, part in graphs.items() for name, p in part.parity.items()]
    if rows:
        columns = (["graph"] if result.parts else []) + ["output", "max_abs", "max_rel", "cosine"]
        print_table(rows, columns, title=f"parity ORT vs PyTorch (tolerance rel {REL_TOLERANCE:g})")
    if "tokens_equal" in result.checks:
        step = result.checks["step_logits"]
        click.echo(f"greedy generation: {result.checks['greedy_tokens']} tokens equal in ONNX Runtime and PyTorch "
                   f"(step logits max rel {step['max_rel']:.2e})")
    if result.parts:
        click.echo(f"wrote {', '.join(result.parts)} to {result.path} (opset {result.opset}, {result.seconds:.1f}s)")
        return
    click.echo(f"wrote {result.path} (opset {result.opset}, {'dynamic' if result.dynamic else 'static'} shapes, {result.seconds:.1f}s)")
