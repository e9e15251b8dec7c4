"""Session fixtures over maia_onnx.models.zoo's tiny seeded checkpoints (HF decoders incl. MoE, encoders, ViT, T5,
Whisper, diffusers UNet/VAE/pipeline): each written once per test session and exported once per session.

conftest.py imports the two session fixtures (``zoo_dir``, ``zoo_export``) so any test (export parity here; TP,
compile and quantize matrices elsewhere) can reuse the same checkpoints and ONNX files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from maia_onnx.models.zoo import CHECKPOINTS, MULTI_GRAPH, write_checkpoint


def extra_missing(module: str | None) -> str | None:
    """The skip reason when the optional extra ``module`` is not installed (or cannot be imported), else None."""
    if module is None:
        return None
    if importlib.util.find_spec(module) is None:
        return f"optional extra not installed: pip install 'maia-onnx[{module}]'"
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - e.g. ultralytics without torchvision: the reason is the skip message
        return f"{module} is installed but cannot be imported here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return None


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """name -> directory of the tiny seeded checkpoint (written on first use, once per session)."""
    root = tmp_path_factory.mktemp("zoo")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            _, extra = CHECKPOINTS[name]
            reason = extra_missing("transformers") or extra_missing(extra)
            if reason:
                pytest.skip(reason)
            cache[name] = write_checkpoint(name, root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_export(zoo_dir, tmp_path_factory):
    """name -> ExportResult of ``maia-onnx export hf:<checkpoint>`` (parity-checked; exported once per session)."""
    root = tmp_path_factory.mktemp("zoo_onnx")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            from maia_onnx.export import export_model

            directory = zoo_dir(name)
            out = root / name if name in MULTI_GRAPH else root / f"{name}.onnx"
            cache[name] = export_model(f"hf:{directory}", out)
        return cache[name]

    return get
