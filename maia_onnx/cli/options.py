"""Shared click options (decorators) so every verb spells common flags the same way."""

from __future__ import annotations

import click

from maia_onnx.errors import InvalidOptionError
from maia_onnx.report import dumps

json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report instead of tables.")


def output_option(required: bool = True, help: str = "Output path."):
    return click.option("-o", "--output", required=required, type=click.Path(dir_okay=True), help=help)


def model_argument(name: str = "model"):
    # existence is checked by maia_onnx.io so the message is ours, not click's
    return click.argument(name, type=click.Path())


external_data_option = click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Force weights into a side file (<out>.data) or inline; default: external above 2 GB.",
)

report_option = click.option("--report", "report_path", type=click.Path(), default=None, help="Write a JSON report here.")

device_option = click.option("--device", default="maia100", show_default=True, help="Device profile name or JSON file.")


def echo_json(data) -> None:
    click.echo(dumps(data))


def parse_dims(values, minimum: int = 0) -> dict[str, int]:
    """Symbolic dim sizes from ``--dim`` options: repeated ``NAME=N`` and/or comma lists ``a=1,b=2`` -> dict."""
    if isinstance(values, dict):
        return dict(values)
    if isinstance(values, str):
        values = (values,)
    dims: dict[str, int] = {}
    for group in values or ():
        for item in filter(None, (part.strip() for part in group.split(","))):
            name, sep, num = item.rpartition("=")
            if not sep or not name.strip() or not num.strip().isdigit() or int(num) < minimum:
                raise InvalidOptionError(
                    f"bad --dim {item!r}: write NAME=N (N >= {minimum}), e.g. --dim batch=1 --dim seq=16"
                )
            dims[name.strip()] = int(num)
    return dims


def dims_option(help: str = "Size of a symbolic input dim, NAME=N (repeatable, or comma-separated)."):
    return click.option("--dim", "--dims", "dims", multiple=True, metavar="NAME=N", help=help)


def split_names(text: str | None) -> list[str]:
    """A comma-separated option value (``--providers``, ``--cpu-ops``) -> list of names."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def launcher_options(func):
    """``run``'s options for partition directories: in-process or torchrun, single or multi-node."""
    options = [
        click.option("--launcher", type=click.Choice(["inprocess", "torchrun"]), default="inprocess", show_default=True,
                     help="Partition directories: run all ranks in this process, or one process per rank via torchrun."),
        click.option("--nproc-per-node", type=int, default=None,
                     help="torchrun: processes on this node (default: all ranks / --nnodes)."),
        click.option("--nnodes", default="1", show_default=True,
                     help="torchrun: number of nodes; start this command on each, with its own --node-rank."),
        click.option("--node-rank", type=int, default=None,
                     help="torchrun, several nodes: this node's rank, 0..nnodes-1 (node 0 writes outputs and timings)."),
        click.option("--master-addr", default=None,
                     help="torchrun, several nodes: host of node 0, where the rendezvous (c10d) runs."),
        click.option("--master-port", type=int, default=None, help="torchrun: rendezvous port on --master-addr (default 29400)."),
        click.option("--rdzv-endpoint", default=None, help="torchrun: HOST:PORT of the rendezvous (instead of --master-addr)."),
        click.option("--microbatches", type=int, default=1, show_default=True, help="Pipeline microbatches (first step)."),
        click.option("--decode-steps", type=int, default=0, show_default=True,
                     help="torchrun: greedy decode steps after the prefill, each stage keeping its KV cache."),
        click.option("--timeout", "dist_timeout", type=float, default=300.0, show_default=True,
                     help="torchrun: seconds any collective or pipeline receive may take."),
        click.option("--interconnect", default="loopback", show_default=True,
                     help="torchrun: link profile whose predicted collective time is reported beside the measured one."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
