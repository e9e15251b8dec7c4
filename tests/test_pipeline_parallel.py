"""Tests for passes/pipeline_plan.py and passes/pipeline_parallel.py: balanced cuts, explicit boundaries, KV cache
placement; stages are run as partition directories by the one executor (runtime/executor.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.errors import InvalidOptionError, UserError
from maia_onnx.ortutil import run_model
from maia_onnx.partition import partition_model, read_manifest
from maia_onnx.passes.pipeline_parallel import STAGE_KEY, PipelineParallelPass, PipelineResult, extract_stages, split_pipeline
from maia_onnx.passes.pipeline_plan import _min_max_partition, crossing_bytes, plan_pipeline
from maia_onnx.runtime.executor import run_partition

HIDDEN = 8


def toy_decoder(layers: int = 4, widths: list[int] | None = None, seed: int = 0) -> onnx.ModelProto:
    """A residual stack with a per-layer KV-cache Concat: x -> [MatMul, Relu, Concat(past), Mul, Add] * L -> out.

    ``widths[i]`` is layer i's inner width (its MatMul pair is HIDDEN x w, w x HIDDEN) to make layers unequal.
    """
    widths = widths or [HIDDEN] * layers
    rng = np.random.default_rng(seed)
    lines, prev = [], "x"
    for i, w in enumerate(widths):
        lines += [
            f"h{i} = MatMul({prev}, wa{i})",
            f"a{i} = Relu(h{i})",
            f"b{i} = MatMul(a{i}, wb{i})",
            f"k{i} = Concat <axis=1> (past{i}, b{i})",
            f"m{i} = Mul(b{i}, scale)",
            f"y{i} = Add(m{i}, {prev})",
        ]
        prev = f"y{i}"
    lines.append(f"out = Identity({prev})")
    ins = ", ".join([f"float[B,S,{HIDDEN}] x"] + [f"float[B,P,{HIDDEN}] past{i}" for i in range(len(widths))])
    outs = ", ".join([f"float[B,S,{HIDDEN}] out"] + [f"float[B,T,{HIDDEN}] k{i}" for i in range(len(widths))])
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
toy ({ins}) => ({outs}) <float scale = {{0.5}}>
{{
{chr(10).join(lines)}
}}"""
    proto = onnx.parser.parse_model(text)
    for i, w in enumerate(widths):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((HIDDEN, w)).astype(np.float32), f"wa{i}"))
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((w, HIDDEN)).astype(np.float32), f"wb{i}"))
    onnx.checker.check_model(proto)
    return proto


def feeds_for(layers: int, batch: int = 2, seq: int = 3, past: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)}
    for i in range(layers):
        feeds[f"past{i}"] = rng.standard_normal((batch, past, HIDDEN)).astype(np.float32)
    return feeds


def layer_of(name: str) -> int | None:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else None


def run_pipeline(tmp_path, model: ir.Model, stages: int, feeds, balance: str = "flops", microbatches: int = 1):
    """Write ``model`` cut into ``stages`` as a partition directory and run it in the executor."""
    out = tmp_path / f"pp{stages}_{balance}_{len(list(tmp_path.iterdir()))}"
    partition_model(model, out, pp=stages, balance=balance)
    return run_partition(out, feeds, microbatches=microbatches)


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_stages_equal_unsplit_model_and_cut_between_layers(tmp_path, stages):
    proto = toy_decoder(6 if stages == 3 else 4)
    feeds = feeds_for(6 if stages == 3 else 4)
    reference = run_model(ir.from_proto(proto), feeds)
    plan, parts = split_pipeline(ir.from_proto(proto), stages, "flops")
    assert len(parts) == stages
    got = run_pipeline(tmp_path, ir.from_proto(proto), stages, feeds)
    for name, value in reference.items():
        np.testing.assert_array_equal(got[name], value)  # same ops, same order: bit-exact
    # The only tensor crossing each cut is a layer's residual output y{i}: cuts sit between layers.
    for boundary in plan.boundaries:
        assert len(boundary) == 1 and boundary[0].startswith("y"), plan.boundaries
    # Each layer's KV cache input and output live on the stage that holds the layer.
    for part in parts:
        past_layers = {layer_of(n) for n in part.graph_inputs if n.startswith("past")}
        present_layers = {layer_of(n) for n in part.outputs if n.startswith("k")}
        assert past_layers == present_layers
    assert sum(len({layer_of(n) for n in p.outputs if n.startswith("k")}) for p in parts) == len(feeds) - 1


def test_boundaries_are_explicit_stage_outputs_and_inputs():
    plan, parts = split_pipeline(ir.from_proto(toy_decoder(4)), 2, "flops")
    (boundary,) = plan.boundaries
    assert boundary == ["y1"]
    assert "y1" in parts[0].outputs and parts[0].send == {"y1": [1]}
    assert "y1" in parts[1].inputs and parts[1].recv == {"y1": 0}
    graph_inputs_1 = [v.name for v in parts[1].model.graph.inputs]
    assert graph_inputs_1 == parts[1].inputs
    for part in parts:
        onnx.checker.check_model(ir.to_proto(part.model), full_check=True)
        # no weights are carried by a stage that does not use them
        used = {i.name for n in part.model.graph for i in n.inputs if i is not None}
        assert set(part.model.graph.initializers) <= used


def test_balance_minimises_the_largest_stage():
    # Layer 0 is 6x wider than the others: flops balance puts it alone on stage 0.
    proto = toy_decoder(4, widths=[48, 8, 8, 8])
    plan = plan_pipeline(_sorted(proto), 2, "flops")
    # after layer 0's two MatMuls (nodes 0-5 are layer 0; x is a graph input so it never crosses a cut)
    assert 2 <= plan.cut_after[0] <= 5
    total = sum(plan.loads)
    assert plan.loads[0] == pytest.approx(max(plan.loads))
    # the best possible split given whole layers: {layer0} | {1,2,3}
    assert plan.imbalance_pct == pytest.approx((max(plan.loads) - total / 2) / (total / 2) * 100)
    params = plan_pipeline(_sorted(proto), 2, "params")
    # params: layer 0's MatMuls hold 2*8*48 floats, the three narrow layers 3*2*8*8 (+ the 4-byte scale,
    # first read by layer 0's Mul after the cut): stage 0 = layer 0's weights only.
    assert params.loads == [768 * 4, 3 * 128 * 4 + 4]
    memory = plan_pipeline(_sorted(proto), 2, "memory")
    assert memory.loads[0] > params.loads[0]  # weights plus activations
    rows = plan.rows()
    assert [r["stage"] for r in rows] == [0, 1] and sum(r["nodes"] for r in rows) == len(list(_sorted(proto).graph))


def test_even_spread_when_min_max_ties():
    # 4 unit loads and a free tail on 3 stages: [1][2][1] beats [2][2][tail] at the same max load of 2.
    loads = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    max_load, cuts = _min_max_partition(loads, [0, 1, 2, 3], 3)
    assert max_load == 2.0
    bounds = [-1] + cuts + [4]
    assert sorted(loads[a + 1 : b + 1].sum() for a, b in zip(bounds, bounds[1:])) == [1.0, 1.0, 2.0]


def test_whole_layers_unless_too_unbalanced():
    # 5 equal layers on 3 stages: whole layers (2/2/1, 20% over the ideal) are kept.
    plan = plan_pipeline(_sorted(toy_decoder(5)), 3, "flops")
    assert all(len(b) == 1 and b[0].startswith("y") for b in plan.boundaries), plan.boundaries
    # 4 equal layers on 3 stages: whole layers would put 50% over the ideal on one stage, so a layer is split.
    plan4 = plan_pipeline(_sorted(toy_decoder(4)), 3, "flops")
    assert plan4.imbalance_pct < 25.0


def test_crossing_bytes_minimal_between_layers():
    nodes = list(_sorted(toy_decoder(2)).graph)
    crossing = crossing_bytes(nodes)
    # cut after y0 (index 5): only y0 crosses; inside layer 1 (after b1, index 8) y0 and b1 cross
    assert crossing[8] == 2 * crossing[5]
    assert crossing[5] == 16 * 16 * HIDDEN * 4  # symbolic B, S at 16, float32


def test_pass_annotates_nodes_and_extract_uses_annotations(tmp_path):
    model = ir.from_proto(toy_decoder(2))
    result = PipelineParallelPass(2, "params")(model)
    assert isinstance(result, PipelineResult) and result.modified and result.model is model
    stages = [int(n.metadata_props[STAGE_KEY]) for n in model.graph]
    assert stages == sorted(stages) and set(stages) == {0, 1}
    assert result.plan.node_stage == stages and result.plan.balance == "params"
    parts = extract_stages(model)
    assert [p.index for p in parts] == [0, 1]
    got = run_pipeline(tmp_path, ir.from_proto(toy_decoder(2)), 2, feeds_for(2), balance="params")
    ref = run_model(ir.from_proto(toy_decoder(2)), feeds_for(2))
    np.testing.assert_array_equal(got["out"], ref["out"])


def test_microbatches_equal_full_batch(tmp_path):
    feeds = feeds_for(4, batch=4)
    out = tmp_path / "pp2"
    partition_model(ir.from_proto(toy_decoder(4)), out, pp=2)
    full = run_partition(out, feeds)
    # the executor's contract: inputs split along the manifest's microbatch axis (uneven chunks allowed)
    for micro in (2, 3, 4):
        mb = run_partition(out, feeds, microbatches=micro)
        for k in full:
            np.testing.assert_allclose(mb[k], full[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match="5 microbatches for batch size 4"):
        run_partition(out, feeds, microbatches=5)


def test_impossible_requests_are_one_line_errors():
    with pytest.raises(InvalidOptionError, match="more stages than the model's 2 decoder layers") as e:
        PipelineParallelPass(4)(_kv_named(toy_decoder(2)))
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidOptionError, match="more stages than the model has compute nodes"):
        plan_pipeline(_sorted(toy_decoder(1)), 50)
    with pytest.raises(InvalidOptionError, match="--balance"):
        plan_pipeline(_sorted(toy_decoder(1)), 2, "latency")
    with pytest.raises(InvalidOptionError, match=">= 1"):
        plan_pipeline(_sorted(toy_decoder(1)), 0)


def test_partition_directory_runs_in_executor(tmp_path):
    proto = toy_decoder(4)
    feeds = feeds_for(4, batch=4)
    reference = run_model(ir.from_proto(proto), feeds)
    manifest, plan = partition_model(ir.from_proto(proto), tmp_path / "pp3", pp=3)
    m = read_manifest(tmp_path / "pp3")
    assert (m.tp, m.pp) == (1, 3)
    assert [s["stage"] for s in m.stages] == [0, 1, 2]
    assert m.outputs["out"]["stage"] == 2
    assert m.data["extra"]["pipeline"]["imbalance_pct"] == pytest.approx(plan.imbalance_pct, abs=1e-3)
    assert (tmp_path / "pp3" / "source_graph.onnx").is_file()
    for micro in (1, 2):
        got = run_partition(tmp_path / "pp3", feeds, microbatches=micro)
        for name, value in reference.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)


def test_output_dir_not_created_on_failure(tmp_path):
    with pytest.raises(InvalidOptionError):
        partition_model(_kv_named(toy_decoder(2)), tmp_path / "bad", pp=5)
    assert not (tmp_path / "bad").exists()


def _sorted(proto: onnx.ModelProto) -> ir.Model:
    from onnx_ir.passes.common import ShapeInferencePass

    model = ir.from_proto(proto)
    model.graph.sort()
    ShapeInferencePass()(model)
    return model


def _kv_named(proto: onnx.ModelProto) -> ir.Model:
    """The toy with llama-style KV input names (past_key_values.{i}.key) so the layer count is known."""
    model = ir.from_proto(proto)
    for v in model.graph.inputs:
        if v.name.startswith("past"):
            v.name = f"past_key_values.{v.name[4:]}.key"
    return model


def test_kv_cache_output_never_crosses_a_stage_boundary(tmp_path):
    """When attention reads the present KV cache (a graph output), no cut separates the cache from its readers."""
    layers = 3
    lines, prev = [], "x"
    for i in range(layers):
        lines += [
            f"b{i} = MatMul({prev}, w{i})",
            f"k{i} = Concat <axis=1> (past{i}, b{i})",
            f"r{i} = ReduceMean <keepdims=1> (k{i}, axis1)",
            f"m{i} = Mul(b{i}, r{i})",
            f"y{i} = Add(m{i}, {prev})",
        ]
        prev = f"y{i}"
    ins = ", ".join([f"float[B,S,{HIDDEN}] x"] + [f"float[B,P,{HIDDEN}] past{i}" for i in range(layers)])
    outs = ", ".join([f"float[B,S,{HIDDEN}] {prev}"] + [f"float[B,T,{HIDDEN}] k{i}" for i in range(layers)])
    proto = onnx.parser.parse_model(
        f"""<ir_version: 10, opset_import: ["" : 18]>
kv ({ins}) => ({outs}) <int64[1] axis1 = {{1}}>
{{
{chr(10).join(lines)}
}}"""
    )
    rng = np.random.default_rng(0)
    for i in range(layers):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), f"w{i}"))
    for stages in (2, 3):
        plan, parts = split_pipeline(ir.from_proto(proto), stages, "flops")
        assert not any(name.startswith("k") for boundary in plan.boundaries for name in boundary), plan.boundaries
        for part in parts:
            present = {n for n in part.outputs if n.startswith("k")}
            readers = {n.inputs[0].name for n in part.model.graph if n.op_type == "ReduceMean"}
            assert readers == present  # the cache is read where it is produced
        feeds = feeds_for(layers)
        got = run_pipeline(tmp_path, ir.from_proto(proto), stages, feeds)
        for name, value in run_model(ir.from_proto(proto), feeds).items():
            np.testing.assert_array_equal(got[name], value)
