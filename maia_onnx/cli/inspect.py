"""`maia-onnx inspect model.onnx`: opset, I/O with symbolic dims, op histogram, parameters by dtype, FLOPs by op type."""

from __future__ import annotations

import click

from maia_onnx.cli.options import dims_option, echo_json, json_option, model_argument, parse_dims
from maia_onnx.inspect import inspect_model
from maia_onnx.report import format_table, human_bytes


@click.command("inspect", help="Opset, inputs/outputs, op histogram, parameters by dtype and estimated FLOPs of MODEL.")
@model_argument()
@dims_option("Value of a symbolic dim for the FLOP estimate (default 1), e.g. --dim batch=1 --dim seq=128.")
@click.option("--top", type=int, default=0, help="Show only the N most frequent ops in the histogram (0: all).")
@json_option
def command(model, dims, top, as_json):
    info = inspect_model(model, parse_dims(dims))
    if as_json:
        echo_json(info)
        return

    def shape(s):
        return "[" + ", ".join(str(d) for d in s) + "]"

    click.echo(f"{info['path']}: opset {info['opset']} (ir {info['ir_version']}), {info['num_nodes']} nodes, producer {info['producer'] or '?'}")
    others = {k: v for k, v in info["opset_imports"].items() if k not in ("", "ai.onnx")}
    if others:
        click.echo("other domains: " + ", ".join(f"{k} v{v}" for k, v in others.items()))
    io_rows = [{"kind": "input", "name": i["name"], "dtype": i["dtype"], "shape": shape(i["shape"])} for i in info["inputs"]]
    io_rows += [{"kind": "output", "name": o["name"], "dtype": o["dtype"], "shape": shape(o["shape"])} for o in info["outputs"]]
    click.echo()
    click.echo(format_table(io_rows, ["kind", "name", "dtype", "shape"], title="Inputs / outputs"))
    params = info["parameters"]
    p_rows = [{"dtype": k, "parameters": v["count"], "tensors": v["tensors"], "bytes": human_bytes(v["bytes"])} for k, v in params["by_dtype"].items()]
    p_rows.append({"dtype": "total", "parameters": params["count"], "tensors": sum(v["tensors"] for v in params["by_dtype"].values()), "bytes": human_bytes(params["bytes"])})
    click.echo()
    click.echo(format_table(p_rows, ["dtype", "parameters", "tensors", "bytes"], title="Parameters (initializers)"))
    flops = info["flops"]
    total = flops["total"] or 1
    hist = list(info["op_histogram"].items())
    if top:
        hist = hist[:top]
    op_rows = [{"op": op, "count": n, "flops": flops["by_op"].get(op, 0), "share": f"{100.0 * flops['by_op'].get(op, 0) / total:.1f}%"} for op, n in hist]
    dims_text = ", ".join(f"{k}={v}" for k, v in flops["dims"].items()) or "static shapes"
    click.echo()
    click.echo(format_table(op_rows, ["op", "count", "flops", "share"], title=f"Ops and estimated FLOPs ({dims_text})"))
    click.echo(f"total: {flops['total']:,} FLOPs ({flops['total'] / 1e9:.3f} GFLOP)")
    if flops["unknown_shape_nodes"]:
        unknown = ", ".join(f"{k} x{v}" for k, v in flops["unknown_shape_nodes"].items())
        click.echo(f"note: shapes unknown for {unknown}; their FLOPs are not counted (give --dim values)")
