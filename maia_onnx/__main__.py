"""`python -m maia_onnx` runs the CLI."""

from maia_onnx.cli import entry

entry()
