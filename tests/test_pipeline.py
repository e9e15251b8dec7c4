"""Pipeline: passes run in memory, are validated after each step, checked numerically and reported."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes
import pytest

from maia_onnx.errors import ValidationError
from maia_onnx.pipeline import Pipeline, model_summary

TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[3, 5] x) => (float[3, 5] y) <float two = {2.0}> {
    t = Mul(x, two)
    y = Relu(t)
}
"""


class MulTwoToAddPass(onnx_ir.passes.InPlacePass):
    """x * 2 -> x + x (exact in floating point)."""

    def call(self, model):
        modified = False
        for node in list(model.graph):
            if node.op_type == "Mul" and node.inputs[1].name == "two":
                x = node.inputs[0]
                add = ir.node("Add", [x, x], name="add")
                model.graph.insert_after(node, add)
                node.outputs[0].replace_all_uses_with(add.outputs[0])
                model.graph.remove(node, safe=True)
                modified = True
        return onnx_ir.passes.PassResult(model, modified)


class NegateOutputPass(onnx_ir.passes.InPlacePass):
    """Deliberately wrong numerics: y -> -y."""

    def call(self, model):
        out = model.graph.outputs[0]
        neg = ir.node("Neg", [out], name="neg")
        model.graph.append(neg)
        neg.outputs[0].name = "y_neg"
        neg.outputs[0].shape = out.shape
        neg.outputs[0].type = out.type
        model.graph.outputs[0] = neg.outputs[0]
        return onnx_ir.passes.PassResult(model, True)


class BreakGraphPass(onnx_ir.passes.InPlacePass):
    """Invalid model: an op that does not exist in the default domain."""

    def call(self, model):
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "NoSuchOp"
        return onnx_ir.passes.PassResult(model, True)


def feeds():
    return {"x": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)}


def test_pipeline_reports_and_checks():
    model = ir.from_onnx_text(TEXT)
    result = Pipeline([MulTwoToAddPass()], check_inputs=feeds(), min_cosine=0.9999)(model)
    assert result.modified
    (report,) = result.reports
    assert report.delta["ops"] == {"Mul": -1, "Add": 1}
    assert report.numeric["y"]["max_abs"] == 0.0
    assert model_summary(result.model)["ops"] == {"Add": 1, "Relu": 1}
    assert result.rows()[0]["ops_changed"] == "Add+1, Mul-1"


def test_pipeline_catches_numeric_drift():
    model = ir.from_onnx_text(TEXT)
    with pytest.raises(ValidationError, match="NegateOutputPass.*cosine"):
        Pipeline([NegateOutputPass()], check_inputs=feeds(), min_cosine=0.99)(model)


def test_pipeline_catches_invalid_model():
    model = ir.from_onnx_text(TEXT)
    with pytest.raises(ValidationError, match="after BreakGraphPass"):
        Pipeline([BreakGraphPass()])(model)
