"""Conformance: compile + the Maia shim session against ONNX Runtime on ONNX's own backend test models and legacy forms.

The backend-model loop lives in ``scripts/conformance.py`` (which also writes docs/conformance.md); this test runs it
and fails on any wrong answer, crash, or FP8-quantised model outside the bound. The legacy-form tests build the old
encodings ONNX still allows (initializers listed as graph inputs, ConstantOfShape weights, opset 9) and require the
compiled model to match plain ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def _conformance_module():
    spec = importlib.util.spec_from_file_location("maia_conformance", ROOT / "scripts" / "conformance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_onnx_backend_models_compile_and_match_ort(capsys):
    conf = _conformance_module()
    results = conf.run_all(quantize=True)
    table = conf.counts(results)
    with capsys.disabled():
        print("\nconformance (pass / fallback / skip / wrong / error / quantized_ok / quantize_bad):")
        for kind, row in table.items():
            print(f"  {kind:18s} {row['pass']:3d} / {row['fallback']:3d} / {row['skip']:3d} / {row['wrong']} / "
                  f"{row['error']} / {row['quantized_ok']:3d} / {row['quantize_bad']}")
    failures = [f"{r.kind}/{r.name}: {r.status} {r.detail} {r.quant}" for r in results
                if r.status in ("wrong", "error") or r.quant.startswith(("bad", "error"))]
    assert not failures, "shim or quantizer wrong where ONNX Runtime passes:\n" + "\n".join(failures)
    ran = sum(row["pass"] + row["fallback"] for row in table.values())
    on_device = sum(row["pass"] for row in table.values())
    quantized = sum(row["quantized_ok"] for row in table.values())
    # 167 models ship in these sets (109 run in ORT here); if discovery or the loop broke, these counts would collapse
    assert ran >= 100, f"only {ran} backend models ran: discovery is broken"
    assert on_device >= 50, f"only {on_device} models put anything on the device"
    assert quantized >= 20, f"only {quantized} models were FP8-quantised and checked"


def _ort(model: onnx.ModelProto, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _shim(path: Path, out: Path, feeds):
    from maia_onnx.runtime import InferenceSession
    from maia_onnx.runtime.compile import compile_model

    result = compile_model(path, out)
    assert result.placement.partitions, "expected at least one device partition"
    return InferenceSession(str(out), providers=["MaiaExecutionProvider", "CPUExecutionProvider"]).run(None, feeds)


def _legacy_initializer_inputs(opset: int = 9, ir_version: int = 3) -> onnx.ModelProto:
    """IR 3 style: the weight W is both an initializer and a graph input (its default value)."""
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    b = np.linspace(-1, 1, 4, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "legacy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 4]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _constant_of_shape_weights() -> onnx.ModelProto:
    """Weights built in the graph: ConstantOfShape(shape) then scaled, as ONNX's 'light' models do."""
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["wshape"], ["ones"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
            helper.make_node("Mul", ["ones", "gain"], ["W"]),
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Tanh", ["h"], ["y"]),
        ], "cos",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(np.array([8, 4], np.int64), "wshape"),
         numpy_helper.from_array(np.linspace(0.1, 0.4, 4, dtype=np.float32), "gain")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _opset9_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], "op9",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    return model


@pytest.mark.parametrize("build,feeds", [
    (_legacy_initializer_inputs, {"x": np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)}),
    (_constant_of_shape_weights, {"x": np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)}),
    (_opset9_conv, {"x": np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)}),
], ids=["initializers-as-inputs", "constantofshape-weights", "opset9"])
def test_legacy_forms_compile_and_match_ort(build, feeds, tmp_path):
    model = build()
    onnx.checker.check_model(model)
    path = tmp_path / "legacy.onnx"
    onnx.save(model, path)
    want = _ort(model, feeds)
    got = _shim(path, tmp_path / "compiled.onnx", feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_legacy_initializer_input_can_still_be_overridden(tmp_path):
    """From IR 4 an initializer listed as a graph input is a default: feeding it must win, in the shim as in ORT."""
    model = _legacy_initializer_inputs(ir_version=4)
    path = tmp_path / "legacy.onnx"
    onnx.save(model, path)
    feeds = {"x": np.ones((2, 8), np.float32), "W": np.full((8, 4), 0.25, np.float32)}
    want = _ort(model, feeds)
    got = _shim(path, tmp_path / "compiled.onnx", feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    default = _shim(path, tmp_path / "compiled2.onnx", {"x": feeds["x"]})
    assert not np.allclose(default[0], got[0]), "the fed W was ignored"


def test_legacy_model_quantizes_within_fp8_bound(tmp_path):
    """IR 3 + opset 9 + initializer-inputs: FP8 weights load in ORT and stay within the E4M3 bound."""
    from maia_onnx.quantize import quantize_model

    model = _legacy_initializer_inputs()
    path = tmp_path / "legacy.onnx"
    onnx.save(model, path)
    quantize_model(str(path), str(tmp_path / "q.onnx"), format="fp8-e4m3", weights_only=True, evaluate=False,
                   show_progress=False)
    x = np.random.default_rng(5).standard_normal((2, 8)).astype(np.float32)
    want = _ort(model, {"x": x})[0]
    got = _ort(onnx.load(tmp_path / "q.onnx"), {"x": x})[0]
    # E4M3 rounding: each weight within 2^-4 relative; |y| errors accumulate over 8 products -> 1/16 of the L1 scale
    w = numpy_helper.to_array(model.graph.initializer[0])
    bound = np.abs(x) @ np.abs(w) / 16 + 1e-6
    assert np.all(np.abs(got - want) <= bound)


def test_fp8_static_model_matches_in_stock_ort_with_default_optimizations(tmp_path):
    from maia_onnx.quantize import quantize_model

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 1, 8)).astype(np.float32))
    quantize_model(str(tmp_path / "mlp.onnx"), str(tmp_path / "q.onnx"), calib=str(tmp_path / "calib.npz"),
                   evaluate=False, show_progress=False)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    exact = _ort(onnx.load(tmp_path / "q.onnx"), {"x": x})[0]  # ORT_DISABLE_ALL: the ONNX semantics
    stock = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(stock, exact, rtol=1e-5, atol=1e-5,
                               err_msg="stock ORT (default optimizations) disagrees with the ONNX semantics of the FP8 model")
