"""Shared fixtures: tiny built-in models are exported once per test session and cached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def exported_models(tmp_path_factory):
    """name -> path of the exported ONNX model (built lazily, once per session)."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("exported")

    def get(name: str, **options) -> Path:
        key = name + "".join(f"-{k}{v}" for k, v in sorted(options.items()))
        if key not in cache:
            from maia_onnx.export import export_builtin

            out = root / f"{key}.onnx"
            export_builtin(name, out, **options)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def llama_tiny_onnx(exported_models) -> Path:
    return exported_models("llama-tiny")


@pytest.fixture(scope="session")
def unet_tiny_onnx(exported_models) -> Path:
    return exported_models("unet-tiny")


@pytest.fixture(scope="session")
def yolo_tiny_onnx(exported_models) -> Path:
    return exported_models("yolo-tiny")
