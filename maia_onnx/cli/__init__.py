"""The `maia-onnx` command: a click group that loads each verb lazily and turns errors into one line."""

from __future__ import annotations

import importlib
import sys

import click

from maia_onnx.errors import MaiaOnnxError

# verb -> module in maia_onnx.cli holding a click command named `command`
VERBS = {
    "export": "export",
    "inspect": "inspect",
    "quantize": "quantize",
    "partition": "partition",
    "reshard": "reshard",
    "compile": "compile",
    "run": "run",
    "analyze": "analyze",
    "eval": "eval",
    "batch": "batch",
}

_HELP = {
    "export": "PyTorch model (built-in, module:factory, hf:DIR) -> ONNX, parity-checked.",
    "inspect": "Opset, inputs/outputs, op histogram, parameters and FLOPs of a model.",
    "quantize": "FP8 / MX / BF16 quantization with calibration and an accuracy report.",
    "partition": "Split a model for tensor (TP) and pipeline (PP) parallelism.",
    "reshard": "Turn an existing partition into another TP/PP layout.",
    "compile": "Offline compile for Maia: device subgraphs -> EPContext nodes.",
    "run": "Run a model, compiled model or partition directory and report.",
    "analyze": "Roofline and interconnect what-if for TP/PP configurations.",
    "eval": "Task metrics of a model vs its reference on real data (perplexity, embeddings, outputs).",
    "batch": "Run a job file of conversions in parallel, resumable, locally or on Ray.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(VERBS) + sorted(set(self.commands) - set(VERBS))

    def get_command(self, ctx, name):
        if name in self.commands:
            return self.commands[name]
        if name not in VERBS:
            return None
        try:
            module = importlib.import_module(f"maia_onnx.cli.{VERBS[name]}")
        except ModuleNotFoundError as exc:
            if exc.name == f"maia_onnx.cli.{VERBS[name]}":
                return _unavailable(name)
            raise
        return module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, _HELP[name]) for name in VERBS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name):
    @click.command(name, help=_HELP[name], context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def cmd(args):
        raise MaiaOnnxError(f"'{name}' is not available in this build")

    return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, envvar="MAIA_ONNX_DEBUG", help="Show full tracebacks on errors.")
@click.version_option(package_name="maia-onnx")
@click.pass_context
def cli(ctx, debug):
    """maia-onnx: bring PyTorch models up on Maia through ONNX."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def main(argv=None) -> int:
    """Console entry point: one clear line and a non-zero exit code for every failure."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="maia-onnx", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        # click turns Ctrl-C into Abort; outputs are written atomically, so nothing partial is left
        click.echo("error: interrupted (no output was written)", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except MaiaOnnxError as exc:
        if debug:
            raise
        click.echo(f"error: {_first_line(str(exc))}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted (no output was written)", err=True)
        return 130
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            raise
        click.echo(
            f"error: internal error {type(exc).__name__}: {_first_line(str(exc))} (re-run with --debug for the traceback)",
            err=True,
        )
        return 1
    return 0


def entry() -> None:
    sys.exit(main())
