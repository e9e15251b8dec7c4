"""`maia-onnx export MODEL -o out.onnx`: built-in / module:factory / hf:DIR -> ONNX, parity-checked against PyTorch."""

from __future__ import annotations

import click

from maia_onnx.cli.options import echo_json, external_data_option, json_option


def parse_dims(values: tuple[str, ...]) -> dict[str, int]:
    """('batch=2', 'seq=16') -> {'batch': 2, 'seq': 16}; InvalidOptionError on anything else."""
    from maia_onnx.errors import InvalidOptionError

    dims: dict[str, int] = {}
    for item in values:
        name, sep, num = item.partition("=")
        if not sep or not name.strip() or not num.strip().isdigit() or int(num) < 1:
            raise InvalidOptionError(f"bad --dim {item!r}: write NAME=POSITIVE_INT, e.g. --dim batch=2 --dim seq=16")
        dims[name.strip()] = int(num)
    return dims


@click.command("export", help="Export MODEL to ONNX and check it against PyTorch (max rel error <= 1e-4).\n\n"
               "MODEL is a built-in name (llama-tiny, unet-tiny, yolo-tiny), package.module:factory "
               "(returns (module, example_inputs)), or hf:DIR (local Hugging Face checkpoint).")
@click.argument("model_ref", metavar="MODEL")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .onnx path.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 21).")
@click.option("--dynamic/--static", default=True, show_default=True, help="Symbolic batch/seq/past dims, or fixed to the example shapes.")
@click.option("--size", type=click.Choice(["tiny", "large"]), default=None, help="Built-in model size (large: multi-GB weights).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random weights and example inputs.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N",
              help="Example-input size, e.g. --dim batch=1 --dim seq=16 --dim past=8 (fixes shapes with --static).")
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
