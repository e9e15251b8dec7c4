"""Tests for passes/sharding_annotations.py: IR v11 sharding specs and pipeline stages on the unsharded model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.errors import InvalidOptionError
from maia_onnx.io import load_model, save_model
from maia_onnx.ortutil import run_model
from maia_onnx.passes.pipeline_parallel import plan_pipeline
from maia_onnx.passes.sharding_annotations import ShardingAnnotationsPass, annotate_model, read_annotations
from test_pipeline_parallel import feeds_for, toy_decoder  # tests/ is on sys.path (pytest prepend mode)

# Megatron layout of the toy's MLP-like layers: first MatMul column-parallel, second row-parallel.
TOY_LAYOUT = {f"wa{i}": {"kind": "column", "axis": 1} for i in range(4)} | {f"wb{i}": {"kind": "row", "axis": 0} for i in range(4)}


def test_annotations_round_trip_through_onnx_and_checker(tmp_path):
    model = ir.from_proto(toy_decoder(4))
    annotate_model(model, tp=2, pp=2, layout=TOY_LAYOUT)
    path = save_model(model, tmp_path / "annotated.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version >= 11
    (config,) = proto.configuration
    assert config.name == "maia_tp2_pp2" and config.num_devices == 4 and list(config.device) == [f"maia:{d}" for d in range(4)]
    specs = {}
    for node in proto.graph.node:
        (ndc,) = node.device_configurations
        assert ndc.configuration_id == "maia_tp2_pp2"
        for spec in ndc.sharding_spec:
            specs[spec.tensor_name] = (node.op_type, [d.axis for d in spec.sharded_dim],
                                       [s.num_shards for d in spec.sharded_dim for s in d.simple_sharding], list(spec.device), ndc.pipeline_stage)
    # each weight is sharded on its Megatron axis over the two devices of its stage (stage s -> devices 2s, 2s+1)
    assert set(specs) == set(TOY_LAYOUT)
    for name, (op, axes, shards, devices, stage) in specs.items():
        assert op == "MatMul" and axes == [TOY_LAYOUT[name]["axis"]] and shards == [2]
        assert devices == [2 * stage, 2 * stage + 1]
    # and back into onnx_ir: the same stages and specs
    again = read_annotations(load_model(path))
    assert again["configs"] == ["maia_tp2_pp2"]
    read_back = {value: (axes, devices) for entries in again["shards"].values() for value, axes, devices in entries}
    assert read_back == {name: ([(axes[0], shards)], devices) for name, (_, axes, shards, devices, _) in specs.items()}
    assert list(again["stage_of"].values()) == [n.device_configurations[0].pipeline_stage for n in proto.graph.node]


def test_stages_follow_the_pipeline_plan_and_model_still_runs():
    reference_model = ir.from_proto(toy_decoder(4))
    feeds = feeds_for(4)
    reference = run_model(reference_model, feeds)
    plan_model = ir.from_proto(toy_decoder(4))
    plan_model.graph.sort()
    plan = plan_pipeline(plan_model, 2, "flops")
    model = ir.from_proto(toy_decoder(4))
    p = ShardingAnnotationsPass(tp=1, pp=2)
    p(model)
    stages = [node.device_configurations[0].pipeline_stage for node in model.graph]
    assert stages == plan.node_stage == p.plan.node_stage
    assert not any(STAGE in node.metadata_props for node in model.graph for STAGE in ["maia.pipeline_stage"])
    # annotations only: same graph, same numbers in a runtime that ignores them
    got = run_model(model, feeds)
    for name, value in reference.items():
        np.testing.assert_array_equal(got[name], value)


def test_annotate_llama_with_tp_analysis(llama_tiny_onnx):
    """--annotate-only reuses the TP engineer's structural analysis: q/k/v/gate/up column, o/down row, vocab embedding."""
    model = load_model(llama_tiny_onnx)
    annotate_model(model, tp=2, pp=2)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    sharded = {spec.tensor_name: [d.axis for d in spec.sharded_dim]
               for n in proto.graph.node for ndc in n.device_configurations for spec in ndc.sharding_spec}
    assert sharded, "no weight was annotated"
    q = [n for n in sharded if n.endswith("self_attn.q_proj.weight")]
    o = [n for n in sharded if n.endswith("self_attn.o_proj.weight")]
    assert len(q) == 2 and len(o) == 2
    # the exporter stores Linear weights as [in, out] MatMul operands: column split = axis 1, row split = axis 0
    assert all(sharded[n] == [1] for n in q) and all(sharded[n] == [0] for n in o)
    stages = {ndc.pipeline_stage for n in proto.graph.node for ndc in n.device_configurations}
    assert stages == {0, 1}


def test_bad_requests():
    with pytest.raises(InvalidOptionError, match=">= 1"):
        ShardingAnnotationsPass(tp=0)
    model = ir.from_proto(toy_decoder(2))
    annotate_model(model, tp=1, pp=2)
    with pytest.raises(InvalidOptionError, match="already has a device configuration"):
        annotate_model(model, tp=1, pp=2)


def test_annotate_file_writes_a_new_model_and_keeps_the_input(tmp_path):
    from maia_onnx.io import sha256_file
    from maia_onnx.passes.sharding_annotations import annotate_file

    src = save_model(ir.from_proto(toy_decoder(4)), tmp_path / "toy.onnx")
    before = sha256_file(src)
    report = annotate_file(src, tmp_path / "annotated.onnx", tp=1, pp=2)
    assert sha256_file(src) == before
    assert report["annotated_nodes"] == len(list(load_model(src).graph)) and report["num_devices"] == 2
    proto = onnx.load(str(tmp_path / "annotated.onnx"))
    assert {n.device_configurations[0].pipeline_stage for n in proto.graph.node} == {0, 1}
