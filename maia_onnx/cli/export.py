"""`maia-onnx export MODEL -o out.onnx`: built-in / module:factory / hf:DIR -> ONNX, parity-checked against PyTorch."""

from __future__ import annotations

import click

from maia_onnx.cli.options import dims_option, echo_json, external_data_option, json_option
from maia_onnx.cli.options import parse_dims as _parse_dims


def parse_dims(values) -> dict[str, int]:
    """Export example sizes must be positive (a zero-length batch/seq cannot be traced)."""
    return _parse_dims(values, minimum=1)


@click.command("export", help="Export MODEL to ONNX and check it against PyTorch (max rel error <= 1e-4).\n\n"
               "MODEL is a built-in name (llama-tiny, unet-tiny, yolo-tiny), package.module:factory "
               "(returns (module, example_inputs)), or hf:DIR (local Hugging Face checkpoint).")
@click.argument("model_ref", metavar="MODEL")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 21).")
@click.option("--dynamic/--static", default=True, show_default=True, help="Symbolic batch/seq/past dims, or fixed to the example shapes.")
@click.option("--size", type=click.Choice(["tiny", "large"]), default=None, help="Built-in model size (large: multi-GB weights).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights and example inputs.")
@dims_option("Example-input size, e.g. --dim batch=1 --dim seq=16 --dim past=8 (fixes shapes with --static).")
@click.option("--no-check", is_flag=True, help="Skip the ORT-vs-PyTorch parity check.")
@external_data_option
@json_option
def command(model_ref, output, opset, dynamic, size, seed, dims, no_check, external_data, as_json):
    from maia_onnx.export import DEFAULT_OPSET, REL_TOLERANCE, export_model, stderr_progress
    from maia_onnx.report import print_table

    result = export_model(
        model_ref, output, size=size, opset=opset or DEFAULT_OPSET, dynamic=dynamic, seed=seed,
        dims=parse_dims(dims), external_data=external_data, check=not no_check, progress=stderr_progress,
    )
    if as_json:
        echo_json(result.as_dict())
        return
    rows = [{"output": name, "max_abs": p["max_abs"], "max_rel": p["max_rel"], "cosine": p["cosine"]} for name, p in result.parity.items()]
    if rows:
        print_table(rows, ["output", "max_abs", "max_rel", "cosine"], title=f"parity ORT vs PyTorch (tolerance rel {REL_TOLERANCE:g})")
    click.echo(f"wrote {result.path} (opset {result.opset}, {'dynamic' if result.dynamic else 'static'} shapes, {result.seconds:.1f}s)")
