"""`maia-onnx analyze`: roofline per op and the TP x PP x interconnect what-if, as tables, JSON or a plot."""

from __future__ import annotations

import click

from maia_onnx.analyze import analyze, plot_breakdown, render_text
from maia_onnx.cli.options import device_option, dims_option, echo_json, json_option, parse_dims
from maia_onnx.errors import InvalidOptionError


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidOptionError(f"--{what} takes comma-separated integers like 1,2,4 (got {text!r})") from None


@click.command("analyze")
@click.argument("model", type=click.Path())
@device_option
@click.option("--interconnect", "interconnects", default=None,
              help="Comma-separated interconnect profiles or JSON files (default: the device's own), e.g. nvlink4,pcie5,maia-eth.")
@click.option("--batch", default=1, show_default=True, type=int, help="Batch size.")
@click.option("--seq", default=128, show_default=True, type=int, help="Prompt length for prefill.")
@click.option("--past", default=None, type=int, help="Past length for decode (default: --seq).")
@click.option("--memory-limit", default=None, type=float, help="Memory per device in GB (default: device capacity).")
@click.option("--tp", "tps", default="1,2,4,8", show_default=True, help="TP degrees to consider.")
@click.option("--pp", "pps", default="1,2,4", show_default=True, help="PP degrees to consider.")
@click.option("--microbatches", default=None, type=int, help="Pipeline microbatches (default: the fastest of 1, pp, 2pp, 4pp that the batch allows).")
@click.option("--phase", type=click.Choice(["both", "prefill", "decode"]), default="both", show_default=True)
@dims_option("Bind a symbolic input dim: NAME=INT (repeatable).")
@click.option("--compute-dtype", default=None, help="Precision float matmuls run in on the device (default: per device profile).")
@click.option("--top", default=15, show_default=True, type=int, help="Ops to list per phase (by roofline time).")
@click.option("--plot", "plot_path", default=None, type=click.Path(), help="Write a PNG time breakdown vs TP degree (needs matplotlib).")
@json_option
def command(model, device, interconnects, batch, seq, past, memory_limit, tps, pps, microbatches, phase, dims,
            compute_dtype, top, plot_path, as_json):
    """Roofline per op and the best TP x PP layout for MODEL (.onnx file or partition directory)."""
    phases = ("prefill", "decode") if phase == "both" else (phase,)
    links = [v.strip() for v in interconnects.split(",") if v.strip()] if interconnects else None
    report = analyze(
        model, device=device, interconnects=links, batch=batch, seq=seq, past=past,
        memory_limit=memory_limit * 1e9 if memory_limit else None,
        tps=_int_list(tps, "tp"), pps=_int_list(pps, "pp"), microbatches=microbatches, dims=parse_dims(dims),
        compute_dtype=compute_dtype, phases=phases,
    )
    if plot_path:
        plot_breakdown(report, plot_path)
        report["plot"] = str(plot_path)
    if as_json:
        echo_json(report)
    else:
        click.echo(render_text(report, top=top))
