"""Tests for runtime/capability.py: per-node placement with reasons, and cycle-free maximal partitions."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.errors import InvalidOptionError
from maia_onnx.runtime.capability import CAPABILITY_TABLE, get_capability


def build(text: str, initializers: dict[str, np.ndarray] | None = None) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    for name, arr in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    return ir.from_proto(proto)


RNG = np.random.default_rng(0)
W = {"w": RNG.standard_normal((8, 8)).astype(np.float32), "k": np.array([2], np.int64)}


def by_name(placement):
    return {n.name: n for n in placement.nodes}


def test_unsupported_op_falls_back_with_reason():
    model = build("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,8] x) => (float[2,8] y, int64[2,2] i) {
      a = MatMul(x, w)
      v, i = TopK<axis=1>(a, k)
      y = Relu(a)
    }""", W)
    p = get_capability(model, "maia100")
    nodes = {n.op_type: n for n in p.nodes}
    assert nodes["TopK"].device == "cpu"
    assert nodes["TopK"].reason == "unsupported op TopK (not in the maia100 capability table)"
    assert nodes["MatMul"].device == "maia" and nodes["Relu"].device == "maia"
    assert len(p.partitions) == 1 and p.partitions[0].node_indices == [0, 2]
    s = p.summary()
    assert s["nodes_device"] == 2 and s["nodes_cpu"] == 1
    assert s["flops_device"] == 2 * 2 * 8 * 8 + 2 * 8  # MatMul 2*M*N*K + one op per Relu output
    assert s["fallback_reasons"] == {nodes["TopK"].reason: 1}
    # roofline: at least the time to move the partition's bytes at the profile's HBM bandwidth
    from maia_onnx.runtime.profiles import load_device

    bw = load_device("maia100").memory_bandwidth
    part = p.partitions[0]
    assert part.bytes == (2 * 8 + 8 * 8 + 2 * 8 + 2 * 8) * 4  # x, w in; a (to TopK), y out
    assert part.est_time_s == pytest.approx(max(part.bytes / bw, part.est_time_s))
    assert part.est_time_s >= part.bytes / bw


def test_dtype_dynamic_rank_attribute_and_control_flow_reasons():
    model = build("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (double[2,4] d, float x, float[1,1,4,4] img, bool c) => (double[2,4] y, float z, float[1,1,8,8] r, float[1] o) {
      y = Relu(d)
      z = Sigmoid(x)
      r = Resize<mode="cubic">(img, , scales)
      o = If(c) <then_branch = g1 () => (float[1] t) { t = Constant<value = float[1] {1.0}>() },
                 else_branch = g2 () => (float[1] e) { e = Constant<value = float[1] {2.0}>() }>
    }""", {"scales": np.array([1, 1, 2, 2], np.float32)})
    model.graph.inputs[1].shape = None  # unknown rank
    model.graph.node(1).outputs[0].shape = None
    nodes = {n.op_type: n for n in get_capability(model, "maia100").nodes}
    assert nodes["Relu"].reason.startswith("dtype fp64 unsupported for Relu") and nodes["Relu"].value == "d"
    assert nodes["Sigmoid"].reason.startswith("dynamic rank: tensor rank unknown") and nodes["Sigmoid"].value == "x"
    assert nodes["Resize"].reason == "attribute mode='cubic' unsupported (nearest, linear)"
    assert nodes["If"].reason == "control-flow op If (subgraphs run on the host)"
    assert all(n.device == "cpu" for n in nodes.values())


def test_fp8_precision_needs_a_device_format():
    # h100-sxm has an fp8 tensor format, and a made-up device without fp8 must refuse FP8 QDQ
    model = build("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,8] x) => (float[2,8] y) {
      wd = DequantizeLinear(wq, ws)
      y = MatMul(x, wd)
    }""", {"ws": np.array(0.5, np.float32)})
    q = ir.Tensor(np.ones((8, 8), np.float32).astype(ml_dtypes.float8_e4m3fn), name="wq")
    model.graph.initializers["wq"] = ir.Value(name="wq", const_value=q, type=ir.TensorType(ir.DataType.FLOAT8E4M3FN), shape=ir.Shape([8, 8]))
    model.graph.node(0).replace_input_with(0, model.graph.initializers["wq"])
    placement = get_capability(model, "maia100")
    assert [n.device for n in placement.nodes] == ["maia", "maia"]
    assert placement.nodes[1].compute_dtype == "fp8"
    from maia_onnx.runtime.profiles import load_device

    no_fp8 = load_device("maia100")
    no_fp8.peak_flops = {"bf16": 1e15}
    no_fp8.compute_dtype_map = {"fp32": "bf16"}
    placement = get_capability(model, no_fp8)
    assert placement.nodes[0].device == "cpu" and "no maia100 tensor format" in placement.nodes[0].reason


def test_partitions_never_form_a_cycle_through_cpu():
    # a -> TopK(cpu) -> c, and a -> c directly: a and c in one partition would need TopK inside it (cycle)
    model = build("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,8] x) => (float[2,2] y) {
      a = MatMul(x, w)
      v, i = TopK<axis=1>(a, k)
      b = Relu(a)
      s = Slice(b, st, en, ax)
      y = Add(v, s)
    }""", {**W, "st": np.array([0], np.int64), "en": np.array([2], np.int64), "ax": np.array([1], np.int64)})
    p = get_capability(model, "maia100")
    nodes = by_name(p)
    assert nodes["MatMul_0"].partition != nodes["Add_4"].partition
    assert nodes["MatMul_0"].partition == nodes["Relu_2"].partition == nodes["Slice_3"].partition
    # the quotient graph (partitions + CPU nodes) is acyclic: ir sorts it after compile
    from maia_onnx.runtime.compile import compile_model

    result = compile_model(model)
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("EPContext") == 2 and "TopK" in ops


def test_zero_compute_partition_stays_on_host_and_excluded_ops():
    model = build("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2,8] x) => (int64[2] s, float[2,8] y) {
      s = Shape(x)
      y = Relu(x)
    }""")
    nodes = {n.op_type: n for n in get_capability(model, "maia100").nodes}
    assert nodes["Shape"].device == "cpu" and "without compute" in nodes["Shape"].reason
    nodes = {n.op_type: n for n in get_capability(model, "maia100", excluded_ops=["Relu"]).nodes}
    assert nodes["Relu"].reason == "op Relu excluded by the user (--cpu-ops)"
    with pytest.raises(InvalidOptionError, match="Rleu"):
        get_capability(model, "maia100", excluded_ops=["Rleu"])


def test_table_covers_the_issue_op_families():
    for op in ("MatMul", "Gemm", "Conv", "Add", "LayerNormalization", "RMSNormalization", "Softmax", "Attention",
               "QuantizeLinear", "DequantizeLinear"):
        assert ("", op) in CAPABILITY_TABLE
    assert ("com.microsoft", "GroupQueryAttention") in CAPABILITY_TABLE
