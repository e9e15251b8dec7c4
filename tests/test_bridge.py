"""Tests for runtime/bridge.py: a compiled model in a plain onnxruntime.InferenceSession via Python custom ops."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from maia_onnx.errors import UnsupportedModelError
from maia_onnx.ortutil import make_inputs, run_model
from maia_onnx.runtime import session_options, to_ort_custom_op_model
from maia_onnx.runtime.compile import compile_model


@pytest.fixture()
def topk_model(make_topk_model):
    return make_topk_model("2", gather=True)


@pytest.mark.parametrize("embed", [True, False])
def test_plain_ort_session_runs_compiled_model_through_custom_ops(topk_model, tmp_path, embed):
    compiled = compile_model(topk_model, tmp_path / "ctx.onnx", embed=embed).path
    rewritten = to_ort_custom_op_model(compiled, tmp_path / "ortx.onnx")
    domains = {n.domain for n in rewritten.graph.node}
    assert "com.microsoft" not in domains and "ai.onnx.contrib" in domains
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32), "idx": np.array([1, 0], np.int64)}
    reference = run_model(ir.load(topk_model), feeds)
    for source in (rewritten.SerializeToString(), str(tmp_path / "ortx.onnx")):
        sess = ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])
        for out, got in zip(sess.get_outputs(), sess.run(None, feeds)):
            np.testing.assert_array_equal(got, reference[out.name], err_msg=out.name)


def test_bridge_on_llama_tiny_matches_plain(llama_tiny_onnx, tmp_path):
    compiled = compile_model(llama_tiny_onnx, tmp_path / "ctx.onnx", optimize=False).path  # bit-exact lowering
    sess = ort.InferenceSession(to_ort_custom_op_model(compiled).SerializeToString(), session_options(),
                                providers=["CPUExecutionProvider"])
    feeds = make_inputs(ir.load(llama_tiny_onnx), dims={"batch": 1, "seq": 4, "past": 2})
    reference = run_model(ir.load(llama_tiny_onnx), feeds)
    for out, got in zip(sess.get_outputs(), sess.run(None, feeds)):
        np.testing.assert_array_equal(got, reference[out.name], err_msg=out.name)


def test_uncompiled_model_is_refused(topk_model):
    with pytest.raises(UnsupportedModelError, match="no Maia EPContext nodes"):
        to_ort_custom_op_model(topk_model)
