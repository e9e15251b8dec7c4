"""Where batch jobs run: ``local`` worker processes or ``ray`` tasks; each backend drives a BatchRunner."""

from __future__ import annotations

from maia_onnx.batch.backends.local import LocalBackend
from maia_onnx.batch.backends.ray import RayBackend
from maia_onnx.errors import UserError

BACKENDS = {"local": LocalBackend, "ray": RayBackend}


def make_backend(name: str, address: str | None = None):
    """The backend called ``name`` (``address``: the Ray cluster for ``ray``; None starts a local instance)."""
    if name == "local":
        return LocalBackend()
    if name == "ray":
        return RayBackend(address)
    raise UserError(f"unknown backend {name!r}: use {' or '.join(BACKENDS)}")
