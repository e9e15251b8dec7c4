"""Partition directories: streaming writer, manifest reader/validator, source checks and the partition CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.cli import main
from maia_onnx.io import load_model
from maia_onnx.partition import (
    PartitionError,
    PartitionWriter,
    check_source,
    new_manifest,
    read_manifest,
    source_fingerprint,
    summary_rows,
    write_model_streaming,
    write_partition,
)

TEXT = """
<ir_version: 9, opset_import: ["" : 18]>
g (float[N, 64] x) => (float[N, 32] y) <float[64, 32] w = {WEIGHTS}, float[32] b = {BIAS}>
{
    m = MatMul(x, w)
    y = Add(m, b)
}
"""


def _model(seed=0) -> ir.Model:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    text = TEXT.replace("{WEIGHTS}", "{" + ",".join(f"{v:.5f}" for v in w.ravel()) + "}")
    text = text.replace("{BIAS}", "{" + ",".join(f"{v:.5f}" for v in b.ravel()) + "}")
    return ir.from_onnx_text(text)


def _manifest(model, tp=1):
    manifest = new_manifest(tp, 1, model, None, None)
    manifest["stages"] = [{"stage": 0, "inputs": ["x"], "outputs": ["y"]}]
    manifest["outputs"] = {"y": {"sharding": "replicated", "axis": None, "stage": 0}}
    return manifest


def test_streaming_writer_puts_large_weights_outside_small_inside(tmp_path):
    model = _model()
    expected_w = model.graph.initializers["w"].const_value.numpy().copy()
    written = write_model_streaming(model, tmp_path / "m.onnx")
    assert written == 64 * 32 * 4  # the bias (128 bytes) stays inline
    reloaded = load_model(tmp_path / "m.onnx")
    w = reloaded.graph.initializers["w"].const_value
    assert isinstance(w, ir.ExternalTensor) and w.location == "m.onnx.data"
    assert not isinstance(reloaded.graph.initializers["b"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(w.numpy(), expected_w)


@pytest.mark.parametrize("source_kind", ["external", "in_memory"])
def test_lockstep_writer_cuts_slices_like_numpy(tmp_path, source_kind):
    """Column, row and fused (Q|K|V-style) slices, streamed with tiny staging buffers and read blocks so rows
    straddle buffer ends, come out byte-identical to NumPy slicing; each rank keeps its own bytes."""
    from maia_onnx.passes.tensor_parallel import lazy_slice, shard_ranges

    rng = np.random.default_rng(0)
    full = rng.standard_normal((37, 24, 3)).astype(np.float32)  # 288-byte rows of the axis-1 split
    if source_kind == "external":
        (tmp_path / "src.data").write_bytes(bytes(100) + full.tobytes())
        source = ir.ExternalTensor("src.data", 100, full.nbytes, ir.DataType.FLOAT, shape=ir.Shape(full.shape),
                                   name="w", base_dir=tmp_path)
    else:
        source = ir.Tensor(full, name="w")
    layouts = {"column": (1, 1), "row": (0, 1), "fused": (1, 3)}  # axis, sections
    tp = 2
    models, expected = {}, {}
    for t in range(tp):
        values = []
        for kind, (axis, sections) in layouts.items():
            ranges = shard_ranges(full.shape[axis], tp, t, sections)
            values.append(ir.Value(name=kind, const_value=lazy_slice(source, axis, ranges, kind, last=False)))
            index = [slice(None)] * 3
            pieces = []
            for a, b in ranges:
                index[axis] = slice(a, b)
                pieces.append(full[tuple(index)])
            expected[(t, kind)] = np.concatenate(pieces, axis=axis)
        graph = ir.Graph([], values, nodes=[], initializers=values, opset_imports={"": 18})
        models[t] = (ir.Model(graph, ir_version=9), tmp_path / f"rank{t}.onnx")
    with PartitionWriter(chunk=8192, read_block_bytes=1000) as writer:
        sizes = writer.write_lockstep(models)
    for t in range(tp):
        reloaded = load_model(tmp_path / f"rank{t}.onnx")
        assert sizes[t] == sum(e.nbytes for (r, _), e in expected.items() if r == t)  # weight bytes, no padding
        for kind in layouts:
            got = reloaded.graph.initializers[kind].const_value
            assert isinstance(got, ir.ExternalTensor)
            np.testing.assert_array_equal(got.numpy(), expected[(t, kind)])


def test_lazy_slices_evaluated_outside_the_writer_stay_private(tmp_path):
    """A slice held by the caller is not overwritten by reading the next source weight (no shared buffers)."""
    from maia_onnx.passes.tensor_parallel import lazy_slice

    a = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    b = -a
    (tmp_path / "w.data").write_bytes(a.tobytes() + b.tobytes())
    sources = [ir.ExternalTensor("w.data", i * a.nbytes, a.nbytes, ir.DataType.FLOAT, shape=ir.Shape(a.shape),
                                 name=f"s{i}", base_dir=tmp_path) for i in range(2)]
    rows_a = lazy_slice(sources[0], 0, [(0, 32)], "a0", last=False).numpy()  # leading axis: may be a view
    cols_a = lazy_slice(sources[0], 1, [(4, 8)], "a1", last=True).numpy()
    lazy_slice(sources[1], 0, [(0, 32)], "b0", last=False).numpy()
    lazy_slice(sources[1], 1, [(0, 4)], "b1", last=True).numpy()
    np.testing.assert_array_equal(rows_a, a[:32])
    np.testing.assert_array_equal(cols_a, a[:, 4:8])


def test_write_and_read_roundtrip(tmp_path):
    model = _model()
    manifest = write_partition(tmp_path / "p", {(0, 0): model}, _manifest(model))
    again = read_manifest(tmp_path / "p")
    assert again.data == manifest.data
    assert again.ranks[0]["file"] == "rank0_stage0.onnx" and again.ranks[0]["data"] == "rank0_stage0.onnx.data"
    assert again.ranks[0]["weight_bytes"] == 64 * 32 * 4
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["format"] == "maia-onnx-partition"


def test_failed_write_leaves_no_directory(tmp_path):
    model = _model()
    bad = _manifest(model)
    bad["mesh"].update(tp=2, world_size=2)  # claims two ranks, only one model given
    with pytest.raises(PartitionError, match="ranks do not match mesh"):
        write_partition(tmp_path / "p", {(0, 0): model}, bad)
    assert not (tmp_path / "p").exists()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="other"), "not a maia-onnx partition"),
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d["mesh"].update(world_size=5), "inconsistent"),
        (lambda d: d["ranks"].clear(), "missing"),
        (lambda d: d["inputs"].update(x={"sharding": "diagonal"}), "unknown sharding"),
        (lambda d: d["stages"][0].update(inputs=["nope"]), "does not match the manifest"),
    ],
)
def test_validator_names_the_problem(tmp_path, edit, message):
    model = _model()
    write_partition(tmp_path / "p", {(0, 0): model}, _manifest(model))
    path = tmp_path / "p" / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(PartitionError, match=message):
        read_manifest(tmp_path / "p")


def test_missing_files_and_bad_json(tmp_path):
    model = _model()
    write_partition(tmp_path / "p", {(0, 0): model}, _manifest(model))
    (tmp_path / "p" / "rank0_stage0.onnx.data").unlink()
    with pytest.raises(PartitionError, match="is missing"):
        read_manifest(tmp_path / "p")
    (tmp_path / "p" / "manifest.json").write_text("{not json")
    with pytest.raises(PartitionError, match="not valid JSON"):
        read_manifest(tmp_path / "p")
    with pytest.raises(PartitionError, match="no manifest.json"):
        read_manifest(tmp_path)
    with pytest.raises(PartitionError, match="not a partition directory"):
        read_manifest(tmp_path / "nowhere")


def test_source_fingerprint_detects_another_model(tmp_path, llama_tiny_onnx):
    manifest = new_manifest(1, 1, load_model(llama_tiny_onnx), llama_tiny_onnx, source_fingerprint(llama_tiny_onnx))
    from maia_onnx.partition import Manifest

    check_source(Manifest(manifest, tmp_path), llama_tiny_onnx)  # same model: fine
    other = tmp_path / "other.onnx"
    ir.save(_model(), other)
    with pytest.raises(PartitionError, match="is not the source"):
        check_source(Manifest(manifest, tmp_path), other)


def test_cli_partition_json_and_table(tmp_path, llama_tiny_onnx, capsys):
    out = tmp_path / "tp2"
    assert main(["partition", str(llama_tiny_onnx), "-o", str(out), "--tp", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mesh"] == {"tp": 2, "pp": 1, "world_size": 2}
    assert [r["collectives"] for r in report["ranks"]] == [6, 6]
    # hidden 64 (fp32) per AllReduce x 5 + vocab 256 logits per token gathered
    assert report["ranks"][0]["payload_bytes_per_token"] == 5 * 64 * 4 + 256 * 4
    assert main(["partition", str(llama_tiny_onnx), "-o", str(tmp_path / "tp4"), "--tp", "4"]) == 0
    table = capsys.readouterr().out
    assert "rank3_stage0.onnx" in table and "coll_bytes/token" in table


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tp", "3"], "--tp 3 divides none"),
        (["--tp", "0"], "must be >= 1"),
        (["--pp", "9"], "more stages than"),
    ],
)
def test_cli_impossible_requests_are_one_line_errors(tmp_path, llama_tiny_onnx, capsys, args, message):
    code = main(["partition", str(llama_tiny_onnx), "-o", str(tmp_path / "p"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_cli_refuses_to_overwrite_its_input(tmp_path, llama_tiny_onnx, capsys):
    assert main(["partition", str(llama_tiny_onnx), "-o", str(llama_tiny_onnx), "--tp", "2"]) == 2
    assert "is the input path" in capsys.readouterr().err


def test_summary_rows_count_collectives_per_stage(tmp_path, llama_tiny_onnx):
    from maia_onnx.partition import partition_file

    manifest = partition_file(llama_tiny_onnx, tmp_path / "p", tp=2, pp=2)
    rows = summary_rows(manifest)
    assert len(rows) == 4
    assert sum(r["collectives"] for r in rows if r["tp_rank"] == 0) == len(manifest.collectives)
    assert all(r["wire_bytes_per_token"] < r["payload_bytes_per_token"] * 2 for r in rows)
