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
