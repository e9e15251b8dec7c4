"""Shared click options (decorators) so every verb spells common flags the same way."""

from __future__ import annotations

import click

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
    from maia_onnx.report import dumps

    click.echo(dumps(data))


def parse_dims(values, minimum: int = 0) -> dict[str, int]:
    """Symbolic dim sizes from ``--dim`` options: repeated ``NAME=N`` and/or comma lists ``a=1,b=2`` -> dict."""
    from maia_onnx.errors import InvalidOptionError

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
