"""`maia-onnx partition`: split a model into tensor-parallel ranks x pipeline stages and print a summary."""

from __future__ import annotations

import click

from maia_onnx.cli.options import echo_json, json_option, model_argument
from maia_onnx.cli.reshard import print_stage_report
from maia_onnx.partition import partition_file, save_checkpoint, stage_report, summary_rows
from maia_onnx.passes.sharding_annotations import annotate_file
from maia_onnx.report import human_bytes, print_table


@click.command("partition")
@model_argument()
@click.option("-o", "--output", required=True, type=click.Path(), help="Partition directory to write (manifest.json + rank files).")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel degree (ranks per stage).")
@click.option("--ep", type=int, default=1, show_default=True,
              help="Expert parallelism for mixture-of-experts models: experts placed whole on the --tp ranks (must equal "
                   "--tp, or give --ep alone) instead of each expert split over them.")
@click.option("--pp", type=int, default=1, show_default=True, help="Pipeline-parallel degree (stages).")
@click.option("--balance", type=click.Choice(["flops", "params", "memory"]), default="flops", show_default=True,
              help="What pipeline stages are balanced on.")
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(), default=None,
              help="Also write every rank's weights as safetensors (rank{r}_stage{s}.safetensors) into this directory.")
@click.option("--no-verify", is_flag=True,
              help="Skip the self-check (the shards run against the unsharded model on random inputs before the "
                   "directory is written); for multi-GB models where one more forward pass costs too much.")
@click.option("--annotate-only", is_flag=True,
              help="Do not split: write the model to -o (an .onnx file) with IR v11 sharding annotations.")
@json_option
def command(model, output, tp, ep, pp, balance, checkpoint_dir, no_verify, annotate_only, as_json):
    """Split MODEL for tensor (--tp) and pipeline (--pp) parallelism into a partition directory."""
    if annotate_only:
        report = annotate_file(model, output, tp=tp, pp=pp, balance=balance)
        if as_json:
            echo_json(report)
        else:
            click.echo(f"wrote {output}: sharding annotations for tp={tp} pp={pp} (model not split)")
        return
    manifest = partition_file(model, output, tp=tp, pp=pp, balance=balance, progress=not as_json, verify=not no_verify,
                              ep=ep)
    verification = manifest.verification
    rows = summary_rows(manifest)
    stages = None
    if manifest.plan is not None and manifest.pp > 1:
        stages = stage_report(manifest, manifest.plan)
    checkpoint = None
    if checkpoint_dir:
        checkpoint = save_checkpoint(output, checkpoint_dir, progress=not as_json)
    if as_json:
        echo_json({"output": str(output), "mesh": manifest.data["mesh"], "ranks": rows, "stages": stages,
                   "expert_parallel": manifest.data.get("extra", {}).get("expert_parallel", 1),
                   "inputs": manifest.inputs, "outputs": manifest.outputs, "checkpoint": checkpoint,
                   "verified": verification.describe(), "verification": verification.as_dict()})
        return
    for r in rows:
        r["weights"] = human_bytes(r["weight_bytes"])
        r["share"] = f"{100 * r['weight_share']:.1f}%"
        r["coll_bytes/token"] = human_bytes(r["payload_bytes_per_token"])
        r["wire_bytes/token"] = human_bytes(r["wire_bytes_per_token"])
    print_table(rows, ["rank", "tp_rank", "stage", "file", "weights", "share", "collectives", "allreduce", "allgather",
                       "coll_bytes/token", "wire_bytes/token"],
                title=f"partition {output}: tp={manifest.tp} pp={manifest.pp}")
    if stages:
        click.echo()
        print_stage_report(stages)
    if checkpoint:
        click.echo(f"checkpoint: {len(checkpoint.get('files', {}))} safetensors file(s) in {checkpoint_dir}")
    click.echo(f"verified: {verification.describe()}")
