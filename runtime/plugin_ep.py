"""The Maia plugin execution provider in ONNX Runtime: find and register runtime/ep/libmaia_ep.so, make sessions.

``register()`` loads the library with ``onnxruntime.register_execution_provider_library`` (once per process);
``get_ep_devices()`` then lists one ``MaiaExecutionProvider`` device per device profile (``maia.device`` in its
metadata). In a user's own ONNX Runtime code (README, "Maia in your ORT code")::

    ort.register_execution_provider_library("MaiaExecutionProvider", str(maia_onnx.runtime.library_path()))
    so.add_provider_for_devices([d for d in ort.get_ep_devices() if d.ep_metadata.get("maia.device") == "maia100"], {})
    sess = ort.InferenceSession("model_ctx.onnx", so)

Session options reach the EP lower-cased as ``ep.maiaexecutionprovider.<key>`` (``device``, ``cpu_ops``, ``dims``).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Iterable, Mapping

import onnxruntime as ort

from maia_onnx.errors import InvalidOptionError, ModelLoadError, UserError
from maia_onnx.ortutil import ort_run

EP_NAME = "MaiaExecutionProvider"
LIBRARY = Path(__file__).resolve().parent / "ep" / "libmaia_ep.so"
MIN_ORT = (1, 23)  # the first ONNX Runtime with the plugin-EP C API and its Python entry points
_LOCK = threading.Lock()


class PluginEpUnavailable(UserError):
    """The plugin EP cannot be used here (library not built, or ONNX Runtime older than 1.23)."""


def _ort_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", ort.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def unavailable_reason() -> str | None:
    """Why the plugin EP cannot be used in this environment, or None when it can."""
    version = _ort_version()
    if version < MIN_ORT:
        return f"onnxruntime {'.'.join(map(str, version))} has no plugin-EP API (needs >= 1.23)"
    if not LIBRARY.is_file():
        return f"{LIBRARY} is not built (reinstall maia-onnx: pip install -e .)"
    return None


def library_path() -> Path:
    """Where the plugin EP library lives (built by ``pip install``; see ``available()``)."""
    return LIBRARY


def available() -> bool:
    return unavailable_reason() is None


def register() -> Path:
    """Register the Maia plugin EP library with ONNX Runtime (idempotent); returns the library path."""
    reason = unavailable_reason()
    if reason:
        raise PluginEpUnavailable(f"MaiaExecutionProvider plugin unavailable: {reason}")
    with _LOCK:
        if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
            ort.register_execution_provider_library(EP_NAME, str(LIBRARY))
    return LIBRARY


def ep_devices(device: str | None = None) -> list:
    """The registered MaiaExecutionProvider devices (all, or the one whose profile is ``device``)."""
    register()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if device is None:
        return devices
    chosen = [d for d in devices if d.ep_metadata.get("maia.device") == device]
    if not chosen:
        known = ", ".join(d.ep_metadata.get("maia.device", "?") for d in devices)
        raise InvalidOptionError(f"unknown Maia device {device!r}: use one of {known} (or add a profile file)")
    return chosen


def session_options(device: str = "maia100", cpu_ops: Iterable[str] = (), base=None, dims: Mapping[str, int] | None = None):
    """SessionOptions with MaiaExecutionProvider for ``device`` added (ORT's CPU EP stays the fallback).

    ``dims`` sizes symbolic dims in the memory plans of programs the EP writes (ORT's compile API).
    """
    so = base if base is not None else ort.SessionOptions()
    options = {}  # the EP device already carries {"device": <profile>} as its default option
    ops = [op for op in cpu_ops if op]
    if ops:
        options["cpu_ops"] = ",".join(ops)
    if dims:
        options["dims"] = ",".join(f"{name}={int(size)}" for name, size in sorted(dims.items()))
    so.add_provider_for_devices(ep_devices(device), options)
    return so


def ep_error(exc: Exception) -> str:
    """The EP's one-line message inside an ONNX Runtime exception (ORT's status prefix removed)."""
    return _ORT_PREFIX.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class _BaseRun:
    """The session seen through ONNX Runtime's own ``run`` (what ``ort_run`` wraps)."""

    def __init__(self, session):
        self._session = session

    def run(self, *args):
        return ort.InferenceSession.run(self._session, *args)

    def get_outputs(self):
        return self._session.get_outputs()


class MaiaInferenceSession(ort.InferenceSession):
    """An ``onnxruntime.InferenceSession`` whose ``run`` also takes and returns bfloat16/float8 arrays (ml_dtypes),
    as the Python shim does (plain ORT wants those as OrtValues)."""

    def run(self, output_names, input_feed, run_options=None):
        if "_maia_base" not in self.__dict__:
            self._maia_base = _BaseRun(self)
        return ort_run(self._maia_base, output_names, input_feed, run_options)


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")


def plugin_session(path_or_bytes, sess_options=None, device: str = "maia100", cpu_ops: Iterable[str] = ()):
    """A plain ``onnxruntime.InferenceSession`` running Maia partitions in the plugin EP.

    Without ``sess_options`` the session runs unoptimized, like the Python shim (bit-identical outputs);
    the options object is consumed (ORT binds the EP to it). Errors the EP reports become one-line
    ModelLoadErrors.
    """
    from maia_onnx.ortutil import session_options as default_options

    so = session_options(device, cpu_ops, base=sess_options if sess_options is not None else default_options())
    source = str(path_or_bytes) if isinstance(path_or_bytes, (str, Path)) else bytes(path_or_bytes)
    try:
        return MaiaInferenceSession(source, so)
    except Exception as exc:  # ORT's own exception types: report the EP's message as a user error
        message = ep_error(exc)
        if "Maia" in message or "EPContext" in message:
            raise ModelLoadError(message) from None
        raise
