"""Segment-by-segment runs (maia_onnx.segments): the values equal one whole-model run, segments stay under their
budgets, cuts fall where the fewest activations cross, unneeded nodes never run, and GPTQ does not depend on the cut."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import maia_onnx.passes.gptq as gptq_module
from maia_onnx.calib import run_with_intermediates
from maia_onnx.data import Feeds
from maia_onnx.errors import UserError
from maia_onnx.passes.gptq import GptqPass
from maia_onnx.segments import plan_segments, run_segments

# two residual "layers" (4 weights of 32x32 floats = 4 KiB each) and a head; ``m`` is made by an If whose branches
# read outer-scope values; ``unused`` feeds only ``side``, which nothing wanted needs
TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[B,S,32] x, bool flag) => (float[B,S,16] logits, float[B,S,32] side) {
  a0 = MatMul (x, w0)
  r0 = Relu (a0)
  b0 = MatMul (r0, w1)
  h1 = Add (x, b0)
  a1 = MatMul (h1, w2)
  r1 = Relu (a1)
  b1 = MatMul (r1, w3)
  h2 = Add (h1, b1)
  m = If (flag) <then_branch = t () => (float[B,S,32] o) { o = Mul (h2, two) },
                 else_branch = e () => (float[B,S,32] o) { o = Identity (h2) }>
  logits = MatMul (m, head)
  side = MatMul (x, unused)
}
"""
WANTED = ["x", "r0", "h1", "r1", "m"]


def make_model() -> ir.Model:
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(TEXT)
    weights = {f"w{i}": rng.standard_normal((32, 32)).astype(np.float32) * 0.2 for i in range(4)}
    weights.update(head=rng.standard_normal((32, 16)).astype(np.float32), unused=np.eye(32, dtype=np.float32),
                   two=np.array(2.0, np.float32))
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, n) for n, a in weights.items())
    return ir.from_proto(proto)


def batches(n=3):
    rng = np.random.default_rng(1)
    return [Feeds({"x": rng.standard_normal((2, 5, 32)).astype(np.float32), "flag": np.array(i % 2 == 0)},
                  np.ones((2, 5), bool)) for i in range(n)]


def whole_run(model, names):
    out = {}
    run_with_intermediates(model, names, batches(), lambda b, values: out.update({(b, n): values[n] for n in names}))
    return out


@pytest.mark.parametrize("budget", [1, 5000, 9000, 1 << 30])
def test_segments_give_the_whole_models_values(budget):
    model = make_model()
    want = whole_run(model, WANTED)
    got, done = {}, []
    n, segments = run_segments(model, WANTED, batches(), lambda b, values, valid: got.update(
        {(b, k): v for k, v in values.items()}), done.append, max_weight_bytes=budget)
    assert n == 3 and done == segments
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
    # every wanted value is reported by exactly one segment, after which it is complete
    assert sorted(w for s in segments for w in s.wanted) == sorted(WANTED)
    for s in segments:
        assert s.weight_bytes <= max(budget, 4096)  # a single 4 KiB weight over a budget gets a segment of its own


def test_cuts_fall_between_layers_and_unneeded_nodes_never_run():
    proto = ir.to_proto(make_model())
    names = [n.output[0] for n in proto.graph.node]
    segments = plan_segments(proto, WANTED, max_weight_bytes=9000)  # two 4 KiB weights per segment
    ran = [[names[i] for i in s.nodes] for s in segments]
    # the cut after the residual Add, where only h1 (and the If's flag) cross; not inside the second layer
    assert ran == [["a0", "r0", "b0", "h1"], ["a1", "r1", "b1", "h2", "m"]]
    assert segments[1].inputs == ["h1", "flag"] and segments[0].keep == ["h1"]
    assert all("logits" not in r and "side" not in r for r in ran)  # nothing wanted depends on them


def test_budget_on_wanted_costs_cuts_too():
    proto = ir.to_proto(make_model())
    segments = plan_segments(proto, WANTED, max_weight_bytes=1 << 30, cost=dict.fromkeys(WANTED, 10), max_cost=20)
    assert [len(s.wanted) for s in segments] == [2, 2, 1]


def test_a_value_nothing_makes_is_refused():
    with pytest.raises(UserError, match="no node or graph input makes 'nope'"):
        plan_segments(ir.to_proto(make_model()), ["nope"])


def test_gptq_does_not_depend_on_the_cut(monkeypatch):
    def run(**options):
        model = make_model()
        result = GptqPass("mxfp4", lambda m: iter(batches()), **options)(model)
        return result, {n: v.const_value.numpy() for n, v in result.model.graph.initializers.items()}

    whole, a = run()
    monkeypatch.setattr(gptq_module, "ROW_CHUNK_ELEMENTS", 64)  # two output rows at a time
    cut, b = run(max_segment_bytes=1, max_hessian_bytes=1)
    assert whole.segments == 1 and cut.segments == 9  # 1-byte budgets: every needed node runs alone
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert [r.gptq_error for r in whole.gptq] == pytest.approx([r.gptq_error for r in cut.gptq], rel=1e-5)


def test_only_graph_inputs_wanted_gives_one_empty_segment():
    got = {}
    n, segments = run_segments(make_model(), ["x"], batches(), lambda b, values, valid: got.update({b: values["x"]}))
    assert n == 3 and len(segments) == 1 and segments[0].nodes == [] and sorted(got) == [0, 1, 2]
    np.testing.assert_array_equal(got[1], batches()[1]["x"])


def test_shape_inference_never_enumerates_a_packed_weight():
    """ONNX's data propagation turns a 1-D integer tensor into one symbolic dim per element: a packed 4-bit weight
    (millions of bytes) fed to Cast exhausted memory in `maia-onnx run` of a multi-GB MXFP4 model."""
    from maia_onnx.graph.shapes import _shape_only_proto, infer_shapes

    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[4] s) => (float[64, 2048] w) {
      c = Cast <to = 6> (packed)
      t = Gather <axis = 0> (table, c)
      w = Reshape (t, shape)
    }
    """
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.arange(64 * 1024, dtype=np.uint8) % 251, "packed"),
        onnx.numpy_helper.from_array(np.arange(512, dtype=np.float32).reshape(256, 2), "table"),
        onnx.numpy_helper.from_array(np.array([64, 2048], np.int64), "shape")])
    model = ir.from_proto(proto)
    declared = {i.name: i for i in _shape_only_proto(model).graph.input}
    assert not declared["packed"].type.tensor_type.shape.dim[0].HasField("dim_value")  # length left unknown
    model.graph.node(0).outputs[0].shape = None
    infer_shapes(model)
    assert list(model.graph.node(2).outputs[0].shape) == [64, 2048]
