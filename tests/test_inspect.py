"""inspect: per-node FLOP formulas, parameter/op statistics and the CLI report, on small ONNX-text graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.cli import main
from maia_onnx.graph.costs import node_flops, node_flops_or_none
from maia_onnx.inspect import concretize, inspect_model
from maia_onnx.io import save_model


def _model(text: str) -> ir.Model:
    return ir.from_onnx_text(text)


def _node(model: ir.Model, op: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == op)


def test_matmul_flops_batched():
    m = _model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2,3,4] a, float[4,5] b) => (float[2,3,5] y) { y = MatMul(a, b) }
    """)
    assert node_flops(_node(m, "MatMul")) == 2 * (2 * 3) * 5 * 4


def test_gemm_flops_with_bias_and_trans_a():
    m = _model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[7,3] a, float[7,5] b, float[5] c) => (float[3,5] y) { y = Gemm <transA: int = 1> (a, b, c) }
    """)
    assert node_flops(_node(m, "Gemm")) == 2 * 3 * 5 * 7 + 3 * 5


def test_conv_flops_grouped_with_bias():
    # N=2, Cin=8, groups=2 -> Cin/groups=4, Cout=6, k=3x3, Hout=Wout=5
    m = _model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2,8,7,7] x, float[6,4,3,3] w, float[6] b) => (float[2,6,5,5] y) { y = Conv <group: int = 2> (x, w, b) }
    """)
    assert node_flops(_node(m, "Conv")) == 2 * 2 * 6 * 5 * 5 * 4 * 3 * 3 + 2 * 6 * 5 * 5


def test_elementwise_softmax_and_data_movement():
    m = _model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[4,6] x) => (float[6,4] t) {
            s = Softmax <axis: int = -1> (x)
            a = Add(s, x)
            t = Transpose <perm: ints = [1, 0]> (a)
        }
    """)
    assert node_flops(_node(m, "Softmax")) == 5 * 24
    assert node_flops_or_none(_node(m, "Add")) is None  # the text gives no shape for s or a
    concretize(m)
    assert node_flops(_node(m, "Add")) == 24
    assert node_flops(_node(m, "Transpose")) == 0


def test_unknown_shapes_give_none_and_zero():
    m = _model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N,4] a, float[4,5] b) => (float[N,5] y) { y = MatMul(a, b) }
    """)
    node = _node(m, "MatMul")
    assert node_flops_or_none(node) is None and node_flops(node) == 0
    assert concretize(m, {"N": 3}) == {"N": 3}
    assert node_flops(node) == 2 * 3 * 5 * 4


def _values(array: np.ndarray) -> str:
    return "{" + ", ".join(repr(float(v)) for v in array.ravel()) + "}"


_RNG = np.random.default_rng(0)
W1 = _RNG.standard_normal((8, 16)).astype(np.float32)
W2 = _RNG.standard_normal((16, 4)).astype(np.float16)

LINEAR_TEXT = f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[batch, seq, 8] x) => (float[batch, seq, 4] y)
    <float[8,16] w1 = {_values(W1)}, float[16,4] w2 = {_values(W2)}, int64[2] unused_shape = {{1, 2}}> {{
        h = MatMul(x, w1)
        r = Relu(h)
        rh = Cast <to: int = 10> (r)
        yh = MatMul(rh, w2)
        y = Cast <to: int = 1> (yh)
    }}
"""


@pytest.fixture
def linear_model_path(tmp_path):
    model = _model(LINEAR_TEXT)
    # the ONNX text parser takes float16 data only as raw bits, so store w2 as float16 here
    w2 = model.graph.initializers["w2"]
    w2.const_value = ir.Tensor(W2, name="w2")
    w2.dtype = ir.DataType.FLOAT16
    path = tmp_path / "linear.onnx"
    save_model(model, path)
    return path


def test_inspect_model_report(linear_model_path):
    info = inspect_model(linear_model_path, {"batch": 2, "seq": 3})
    assert info["opset"] == 21
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": ["batch", "seq", 8]}]
    assert info["outputs"][0]["shape"] == ["batch", "seq", 4]
    assert info["op_histogram"] == {"Cast": 2, "MatMul": 2, "Relu": 1}
    by_dtype = info["parameters"]["by_dtype"]
    assert by_dtype["float"] == {"count": 128, "bytes": 512, "tensors": 1}
    assert by_dtype["float16"] == {"count": 64, "bytes": 128, "tensors": 1}
    assert by_dtype["int64"]["bytes"] == 16
    assert info["parameters"]["count"] == 128 + 64 + 2
    tokens = 2 * 3
    assert info["flops"]["by_op"] == {"MatMul": 2 * tokens * 8 * 16 + 2 * tokens * 16 * 4, "Relu": tokens * 16}
    assert info["flops"]["total"] == sum(info["flops"]["by_op"].values())
    assert info["flops"]["unknown_shape_nodes"] == {}


def test_inspect_does_not_modify_the_file(linear_model_path):
    before = linear_model_path.read_bytes()
    inspect_model(linear_model_path, {"batch": 5})
    assert linear_model_path.read_bytes() == before


def test_llama_tiny_flops_match_analytic_count(llama_tiny_onnx):
    seq, batch = 8, 1
    info = inspect_model(llama_tiny_onnx, {"batch": batch, "seq": seq, "past": 0})
    hidden, inter, heads, kv, hd, vocab, layers = 64, 128, 4, 2, 16, 256, 2
    proj = hidden * heads * hd + 2 * hidden * kv * hd + heads * hd * hidden + 3 * hidden * inter
    linear = 2 * batch * seq * (layers * proj + hidden * vocab)
    attention = layers * 2 * (2 * batch * heads * seq * seq * hd)  # QK^T and PV
    assert info["flops"]["by_op"]["MatMul"] == linear + attention
    assert info["flops"]["unknown_shape_nodes"] == {}
    model = ir.load(llama_tiny_onnx)
    weights = [v for v in model.graph.initializers.values() if "." in v.name]  # named like torch parameters
    assert sum(v.const_value.size for v in weights) == vocab * hidden * 2 + layers * (proj + 2 * hidden) + hidden
    floats = sum(v.const_value.size for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT)
    assert info["parameters"]["by_dtype"]["float"]["count"] == floats
    assert json.loads(info["metadata"]["maia_onnx.config"])["num_layers"] == layers


def test_yolo_conv_flops_dominate(yolo_tiny_onnx):
    info = inspect_model(yolo_tiny_onnx)
    assert info["flops"]["dims"] == {"batch": 1}
    conv = info["flops"]["by_op"]["Conv"]
    # stem: 3->16, 3x3, stride 2 on 64x64 -> 32x32 output (+bias) is one term of the sum
    assert conv > 2 * 16 * 32 * 32 * 3 * 9
    assert conv / info["flops"]["total"] > 0.9


def test_cli_inspect_table_and_json(linear_model_path, capsys):
    assert main(["inspect", str(linear_model_path), "--dim", "batch=2", "--dim", "seq=3"]) == 0
    out = capsys.readouterr().out
    assert "opset 21" in out and "MatMul" in out and "float16" in out and "batch=2, seq=3" in out
    assert main(["inspect", str(linear_model_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["flops"]["dims"] == {"batch": 1, "seq": 1}
    assert data["op_histogram"]["MatMul"] == 2


def test_cli_inspect_missing_file(tmp_path, capsys):
    rc = main(["inspect", str(tmp_path / "nope.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: model file not found")
