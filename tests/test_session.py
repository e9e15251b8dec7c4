"""Tests for runtime/session.py + emulator.py: compiled == plain ONNX Runtime (bit-exact), FP8 device numerics."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from maia_onnx.errors import InvalidOptionError
from maia_onnx.ortutil import make_inputs, run_model
from maia_onnx.runtime import EmulatorSession, InferenceSession
from maia_onnx.runtime.compile import compile_model

MAIA = ["MaiaExecutionProvider", "CPUExecutionProvider"]
DIMS = {"batch": 2, "seq": 5, "past": 3}


def assert_same_as_plain(plain_path, compiled_path, dims=DIMS):
    feeds = make_inputs(ir.load(plain_path), seed=3, dims=dims)
    reference = run_model(ir.load(plain_path), feeds)
    sess = EmulatorSession(compiled_path, providers=MAIA)  # the Python shim (tests/test_plugin_ep.py: the plugin EP)
    assert sess.get_providers() == MAIA
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert set(got) == set(reference)
    for name, ref in reference.items():
        assert got[name].dtype == ref.dtype and got[name].shape == ref.shape
        np.testing.assert_array_equal(got[name], ref, err_msg=name)  # bit-exact
    return sess


@pytest.mark.parametrize("family", ["llama_tiny_onnx", "unet_tiny_onnx", "yolo_tiny_onnx"])
def test_builtin_families_compiled_equal_plain_bitwise(family, request, tmp_path):
    path = request.getfixturevalue(family)
    compiled = compile_model(path, tmp_path / "ctx.onnx", optimize=False)  # fusions: tests/test_compile_quality.py
    assert compiled.placement.summary()["nodes_device"] > 0
    sess = assert_same_as_plain(path, compiled.path)
    assert any(s.kind == "maia" for s in sess.stages)


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "mxfp8-e4m3"])
def test_quantized_llama_tiny_matches_plain(fmt, llama_tiny_onnx, tmp_path):
    import warnings

    from maia_onnx.ortutil import compare
    from maia_onnx.quantize import quantize_model

    quantized = tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random calibration data is fine for a numerics test
        quantize_model(llama_tiny_onnx, quantized, format=fmt, show_progress=False, evaluate=False)
    compiled = compile_model(quantized, tmp_path / "q_ctx.onnx")
    assert compiled.placement.summary()["nodes_cpu"] == 0
    sess = assert_same_as_plain(quantized, compiled.path)  # bit-exact with plain ORT on the quantized model
    # decode shape too: single-token MatMuls take other kernel paths (weights must not look constant to them)
    assert_same_as_plain(quantized, compiled.path, dims={"batch": 1, "seq": 1, "past": 9})
    # and within FP8 tolerance of the FP32 model
    feeds = make_inputs(ir.load(llama_tiny_onnx), seed=3, dims=DIMS)
    fp32 = run_model(ir.load(llama_tiny_onnx), feeds)["logits"]
    got = sess.run(["logits"], feeds)[0]
    assert compare(fp32, got)["cosine"] > 0.99
    # FP8 weights are dequantized once at load (formats reference), not per run; activations keep their QDQ
    partition = next(s for s in sess.stages if s.kind == "maia")
    weight_dq = [n for n in ir.load(quantized).graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    assert len(weight_dq) >= 14
    assert partition.op_types.count("DequantizeLinear") == partition.op_types.count("QuantizeLinear") > 0
    formats = {w["format"] for w in partition.program.header["weights"]}
    assert ("e8m0" in formats and "mx-elements-fp8-e4m3fn" in formats) if fmt.startswith("mx") else "fp8-e4m3fn" in formats


def test_unsupported_op_runs_on_cpu_and_report_says_why(make_topk_model):
    path = make_topk_model("2")
    sess = assert_same_as_plain(path, path)  # plain model + Maia provider: compiled in memory
    assert [s.kind for s in sess.stages] == ["maia", "cpu", "maia"]
    topk = next(n for n in sess.placement.nodes if n.op_type == "TopK")
    assert topk.device == "cpu" and topk.reason == "unsupported op TopK (not in the maia100 capability table)"
    from maia_onnx.runtime.session import placement_report

    report = placement_report(path)
    assert report["summary"]["fallback_reasons"] == {topk.reason: 1}
    assert report["summary"]["partitions"] == 2 and report["summary"]["est_device_time_s"] > 0


def test_activation_quantize_uses_device_rounding_and_saturation(tmp_path):
    # QuantizeLinear(FP8, saturate) in the emulator == the formats reference: RNE, saturate to +-448, NaN stays NaN
    proto = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[64] x) => (float[64] y) {
      q = QuantizeLinear(x, s, z)
      y = DequantizeLinear(q, s, z)
    }""")
    zero = onnx.helper.make_tensor("z", onnx.TensorProto.FLOAT8E4M3FN, [], [0])
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.5, np.float32), "s"), zero])
    path = tmp_path / "qdq.onnx"
    onnx.save(proto, path)
    compiled = compile_model(path, tmp_path / "qdq_ctx.onnx").path
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32) * 100
    x[:4] = [1e6, -1e6, np.nan, 0.5 * 448 * 1.03]
    got = InferenceSession(compiled).run(None, {"x": x})[0]
    from maia_onnx.formats.fp8 import dequantize_fp8, quantize_fp8

    expected = dequantize_fp8(quantize_fp8(x, np.float32(0.5), fmt="e4m3fn"), np.float32(0.5))
    np.testing.assert_array_equal(got, expected)
    assert got[0] == 224.0 and got[1] == -224.0 and np.isnan(got[2])


def test_session_api_and_provider_rules(tmp_path, llama_tiny_onnx):
    compiled = compile_model(llama_tiny_onnx, tmp_path / "ctx.onnx").path
    sess = InferenceSession(compiled)
    plain = ort.InferenceSession(str(llama_tiny_onnx), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [(i.name, i.type) for i in plain.get_inputs()]
    assert [(o.name, o.type) for o in sess.get_outputs()] == [(o.name, o.type) for o in plain.get_outputs()]
    feeds = make_inputs(ir.load(llama_tiny_onnx), dims=DIMS)
    ro = ort.RunOptions()
    ro.log_severity_level = 3
    logits = sess.run(["logits"], feeds, ro)
    assert len(logits) == 1 and logits[0].shape == (2, 5, 256)
    with pytest.raises(InvalidOptionError, match="include MaiaExecutionProvider"):
        InferenceSession(compiled, providers=["CPUExecutionProvider"])
    with pytest.raises(InvalidOptionError, match="unknown provider"):
        InferenceSession(compiled, providers=["CUDAExecutionProvider"])
    cpu_only = InferenceSession(llama_tiny_onnx, providers=["CPUExecutionProvider"])
    assert cpu_only.get_providers() == ["CPUExecutionProvider"] and cpu_only.stages == []
    with pytest.raises(ValueError, match="missing from input feed"):
        sess.run(None, {"input_ids": feeds["input_ids"]})


def test_plain_ort_refuses_compiled_model(tmp_path, llama_tiny_onnx):
    # the compiled file is a genuine EPContext model: plain ORT has no provider claiming source=MaiaExecutionProvider
    compiled = compile_model(llama_tiny_onnx, tmp_path / "ctx.onnx").path
    with pytest.raises(Exception, match="EPContext|MaiaExecutionProvider|not.*implemented|NOT_IMPLEMENTED"):
        ort.InferenceSession(str(compiled), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fmt", ["mx9", "mx6"])
def test_maia100_native_formats_run_whole_on_device(fmt, llama_tiny_onnx, tmp_path):
    # mx9/mx6 activation rounding (the maia.MxFakeQuant function) is device work: one partition, no CPU fallback
    import warnings

    from maia_onnx.quantize import quantize_model

    quantized = tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(llama_tiny_onnx, quantized, format=fmt, show_progress=False, evaluate=False)
    assert any(n.op_type == "MxFakeQuant" for n in ir.load(quantized).graph)
    compiled = compile_model(quantized, tmp_path / "q_ctx.onnx")
    summary = compiled.placement.summary()
    assert summary["nodes_cpu"] == 0 and len(compiled.programs) == 1
    assert_same_as_plain(quantized, compiled.path)
