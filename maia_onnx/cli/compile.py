"""`maia-onnx compile`: offline compile for Maia (device partitions -> com.microsoft EPContext nodes) with a placement report."""

from __future__ import annotations

import click

from maia_onnx.cli.options import device_option, dims_option, echo_json, parse_dims, external_data_option, json_option, model_argument, output_option, report_option


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _dims(values) -> dict[str, int]:
    return parse_dims(values)


@click.command("compile")
@model_argument()
@output_option(help="Compiled model path (.onnx).")
@device_option
@click.option("--embed/--no-embed", default=True, show_default=True,
              help="Embed the Maia programs in the EPContext nodes, or write them to <out>_maia.bin beside the model.")
@click.option("--cpu-ops", default="", help="Comma-separated op types to keep on the CPU.")
@click.option("--engine", type=click.Choice(["python", "ort"]), default="python", show_default=True,
              help="python: maia-onnx's compiler (host folding, fusions); ort: ONNX Runtime's ModelCompiler with the "
                   "Maia plugin EP (same program format, no fusions).")
@click.option("--no-optimize", is_flag=True,
              help="Skip host index folding and kernel fusion inside device partitions (compile the graph as it is).")
@click.option("--no-verify", is_flag=True,
              help="Skip the self-check (compiled model in the emulator vs the input model in ONNX Runtime).")
@dims_option("Symbolic dims for the estimates and memory plan, e.g. --dim batch=1 --dim seq=128.")
@external_data_option
@report_option
@json_option
def command(model, output, device, embed, cpu_ops, engine, no_optimize, no_verify, dims, external_data, report_path, as_json):
    """Compile MODEL for a Maia device: supported subgraphs become EPContext nodes, the rest stays on the CPU."""
    from maia_onnx.io import write_text_atomic
    from maia_onnx.report import dumps, print_table
    from maia_onnx.runtime.capability import partition_rows, placement_rows
    from maia_onnx.runtime.compile import compile_model
    from maia_onnx.runtime.fusions import fusion_rows

    result = compile_model(model, output, device=device, embed=embed, excluded_ops=_split(cpu_ops), dims=_dims(dims),
                           external_data=external_data, progress=not as_json, optimize=not no_optimize,
                           verify=not no_verify, engine=engine)
    report = {"summary": result.summary(), "fusions": result.fusions.to_dict(), "verification": result.verification,
              "placement": result.placement.to_dict()}
    if report_path:
        write_text_atomic(report_path, dumps(report))
    if as_json:
        echo_json(report)
        return
    print_table(placement_rows(result.placement), ["op", "where", "nodes", "flops", "reason"], title=f"placement on {result.placement.device}")
    click.echo()
    print_table(partition_rows(result.placement), ["partition", "nodes", "flops", "bytes", "est_time_us"], title="device partitions")
    rows = fusion_rows(result.fusions)
    if rows:
        click.echo()
        print_table(rows, ["rule", "op", "applied", "refused", "reason"], title="fusions")
    s = result.summary()
    checked = (f"verified (max rel {s['verify_max_rel']:.1e}); " if s["verified"] else
               f"NOT verified: {s['unverified_reason']}; " if s["unverified_reason"] else "")
    click.echo(f"\n{s['nodes_device']} nodes on {s['device']}, {s['nodes_cpu']} on CPU; {s['partitions']} partitions; "
               f"{s['fused_ops']} fused ops; {checked}"
               f"wrote {result.path}" + (f" and {result.side_file}" if result.side_file else ""))
