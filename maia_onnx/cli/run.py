"""`maia-onnx run`: parse options, call the run verb (``maia_onnx.run``) and print its report."""

from __future__ import annotations

import click

from maia_onnx.cli.options import (
    device_option,
    dims_option,
    echo_json,
    json_option,
    launcher_options,
    model_argument,
    parse_dims,
    split_names,
)
from maia_onnx.report import print_table
from maia_onnx.run import run_distributed, run_path


@click.command("run")
@model_argument()
@click.option("--inputs", "inputs_path", type=click.Path(), default=None, help="Input feeds (.npz, names = graph inputs).")
@click.option("--random", is_flag=True,
              help="Synthesized inputs: indices within the tables they read, masks in {0,1}, images in [0,1) "
                   "(see --dim, --seed).")
@dims_option("Symbolic dims for --random, e.g. --dim batch=1 --dim seq=16.")
@click.option("--seed", default=0, show_default=True, help="Seed for --random.")
@click.option("--providers", default="MaiaExecutionProvider,CPUExecutionProvider", show_default=True,
              help="Comma-separated providers (maia, cpu or the ORT names).")
@device_option
@click.option("--cpu-ops", default="", help="Comma-separated op types to keep on the CPU (plain models).")
@click.option("--save-outputs", type=click.Path(), default=None, help="Write outputs to this .npz.")
@click.option("--compare-to", "compare_to", type=click.Path(), default=None, help="Reference model: run it in plain ORT and compare.")
@click.option("--repeat", default=1, show_default=True, help="Run this many times and report mean latency.")
@click.option("--report", "show_report", is_flag=True, help="Print the placement report (device vs CPU, reasons, est. time).")
@launcher_options
@json_option
def command(model, inputs_path, random, dims, seed, providers, device, cpu_ops, save_outputs, compare_to, repeat,
            show_report, launcher, nproc_per_node, nnodes, node_rank, master_addr, master_port, rdzv_endpoint,
            microbatches, decode_steps, dist_timeout, interconnect, as_json):
    """Run MODEL (plain, compiled, or a partition directory with manifest.json) and report.

    Partition directories run in this process (one ORT session per rank segment, collectives in NumPy) or,
    with --launcher torchrun, one process per rank with torch.distributed collectives; on several nodes,
    start the same command on each with --nnodes, its own --node-rank and the --master-addr of node 0.
    """
    if launcher == "torchrun":
        result = run_distributed(model, inputs_path, save_outputs, random=random, dims=parse_dims(dims), seed=seed,
                                 nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                                 master_addr=master_addr, master_port=master_port, rdzv_endpoint=rdzv_endpoint,
                                 microbatches=microbatches, decode_steps=decode_steps, dist_timeout=dist_timeout,
                                 interconnect=interconnect)
        print_timing(result, as_json)
        return
    result = run_path(model, inputs_path=inputs_path, random=random, dims=parse_dims(dims), seed=seed,
                      providers=split_names(providers), device=device, cpu_ops=split_names(cpu_ops),
                      save_outputs=save_outputs, compare_to=compare_to, repeat=repeat, show_report=show_report,
                      microbatches=microbatches)
    print_result(result, as_json)


def print_timing(result: dict, as_json: bool = False) -> None:
    """Per-rank timing table (or JSON) of a torchrun run."""
    if as_json:
        echo_json(result)
        return
    rows = result.get("ranks") or []
    if rows:
        print_table(rows, list(rows[0]), title=f"{result['model']}: per-rank timing (seconds, bytes)")
    else:
        click.echo(f"{result['model']}: this node's ranks finished; node rank 0 holds the outputs and timings")
    if result.get("saved"):
        click.echo(f"outputs written to {result['saved']}")


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        echo_json(result)
        return
    rows = [{"output": k, **v} for k, v in result["outputs"].items()]
    title = f"{result['model']}" + (f" on {', '.join(result['providers'])}" if result.get("providers") else "")
    print_table(rows, ["output", "shape", "dtype"], title=title)
    if result.get("latency_s") is not None:
        click.echo(f"latency: {result['latency_s'] * 1e3:.3f} ms/run")
    if "compare" in result:
        click.echo()
        print_table([{"output": k, **v} for k, v in result["compare"].items()], ["output", "max_abs", "max_rel", "cosine"],
                    title="vs --compare-to (plain ONNX Runtime)")
    placement = result.get("placement")
    if placement:
        click.echo()
        if placement.get("compiled"):
            print_table(placement["partitions"], ["partition", "nodes", "flops", "bytes", "est_time_us", "arena_bytes"],
                        title=f"compiled model: {placement['device_nodes']} device nodes, {placement['cpu_nodes']} CPU nodes")
        else:
            s = placement["summary"]
            rows: dict = {}
            for n in placement["nodes"]:
                row = rows.setdefault((n["op_type"], n["device"], n["reason"]),
                                      {"op": n["op_type"], "where": n["device"], "nodes": 0, "flops": 0.0, "reason": n["reason"]})
                row["nodes"] += 1
                row["flops"] += n["flops"]
            print_table(sorted(rows.values(), key=lambda r: (r["where"], r["op"])), ["op", "where", "nodes", "flops", "reason"],
                        title=f"placement on {s['device']}: {s['nodes_device']} device / {s['nodes_cpu']} CPU nodes, "
                              f"FLOPs {s['flops_device']:.3g} device / {s['flops_cpu']:.3g} CPU, "
                              f"est. device time {s['est_device_time_s'] * 1e6:.2f} us")
    if result.get("saved"):
        click.echo(f"outputs written to {result['saved']}")
