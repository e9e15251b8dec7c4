"""UnpackWeightsPass and TP of packed-weight models: decode subgraphs become float initializers with the same
values bit for bit, so mx9 / mx6 / 4-bit models partition and their shards verify."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.inputs import make_inputs
from maia_onnx.ortutil import run_model
from maia_onnx.partition import partition_file
from maia_onnx.passes.packed_weights import PACKED_KEY
from maia_onnx.passes.unpack_weights import UnpackWeightsPass
from maia_onnx.quantize import quantize_model

FORMATS = ["mx9", "mx6", "mxfp4", "fp4-e4m3"]


@pytest.fixture(scope="module")
def packed(llama_tiny_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    out = {}
    for fmt in FORMATS:
        out[fmt] = root / f"{fmt}.onnx"
        quantize_model(llama_tiny_onnx, out[fmt], format=fmt, weights_only=True, evaluate=False, show_progress=False)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_unpacked_model_computes_the_same_bits(packed, fmt):
    model = ir.load(str(packed[fmt]))
    assert any(PACKED_KEY in v.metadata_props for v in model.graph.initializers.values())
    feeds = make_inputs(model, seed=3, dims={"batch": 2, "seq": 5, "past": 2})
    before = run_model(model, feeds)
    result = UnpackWeightsPass()(model)
    assert result.modified and len(result.weights) >= 7  # every linear of llama-tiny's layers
    assert result.unpacked_bytes > 3 * result.packed_bytes
    assert not any(PACKED_KEY in v.metadata_props for v in model.graph.initializers.values())
    after = run_model(model, feeds)
    for name, ref in before.items():
        assert np.array_equal(ref, after[name]), name


def test_pass_leaves_unpacked_models_alone(llama_tiny_onnx):
    model = ir.load(str(llama_tiny_onnx))
    assert not UnpackWeightsPass()(model).modified


@pytest.mark.parametrize("fmt", ["mx9", "mxfp4"])
def test_packed_models_partition_and_verify(packed, fmt, tmp_path):
    manifest = partition_file(packed[fmt], tmp_path / "tp2", tp=2)
    assert manifest.verification.verified is True
    assert manifest.collectives
    info = manifest.data["extra"]["unpacked_weights"]
    assert info["count"] >= 7 and info["unpacked_bytes"] > info["packed_bytes"]
