"""Determinism: the same command on the same input twice gives byte-identical output files.

Each command runs twice, in two fresh directories, with the same relative output path (so recorded relative names
agree); every file written is compared byte for byte: models, external data, Maia side files, partition manifests
and shards, and JSON reports after dropping wall-clock timings (the only thing allowed to differ).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maia_onnx.cli import main

# keys whose values are wall-clock measurements (estimates such as est_time_s are computed, so they stay)
TIMING_KEY = re.compile(r"(^|_)(seconds|elapsed|wall|duration|timestamp|created|started|finished|latency|load_s|run_s)(_|$)|^time_s$")


def write_model(path: Path) -> Path:
    """Two MatMuls around a Conv-free MLP with a bias Add: every verb has work to do; HIDDEN divisible by 2."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="act"),
        helper.make_node("MatMul", ["h2", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _strip_timings(value):
    if isinstance(value, dict):
        return {k: _strip_timings(v) for k, v in value.items() if not TIMING_KEY.search(str(k))}
    if isinstance(value, list):
        return [_strip_timings(v) for v in value]
    return value


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _run_twice(tmp_path: Path, monkeypatch, capsys, argv: list[str], reports: tuple[str, ...] = ()) -> dict[str, bytes]:
    source = write_model(tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((6, 1, 16)).astype(np.float32))
    outputs = []
    for run in ("first", "second"):
        work = tmp_path / run
        work.mkdir()
        monkeypatch.chdir(work)
        args = [a.replace("{model}", str(source)).replace("{calib}", str(tmp_path / "calib.npz")) for a in argv]
        rc = main(args)
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        outputs.append(_files(work))
    first, second = outputs
    assert first, "the command wrote nothing"
    assert sorted(first) == sorted(second), "the two runs wrote different file sets"
    for name in first:
        a, b = first[name], second[name]
        if name.endswith(".json") and (name in reports or Path(name).name in reports):
            a, b = (json.dumps(_strip_timings(json.loads(x)), sort_keys=True) for x in (a, b))
        assert a == b, f"{name} differs between two identical runs"
    return first


def test_quantize_fp8_is_deterministic(tmp_path, monkeypatch, capsys):
    files = _run_twice(tmp_path, monkeypatch, capsys,
                       ["quantize", "{model}", "-o", "q.onnx", "--calib", "{calib}", "--report", "report.json",
                        "--external-data"], reports=("report.json",))
    assert {"q.onnx", "q.onnx.data", "report.json"} <= set(files)


def test_quantize_random_calibration_is_deterministic(tmp_path, monkeypatch, capsys):
    _run_twice(tmp_path, monkeypatch, capsys, ["quantize", "{model}", "-o", "q.onnx", "--no-eval"])


@pytest.mark.parametrize("fmt", ["mxfp8-e4m3", "bf16"])
def test_quantize_other_formats_are_deterministic(fmt, tmp_path, monkeypatch, capsys):
    _run_twice(tmp_path, monkeypatch, capsys, ["quantize", "{model}", "-o", "q.onnx", "--format", fmt, "--no-eval"])


def test_partition_is_deterministic(tmp_path, monkeypatch, capsys):
    files = _run_twice(tmp_path, monkeypatch, capsys, ["partition", "{model}", "-o", "part", "--tp", "2", "--json"])
    assert "part/manifest.json" in files and "part/rank1_stage0.onnx" in files


def test_partition_tp_pp_is_deterministic(tmp_path, monkeypatch, capsys):
    _run_twice(tmp_path, monkeypatch, capsys, ["partition", "{model}", "-o", "part", "--tp", "2", "--pp", "2", "--json"])


def test_compile_embedded_is_deterministic(tmp_path, monkeypatch, capsys):
    _run_twice(tmp_path, monkeypatch, capsys, ["compile", "{model}", "-o", "c.onnx", "--report", "report.json", "--json"],
               reports=("report.json",))


def test_compile_side_file_is_deterministic(tmp_path, monkeypatch, capsys):
    files = _run_twice(tmp_path, monkeypatch, capsys, ["compile", "{model}", "-o", "c.onnx", "--no-embed", "--json"])
    assert "c_maia.bin" in files


def test_quantize_then_compile_is_deterministic(tmp_path, monkeypatch, capsys):
    """FP8 bytes flow into the compiled program: the chain must be reproducible too."""
    source = write_model(tmp_path / "model.onnx")
    blobs = []
    for run in ("first", "second"):
        work = tmp_path / run
        work.mkdir()
        monkeypatch.chdir(work)
        assert main(["quantize", str(source), "-o", "q.onnx", "--no-eval"]) == 0
        assert main(["compile", "q.onnx", "-o", "c.onnx", "--no-embed", "--json"]) == 0
        capsys.readouterr()
        blobs.append(_files(work))
    assert blobs[0] == blobs[1]


def test_strip_timings_only_drops_wall_clock():
    report = {"seconds": 1.2, "est_time_s": 3.0, "phases": [{"elapsed_s": 4, "flops": 5}], "layers": {"fc1": {"sqnr_db": 30}}}
    assert _strip_timings(report) == {"est_time_s": 3.0, "phases": [{"flops": 5}], "layers": {"fc1": {"sqnr_db": 30}}}



def test_export_is_deterministic(llama_tiny_onnx, tmp_path):
    """torch.export -> ONNX again (fixed seed) gives the session fixture's exact bytes: same graph, same weights."""
    from maia_onnx.export import export_builtin

    again = tmp_path / llama_tiny_onnx.name  # same file name: external-data references would carry it
    export_builtin("llama-tiny", again)
    first = {p.name: p.read_bytes() for p in llama_tiny_onnx.parent.glob(llama_tiny_onnx.name + "*")}
    second = {p.name: p.read_bytes() for p in tmp_path.glob(again.name + "*")}
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two identical exports"


def test_reshard_is_deterministic(tmp_path, monkeypatch, capsys):
    """TP 2 -> TP 1 x PP 2 twice from the same partition: identical directories."""
    source = write_model(tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    assert main(["partition", str(source), "-o", "part", "--tp", "2", "--json"]) == 0
    results = []
    for run in ("first", "second"):
        out = tmp_path / run
        assert main(["reshard", "part", "-o", str(out), "--tp", "1", "--pp", "2", "--json"]) == 0
        results.append(_files(out))
    capsys.readouterr()
    assert results[0] and results[0] == results[1]
