"""Tests for runtime/compile.py: EPContext nodes per ORT's schema, deterministic Maia programs, side files."""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.errors import ModelLoadError, UserError
from maia_onnx.io import sha256_file
from maia_onnx.ortutil import run_model
from maia_onnx.runtime.compile import PROVIDER, compile_model
from maia_onnx.runtime.emulator import MaiaProgram
from maia_onnx.runtime.session import InferenceSession

TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2,8] x) => (float[2,8] y, int64[2,2] i) {
  wd = DequantizeLinear<axis=1>(wq, ws)
  a = MatMul(x, wd)
  v, i = TopK<axis=1>(a, k)
  b = Relu(v)
  c = MatMul(b, w2)
  y = Softmax<axis=1>(c)
}
"""


@pytest.fixture()
def toy(tmp_path):
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(TEXT)
    wq = rng.standard_normal((8, 8)).astype(ml_dtypes.float8_e4m3fn)
    tensor = onnx.helper.make_tensor("wq", onnx.TensorProto.FLOAT8E4M3FN, [8, 8], wq.view(np.uint8).tobytes(), raw=True)
    proto.graph.initializer.extend([
        tensor,
        onnx.numpy_helper.from_array(np.full(8, 0.25, np.float32), "ws"),
        onnx.numpy_helper.from_array(np.array([2], np.int64), "k"),
        onnx.numpy_helper.from_array(rng.standard_normal((2, 8)).astype(np.float32), "w2"),
    ])
    path = tmp_path / "toy.onnx"
    onnx.save(proto, path)
    return path


def test_epcontext_attributes_match_ort_schema(toy, tmp_path):
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    schema = next(s for s in C.get_all_operator_schema() if s.name == "EPContext" and s.domain == "com.microsoft")
    ort_types = {name: attr.type.name for name, attr in schema.attributes.items()}  # INT / STRING
    out = compile_model(toy, tmp_path / "ctx.onnx").path
    proto = onnx.load(out)
    contexts = [n for n in proto.graph.node if n.op_type == "EPContext"]
    assert len(contexts) == 2 and all(n.domain == "com.microsoft" for n in contexts)
    type_names = {onnx.AttributeProto.INT: "INT", onnx.AttributeProto.STRING: "STRING"}
    for node in contexts:
        attrs = {a.name: a for a in node.attribute}
        assert {"source", "main_context", "embed_mode", "ep_cache_context", "ep_sdk_version", "partition_name",
                "hardware_architecture", "onnx_model_filename"} <= set(attrs)
        for name, attr in attrs.items():
            assert name in ort_types, name
            assert type_names[attr.type] == ort_types[name], name
        assert attrs["source"].s.decode() == PROVIDER
        assert attrs["embed_mode"].i == 1 and attrs["main_context"].i == 1
        assert attrs["hardware_architecture"].s == b"maia100" and attrs["onnx_model_filename"].s == b"toy.onnx"
        assert attrs["ep_cache_context"].s.startswith(b"MAIAPRG1")
    assert {o.domain: o.version for o in proto.opset_import}["com.microsoft"] == 1
    # CPU nodes stay plain ONNX, and ORT itself knows the EPContext schema (it refuses only the unknown source)
    assert [n.op_type for n in proto.graph.node if n.domain != "com.microsoft"] == ["TopK"]
    onnx.checker.check_model(proto)


def test_program_packs_fp8_weights_as_bytes_and_plans_memory(toy):
    result = compile_model(toy)
    first = MaiaProgram.from_buffer(result.programs["maia_partition_0"])
    weights = {w["name"]: w for w in first.header["weights"]}
    assert weights["wq"]["format"] == "fp8-e4m3fn" and weights["wq"]["length"] == 64  # 8x8 at one byte each
    assert weights["ws"]["format"] == "fp32"
    stored = first.weight(weights["wq"])
    assert stored.dtype == ml_dtypes.float8_e4m3fn
    src = onnx.numpy_helper.to_array(next(t for t in onnx.load(toy).graph.initializer if t.name == "wq"))
    np.testing.assert_array_equal(stored.view(np.uint8), src.view(np.uint8))
    plan = first.header["plan"]
    assert plan["schedule"] == ["DequantizeLinear_0", "MatMul_1"]
    bufs = {b["value"]: b for b in plan["memory"]["buffers"]}
    assert bufs["wd"]["bytes"] == 256 and bufs["a"]["bytes"] == 64
    # wd dies at MatMul (step 1) but a is born there: they must not overlap
    assert bufs["a"]["offset"] >= bufs["wd"]["offset"] + bufs["wd"]["bytes"] or bufs["a"]["offset"] + 64 <= bufs["wd"]["offset"]
    assert plan["memory"]["arena_bytes"] == 320


def test_compile_is_deterministic_and_keeps_input(toy, tmp_path):
    before = sha256_file(toy)
    a = compile_model(toy, tmp_path / "a.onnx").path
    b = compile_model(toy, tmp_path / "b.onnx").path
    assert sha256_file(toy) == before
    assert onnx.load(a).SerializeToString() == onnx.load(b).SerializeToString()
    c = compile_model(toy, tmp_path / "c.onnx", embed=False)
    d = compile_model(toy, tmp_path / "d.onnx", embed=False)
    assert c.side_file.read_bytes() == d.side_file.read_bytes()
    with pytest.raises(UserError, match="already contains EPContext"):
        compile_model(a, tmp_path / "again.onnx")
    with pytest.raises(UserError, match="is the input path"):
        compile_model(toy, toy)


def test_side_file_model_moves_with_its_side_file(toy, tmp_path):
    (tmp_path / "out").mkdir()
    result = compile_model(toy, tmp_path / "out" / "m.onnx", embed=False)
    assert result.side_file.name == "m_maia.bin"
    proto = onnx.load(result.path)
    contexts = [n for n in proto.graph.node if n.op_type == "EPContext"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in contexts]
    assert [a["embed_mode"] for a in attrs] == [0, 0]
    assert [a["main_context"] for a in attrs] == [1, 0]
    assert all(a["ep_cache_context"] == b"m_maia.bin" for a in attrs)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(result.path, moved / "m.onnx")
    shutil.move(result.side_file, moved / "m_maia.bin")
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    reference = run_model(ir.load(toy), feeds)
    sess = InferenceSession(moved / "m.onnx")
    for out, got in zip(sess.get_outputs(), sess.run(None, feeds)):
        np.testing.assert_array_equal(got, reference[out.name])
    (moved / "m_maia.bin").unlink()
    with pytest.raises(ModelLoadError, match="side file m_maia.bin .* not found"):
        InferenceSession(moved / "m.onnx")
