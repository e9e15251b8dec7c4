"""Bf16Pass: real bfloat16 weight storage, activations rounded to bfloat16, ORT numerics equal to NumPy emulation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.io import load_model, save_model
from maia_onnx.ortutil import run_model
from maia_onnx.passes.bf16 import Bf16Pass, Bf16PassResult, to_bfloat16

RTOL, ATOL = 1e-5, 1e-5

TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 16] x) => (float[N, 8] y) {
   h = MatMul(x, W1)
   n = Mul(h, gamma)
   r = Relu(n)
   y = Gemm <transB = 1> (r, W2, b)
}
"""


def _bf(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.fixture
def model_and_weights():
    rng = np.random.default_rng(0)
    w = {
        "W1": rng.standard_normal((16, 32)).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, 32).astype(np.float32),
        "W2": rng.standard_normal((8, 32)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
    }
    proto = onnx.parser.parse_model(TEXT)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in w.items())
    return ir.serde.deserialize_model(proto), w


def test_weights_stored_as_bf16_and_numerics_match(model_and_weights):
    model, w = model_and_weights
    result = Bf16Pass()(model)
    assert isinstance(result, Bf16PassResult) and result.modified
    inits = model.graph.initializers
    assert {k for k, v in inits.items() if v.const_value.dtype == ir.DataType.BFLOAT16} == {"W1_bf16", "gamma_bf16", "W2_bf16", "b_bf16"}
    assert inits["W1_bf16"].const_value.nbytes == 16 * 32 * 2
    assert sorted(result.converted_weights) == ["W1", "W2", "b", "gamma"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    h = _bf(x) @ _bf(w["W1"])
    r = np.maximum(h * _bf(w["gamma"]), 0)
    expect = _bf(r) @ _bf(w["W2"]).T + _bf(w["b"])
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], expect, rtol=RTOL, atol=ATOL)
    # and it really differs from FP32 (the rounding is applied, not skipped)
    fp32 = np.maximum((x @ w["W1"]) * w["gamma"], 0) @ w["W2"].T + w["b"]
    assert np.abs(run_model(model, {"x": x})["y"] - fp32).max() > 1e-4


def test_weights_only_and_exclude(model_and_weights):
    model, w = model_and_weights
    Bf16Pass(activations=False, exclude=["Gemm"])(model)
    assert "W2" in model.graph.initializers and "b" in model.graph.initializers  # used by the excluded Gemm
    assert not any(n.op_type == "Cast" and n.attributes["to"].value == ir.DataType.BFLOAT16 for n in model.graph)
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    expect = np.maximum((x @ _bf(w["W1"])) * _bf(w["gamma"]), 0) @ w["W2"].T + w["b"]
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], expect, rtol=RTOL, atol=ATOL)


def test_nodes_restricts_the_pass_to_named_nodes(model_and_weights):
    """Mixed precision keeps its chosen layers in BF16 with ``nodes``: only they (and weights only they read) change."""
    model, w = model_and_weights
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    gemm.name = "head"
    result = Bf16Pass(nodes=["head"])(model)
    assert sorted(result.converted_weights) == ["W2", "b"]
    assert {"W1", "gamma"} <= set(model.graph.initializers)
    x = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    expect = _bf(np.maximum((x @ w["W1"]) * w["gamma"], 0)) @ _bf(w["W2"]).T + _bf(w["b"])
    np.testing.assert_allclose(run_model(model, {"x": x})["y"], expect, rtol=RTOL, atol=ATOL)


def test_to_bfloat16_round_to_nearest_even_in_chunks():
    x = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, -0.0, np.inf], np.float32)
    got = to_bfloat16(x, chunk=2).astype(np.float32)
    np.testing.assert_array_equal(got[:2], [1.0, 1.0 + 2**-6])  # ties to even
    assert np.isinf(got[2]) or got[2] > 3e38
    assert np.signbit(got[3]) and np.isinf(got[4])


def test_external_weights_converted_lazily(tmp_path, model_and_weights):
    model, w = model_and_weights
    src = tmp_path / "m.onnx"
    save_model(model, src, external_data=True)
    lazy = load_model(src)
    Bf16Pass()(lazy)
    assert isinstance(lazy.graph.initializers["W1_bf16"].const_value, ir.LazyTensor)
    out = tmp_path / "o.onnx"
    save_model(lazy, out, external_data=True)
    back = load_model(out).graph.initializers["W1_bf16"].const_value.numpy()
    np.testing.assert_array_equal(back.astype(np.float32), _bf(w["W1"]))
