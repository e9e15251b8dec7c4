"""Tests for maia_onnx/partition/reshard.py and `maia-onnx reshard`: re-split a partition from its shards alone."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.errors import UserError
from maia_onnx.io import load_model, sha256_file
from maia_onnx.ortutil import compare, make_inputs, run_model
from maia_onnx.partition import SOURCE_GRAPH, partition_model, rebuild_source, reshard_directory
from maia_onnx.partition.reshard import reshard
from maia_onnx.runtime.executor import run_partition
from test_pipeline_parallel import feeds_for, toy_decoder  # tests/ is on sys.path (pytest prepend mode)


def _same_files(a, b) -> None:
    names_a, names_b = sorted(os.listdir(a)), sorted(os.listdir(b))
    assert names_a == names_b
    for name in names_a:
        assert sha256_file(a / name) == sha256_file(b / name), name


def test_pp_reshard_equals_direct_partition(tmp_path):
    proto = toy_decoder(6)
    partition_model(ir.from_proto(proto), tmp_path / "pp2", pp=2)
    reshard(tmp_path / "pp2", tmp_path / "pp3_from_pp2", pp=3)
    partition_model(ir.from_proto(proto), tmp_path / "pp3", pp=3)
    _same_files(tmp_path / "pp3", tmp_path / "pp3_from_pp2")
    feeds = feeds_for(6)
    got = run_partition(tmp_path / "pp3_from_pp2", feeds)
    np.testing.assert_allclose(got["out"], run_model(ir.from_proto(proto), feeds)["out"], rtol=1e-6, atol=1e-6)


def test_rebuild_source_restores_every_weight(tmp_path):
    proto = toy_decoder(4)
    partition_model(ir.from_proto(proto), tmp_path / "pp2", pp=2)
    rebuilt = rebuild_source(tmp_path / "pp2")
    original = ir.from_proto(proto)
    assert list(rebuilt.graph.initializers) == list(original.graph.initializers)
    for name, value in original.graph.initializers.items():
        np.testing.assert_array_equal(rebuilt.graph.initializers[name].const_value.numpy(), value.const_value.numpy())


def test_tp4_to_tp2_is_bit_identical_to_direct_tp2(llama_tiny_onnx, tmp_path):
    partition_model(load_model(llama_tiny_onnx), tmp_path / "tp4", tp=4, source_path=llama_tiny_onnx)
    partition_model(load_model(llama_tiny_onnx), tmp_path / "tp2", tp=2, source_path=llama_tiny_onnx)
    os.rename(llama_tiny_onnx, llama_tiny_onnx.with_suffix(".moved"))  # the original model is not needed
    try:
        reshard(tmp_path / "tp4", tmp_path / "tp2_from_tp4", tp=2)
        reshard(tmp_path / "tp4", tmp_path / "tp2pp2_from_tp4", tp=2, pp=2)
    finally:
        os.rename(llama_tiny_onnx.with_suffix(".moved"), llama_tiny_onnx)
    _same_files(tmp_path / "tp2", tmp_path / "tp2_from_tp4")  # weights, graphs and manifest
    # the TP4 shards of a column-parallel weight concatenate to the TP2 shards
    tp4 = [load_model(tmp_path / "tp4" / f"rank{r}_stage0.onnx") for r in range(4)]
    tp2 = [load_model(tmp_path / "tp2_from_tp4" / f"rank{r}_stage0.onnx") for r in range(2)]
    manifest = json.loads((tmp_path / "tp4" / "manifest.json").read_text())
    name, spec = next((n, s) for n, s in manifest["tensors"].items() if s["kind"] == "column")
    for r in range(2):
        halves = [tp4[2 * r + i].graph.initializers[name].const_value.numpy() for i in range(2)]
        np.testing.assert_array_equal(np.concatenate(halves, axis=spec["axis"]), tp2[r].graph.initializers[name].const_value.numpy())
    model = load_model(llama_tiny_onnx)
    feeds = make_inputs(model, seed=3, dims={"batch": 2, "seq": 4, "past": 3}, int_high=200)
    reference = run_model(model, feeds)
    got = run_partition(tmp_path / "tp2pp2_from_tp4", feeds)
    assert max(compare(reference[k], got[k])["max_rel"] for k in reference) < 1e-5


def test_reshard_cli_report_and_errors(tmp_path):
    from maia_onnx.cli import main

    partition_model(ir.from_proto(toy_decoder(4)), tmp_path / "pp2", pp=2)
    assert main(["reshard", str(tmp_path / "pp2"), "-o", str(tmp_path / "pp4"), "--pp", "4", "--json"]) == 0
    manifest = json.loads((tmp_path / "pp4" / "manifest.json").read_text())
    assert manifest["mesh"] == {"tp": 1, "pp": 4, "world_size": 4}
    # impossible requests: one line, exit 2, nothing written
    assert main(["reshard", str(tmp_path / "pp2"), "-o", str(tmp_path / "bad"), "--pp", "99"]) == 2
    assert not (tmp_path / "bad").exists()
    assert main(["reshard", str(tmp_path / "pp2"), "-o", str(tmp_path / "pp2")]) == 2
    assert main(["reshard", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")]) == 2


def test_reshard_report_has_stage_loads(tmp_path):
    partition_model(ir.from_proto(toy_decoder(4)), tmp_path / "pp2", pp=2)
    report = reshard_directory(tmp_path / "pp2", tmp_path / "pp3", pp=3, balance="params")
    assert report["pp"] == 3 and report["balance"] == "params"
    assert [s["stage"] for s in report["stages"]] == [0, 1, 2]
    assert sum(s["share_pct"] for s in report["stages"]) == pytest.approx(100.0, abs=0.05)
    assert report["imbalance_pct"] >= 0.0


def test_mismatched_partition_is_a_clear_error(tmp_path):
    partition_model(ir.from_proto(toy_decoder(4)), tmp_path / "pp2", pp=2)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "pp2", broken)
    os.unlink(broken / SOURCE_GRAPH)
    with pytest.raises(UserError, match="no source_graph.onnx"):
        reshard(broken, tmp_path / "out")
    shutil.rmtree(broken)
    shutil.copytree(tmp_path / "pp2", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["mesh"] = {"tp": 2, "pp": 2, "world_size": 4}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="ranks do not match mesh"):
        reshard(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
