"""Accuracy report: SQNR / max error / clipping per layer and cosine / relative error / top-1 end to end."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.accuracy import AccuracyReport, LayerAccuracy, OutputAccuracy, evaluate_accuracy, format_report
from maia_onnx.passes.quantize_fp8 import LayerRecord, QuantizeFp8Pass

TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 4] x) => (float[N, 6] logits) {
   h = MatMul(x, W1)
   logits = MatMul(h, W2)
}
"""


def _model(w1, w2) -> ir.Model:
    proto = onnx.parser.parse_model(TEXT)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(w1, "W1"), onnx.numpy_helper.from_array(w2, "W2")])
    return ir.serde.deserialize_model(proto)


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((5, 6)).astype(np.float32)


def _batches(n=3, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 4)).astype(np.float32)} for _ in range(n)]


def test_identical_models_are_perfect(weights):
    ref = _model(*weights)
    same = _model(*weights)
    rec = LayerRecord(node="mm1", op_type="MatMul", outputs=["h"], activation_scales={"x": 1.0})
    report = evaluate_accuracy(ref, same, _batches(), [rec])
    assert isinstance(report, AccuracyReport) and isinstance(report.layers[0], LayerAccuracy)
    assert math.isinf(report.layers[0].sqnr_db) and report.layers[0].max_abs_err == 0
    out = report.outputs["logits"]
    assert isinstance(out, OutputAccuracy)
    assert out.cosine == pytest.approx(1.0) and out.rel_err == 0 and out.top1_agree == 1.0
    assert report.min_output_cosine == pytest.approx(1.0) and report.summary.samples_batches == 3
    # the JSON layout of quantize --report: these keys are read by scripts and batch
    data = report.to_dict()
    assert set(data) == {"layers", "outputs", "summary"}
    assert set(data["summary"]) == {"samples_batches", "min_output_cosine", "max_output_rel_err", "worst_layer_sqnr_db",
                                    "quantized_layers", "top1_agree"}
    assert set(data["layers"][0]) == {"layer", "node", "op", "output", "sqnr_db", "max_abs_err", "act_scale",
                                      "activation_scales", "weight", "weight_scale", "weight_scale_min",
                                      "weight_granularity", "weight_sqnr_db", "clipped"}
    assert data["outputs"]["logits"]["cosine"] == out.cosine


def test_metrics_match_numpy_for_a_known_perturbation(weights):
    w1, w2 = weights
    noise = np.random.default_rng(2).standard_normal(w2.shape).astype(np.float32) * 0.05
    ref, pert = _model(w1, w2), _model(w1, w2 + noise)
    batches = _batches()
    rec = LayerRecord(node="mm2", op_type="MatMul", outputs=["logits"], activation_scales={"h": 0.5 / 448})
    report = evaluate_accuracy(ref, pert, batches, [rec]).to_dict()
    r = np.concatenate([b["x"] @ w1 @ w2 for b in batches]).astype(np.float64)
    g = np.concatenate([b["x"] @ w1 @ (w2 + noise) for b in batches]).astype(np.float64)
    out = report["outputs"]["logits"]
    assert out["cosine"] == pytest.approx(float((r * g).sum() / np.linalg.norm(r) / np.linalg.norm(g)), rel=1e-6)
    assert out["rel_err"] == pytest.approx(float(np.linalg.norm(r - g) / np.linalg.norm(r)), rel=1e-5)
    assert out["max_abs_err"] == pytest.approx(float(np.abs(r - g).max()), rel=1e-5)
    assert out["top1_agree"] == pytest.approx(float(np.mean(r.argmax(-1) == g.argmax(-1))))
    layer = report["layers"][0]
    assert layer["sqnr_db"] == pytest.approx(10 * math.log10((r**2).sum() / ((r - g) ** 2).sum()), rel=1e-5)
    # clipped = share of |h| above scale * 448 = 0.5 on the reference activations
    h = np.concatenate([b["x"] @ w1 for b in batches])
    assert layer["clipped"] == pytest.approx(float(np.mean(np.abs(h) > 0.5)))
    assert 0 < layer["clipped"] < 1


def test_report_on_real_fp8_pass_and_table(weights):
    ref = _model(*weights)
    quant = _model(*weights)
    records = QuantizeFp8Pass(activation_scales={"x": 3 / 448, "h": 6 / 448})(quant).records
    typed = evaluate_accuracy(ref, quant, _batches(), records)
    report = typed.to_dict()
    assert [row["op"] for row in report["layers"]] == ["MatMul", "MatMul"]
    assert [row["output"] for row in report["layers"]] == ["h", "logits"]
    for row in report["layers"]:
        assert 15 < row["sqnr_db"] < 60 and row["weight_scale"] > 0 and row["act_scale"] > 0
    assert report["outputs"]["logits"]["cosine"] > 0.99
    assert report["summary"]["quantized_layers"] == 2 and report["summary"]["worst_layer_sqnr_db"] < 60
    text = format_report(typed)
    assert "sqnr_db" in text and "logits" in text and "top1_agree" in text
    assert "worst 1 by SQNR" in format_report(typed, max_layers=1)
