"""Multi-rank executor: segments between collectives, NumPy collectives, stages, microbatches, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from maia_onnx.errors import UserError
from maia_onnx.partition import PartitionError, new_manifest, write_partition
from maia_onnx.runtime.executor import PartitionExecutor, build_program, run_partition

# rank model: y = AllGather(relu(AllReduce(x @ W_r)) * 2, axis=1) -- W_r differs per rank
RANK_TEXT = """
<ir_version: 9, opset_import: ["" : 18, "com.microsoft" : 1]>
rank_model (float[B, 4] x) => (float[B, 6] y) <float[4, 3] w = {WEIGHTS}, float two = {{2.0}}>
{{
    partial = MatMul(x, w)
    summed = com.microsoft.AllReduce <group_size = 2> (partial)
    act = Relu(summed)
    scaled = Mul(act, two)
    y = com.microsoft.AllGather <group_size = 2, axis = 1> (scaled)
}}
"""

SOURCE_TEXT = """
<ir_version: 9, opset_import: ["" : 18]>
source (float[B, 4] x) => (float[B, 6] y) {
    y = Identity(x)
}
"""


def _rank_model(weights: np.ndarray) -> ir.Model:
    text = RANK_TEXT.format(WEIGHTS="{" + ", ".join(f"{v:.1f}" for v in weights.ravel()) + "}")
    return ir.from_onnx_text(text)


@pytest.fixture()
def handmade_partition(tmp_path):
    w0 = np.arange(12, dtype=np.float32).reshape(4, 3) - 5
    w1 = np.arange(12, dtype=np.float32).reshape(4, 3)[::-1].copy() - 4
    source = ir.from_onnx_text(SOURCE_TEXT)
    manifest = new_manifest(2, 1, source, None, None)
    manifest["stages"] = [{"stage": 0, "inputs": ["x"], "outputs": ["y"]}]
    manifest["inputs"] = {"x": {"sharding": "replicated", "axis": None}}
    manifest["outputs"] = {"y": {"sharding": "replicated", "axis": None, "stage": 0}}
    out = tmp_path / "part"
    write_partition(out, {(0, 0): _rank_model(w0), (1, 0): _rank_model(w1)}, manifest)
    return out, w0, w1


def test_collectives_between_segments_match_numpy(handmade_partition):
    out, w0, w1 = handmade_partition
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    summed = x @ w0 + x @ w1
    expected_half = np.maximum(summed, 0) * 2
    expected = np.concatenate([expected_half, expected_half], axis=1)
    got = run_partition(out, {"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_program_cuts_one_segment_per_phase(handmade_partition):
    out, _, _ = handmade_partition
    program = build_program(out / "rank0_stage0.onnx", 0, 0)
    assert sorted(program.segments) == [0, 1]  # MatMul | Relu, Mul
    assert [c.op for c in program.collectives[0]] == ["AllReduce"]
    assert [c.op for c in program.collectives[1]] == ["AllGather"]
    assert [n.op_type for n in program.segments[1].nodes] == ["Relu", "Mul"]
    assert program.phases == 2


def test_rank_files_are_checker_clean(handmade_partition):
    out, _, _ = handmade_partition
    onnx.checker.check_model(str(out / "rank1_stage0.onnx"))


def test_missing_input_is_a_user_error(handmade_partition):
    out, _, _ = handmade_partition
    with pytest.raises(UserError, match="missing inputs"):
        run_partition(out, {})


def test_microbatches_must_fit_the_batch(handmade_partition):
    out, w0, w1 = handmade_partition
    x = np.ones((2, 4), np.float32)
    ex = PartitionExecutor(out)
    np.testing.assert_allclose(ex.run({"x": x}, microbatches=2)["y"], ex.run({"x": x})["y"], rtol=0, atol=0)
    with pytest.raises(UserError, match="microbatches"):
        ex.run({"x": x}, microbatches=3)


def test_asymmetric_ranks_are_rejected(handmade_partition):
    out, w0, _ = handmade_partition
    # rank 1 without its collectives: the manifest still claims tp=2
    bare = ir.from_onnx_text(
        """
        <ir_version: 9, opset_import: ["" : 18]>
        bare (float[B, 4] x) => (float[B, 6] y) { y = Concat <axis = 1> (x, x) }
        """
    )
    ir.save(bare, out / "rank1_stage0.onnx")
    from maia_onnx.io import sha256_file

    data = json.loads((out / "manifest.json").read_text())
    data["ranks"][1]["sha256"] = sha256_file(out / "rank1_stage0.onnx")  # pass the tamper check, hit the symmetry one
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PartitionError, match="different collectives"):
        PartitionExecutor(out)


def test_edited_rank_file_is_detected(handmade_partition):
    out, _, _ = handmade_partition
    with open(out / "rank0_stage0.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PartitionError, match="sha256"):
        run_partition(out, {"x": np.ones((1, 4), np.float32)})


def test_mismatched_manifest_is_one_line_error(handmade_partition):
    out, _, _ = handmade_partition
    data = json.loads((out / "manifest.json").read_text())
    data["stages"][0]["outputs"] = ["not_an_output"]
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PartitionError, match="does not match the manifest"):
        run_partition(out, {"x": np.ones((1, 4), np.float32)})


@pytest.fixture(scope="module")
def llama_tp2_pp2(llama_tiny_onnx, tmp_path_factory):
    from maia_onnx.partition import partition_file

    out = tmp_path_factory.mktemp("exec") / "tp2pp2"
    partition_file(llama_tiny_onnx, out, tp=2, pp=2)
    return out


def test_tp2_pp2_microbatched_equals_unsharded(llama_tiny_onnx, llama_tp2_pp2):
    from maia_onnx.io import load_model
    from maia_onnx.ortutil import compare, make_inputs, run_model

    model = load_model(llama_tiny_onnx)
    feeds = make_inputs(model, seed=3, dims={"batch": 4, "seq": 5, "past": 2}, int_high=256)
    reference = run_model(model, feeds)
    ex = PartitionExecutor(llama_tp2_pp2)
    for microbatches in (1, 2, 4):
        got = ex.run(feeds, microbatches=microbatches)
        for name, ref in reference.items():
            assert compare(ref, got[name])["max_rel"] < 1e-5, (name, microbatches)
    # every collective ran once per microbatch step: 2 stages x (embedding/attention/mlp reduces + logits gather)
    assert {c["op"] for c in ex.collective_log} == {"AllReduce", "AllGather"}
