"""Optional heavy extras (torch, transformers, diffusers, ultralytics): import one or fail with a one-line install hint."""

from __future__ import annotations

import importlib

from maia_onnx.errors import MissingExtraError

# module -> the maia-onnx extra that installs it
EXTRA_FOR = {"torch": "export", "transformers": "export", "diffusers": "diffusers", "ultralytics": "ultralytics",
             "matplotlib": "plot", "ray": "ray", "triton": "kernels"}


def require(module: str, extra: str | None = None, purpose: str = ""):
    """``import module`` or raise MissingExtraError: "<purpose> needs <module>: install maia-onnx[<extra>] ..."."""
    extra = extra or EXTRA_FOR.get(module, module)
    why = f"{purpose} needs" if purpose else "this needs"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        if missing.split(".")[0] != module.split(".")[0] and missing.split(".")[0] not in EXTRA_FOR:
            # the package is there but one of its own dependencies is not: say which
            raise MissingExtraError(purpose or module, extra,
                f"{why} {module}, whose dependency {missing!r} is not installed: install it (or reinstall maia-onnx[{extra}])"
            ) from exc
        raise MissingExtraError(purpose or module, extra,
            f"{why} {module}, which is not installed: install maia-onnx[{extra}] (pip install 'maia-onnx[{extra}]')"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a broken install (e.g. a package metadata lookup failing at import)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise MissingExtraError(purpose or module, extra,
            f"{why} {module}, which is installed but fails to import ({type(exc).__name__}: {first}): "
            f"reinstall maia-onnx[{extra}] and its dependencies"
        ) from exc
