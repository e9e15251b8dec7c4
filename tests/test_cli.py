"""CLI basics: help lists every verb; user errors are one line, non-zero, no traceback."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from maia_onnx.cli import VERBS, cli, main
from maia_onnx.errors import UserError


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "maia_onnx", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_help_lists_every_verb():
    rc, out, _ = run_cli("--help")
    assert rc == 0
    for verb in VERBS:
        assert verb in out


def test_user_error_is_one_line(monkeypatch, capsys):
    @click.command("boom")
    def boom():
        raise UserError("bad thing in x.onnx\nsecond line never shown")

    cli.add_command(boom)
    try:
        assert main(["boom"]) == 2
        err = capsys.readouterr().err
        assert err == "error: bad thing in x.onnx\n"
        with pytest.raises(UserError):
            main(["--debug", "boom"])
    finally:
        cli.commands.pop("boom")


def test_internal_error_is_one_line(capsys):
    @click.command("crash")
    def crash():
        raise ZeroDivisionError("division by zero")

    cli.add_command(crash)
    try:
        assert main(["crash"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1 and "--debug" in err
    finally:
        cli.commands.pop("crash")


def test_unknown_verb_exit_code():
    rc, _, err = run_cli("frobnicate")
    assert rc == 2 and "No such command" in err and "Traceback" not in err
