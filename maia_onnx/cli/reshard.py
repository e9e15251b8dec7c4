"""`maia-onnx reshard`: turn a partition directory into another TP/PP layout, or swap checkpoint weights into it."""

from __future__ import annotations

import click

from maia_onnx.cli.options import echo_json, json_option
from maia_onnx.partition import reshard_directory
from maia_onnx.report import human_bytes, print_table


@click.command("reshard")
@click.argument("partition_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output partition directory.")
@click.option("--tp", type=int, default=None, help="Tensor-parallel degree of the output (default: unchanged).")
@click.option("--pp", type=int, default=None, help="Pipeline stages of the output (default: unchanged).")
@click.option("--balance", type=click.Choice(["flops", "params", "memory"]), default=None,
              help="Stage balance objective (default: the input partition's).")
@click.option("--load-checkpoint", "load_ckpt", type=click.Path(), default=None,
              help="Swap in the weights of this checkpoint (written with --checkpoint for the input's layout).")
@click.option("--checkpoint", "save_ckpt", type=click.Path(), default=None,
              help="Also write the output's weights as safetensors (rank{r}_stage{s}.safetensors) into this directory.")
@click.option("--no-verify", is_flag=True,
              help="Skip the self-check of the new shards against the unsharded model rebuilt from the input; for "
                   "multi-GB models where one more forward pass costs too much.")
@json_option
def command(partition_dir, output, tp, pp, balance, load_ckpt, save_ckpt, no_verify, as_json):
    """Re-shard PARTITION_DIR (from its shards alone, no original model needed) into -o."""
    result = reshard_directory(partition_dir, output, tp=tp, pp=pp, balance=balance, load_checkpoint=load_ckpt,
                               save_checkpoint=save_ckpt, progress=True, verify=not no_verify)
    result["verified"] = result["verification"]["summary"]
    if as_json:
        echo_json(result)
        return
    print_stage_report(result)
    click.echo(f"verified: {result['verified']}")


def print_stage_report(result: dict) -> None:
    """Per-stage table (load, share, boundaries, weights) and the imbalance line."""
    rows = [dict(r, weight_bytes=human_bytes(r["weight_bytes"])) for r in result["stages"]]
    title = (
        f"{result['output']}: tp={result['tp']} pp={result['pp']} balance={result['balance']} "
        f"imbalance={result['imbalance_pct']:.1f}% collectives={result['collectives']}"
    )
    print_table(rows, ["stage", "nodes", "load", "share_pct", "inputs", "boundary_out", "weight_bytes"], title)
    if "checkpoint" in result:
        click.echo(f"checkpoint: {result['checkpoint']['files']} safetensors file(s) in {result['checkpoint']['dir']}")
