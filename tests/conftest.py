"""Shared fixtures: tiny built-in models are exported once per test session and cached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from zoo import zoo_dir, zoo_export  # noqa: F401  (session fixtures: tiny model-zoo checkpoints and their exports)

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


@pytest.fixture()
def make_topk_model(tmp_path):
    """MatMul -> TopK -> Softmax (+ optional Gather): a model with an op Maia does not run (TopK falls back to CPU)."""
    import numpy as np
    import onnx

    def make(batch: str = "batch", gather: bool = False) -> Path:
        outputs = f"float[{batch},3] y, int64[{batch},3] i, float[2,8] g" if gather else f"float[{batch},3] y"
        inputs = f"float[{batch},8] x, int64[2] idx" if gather else f"float[{batch},8] x"
        proto = onnx.parser.parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g ({inputs}) => ({outputs}) {{
          a = MatMul(x, w)
          v, i = TopK<axis=1>(a, k)
          y = Softmax<axis=1>(v)
          {"g = Gather<axis=0>(a, idx)" if gather else ""}
        }}""")
        rng = np.random.default_rng(0)
        proto.graph.initializer.extend([onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
                                        onnx.numpy_helper.from_array(np.array([3], np.int64), "k")])
        path = tmp_path / "topk.onnx"
        onnx.save(proto, path)
        return path

    return make
