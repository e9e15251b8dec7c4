"""Tests for `maia-onnx compile` and `maia-onnx run`: tables, --json, npz inputs/outputs, --compare-to, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.cli import main
from maia_onnx.ortutil import run_model


@pytest.fixture()
def topk_model(make_topk_model):
    return make_topk_model("batch")


def test_compile_then_run_with_npz_io_and_compare(topk_model, tmp_path, capsys):
    out = tmp_path / "ctx.onnx"
    assert main(["compile", str(topk_model), "-o", str(out), "--no-embed"]) == 0
    text = capsys.readouterr().out
    assert "unsupported op TopK (not in the maia100 capability table)" in text
    assert "maia_partition_1" in text and (tmp_path / "ctx_maia.bin").is_file()

    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code = main(["run", str(out), "--inputs", str(tmp_path / "in.npz"), "--save-outputs", str(tmp_path / "o.npz"),
                 "--compare-to", str(topk_model), "--report", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["providers"] == ["MaiaExecutionProvider", "CPUExecutionProvider"]
    assert report["compare"]["y"] == {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    assert report["placement"]["compiled"] and report["placement"]["cpu_nodes"] == 1
    assert [s["runs_on"] for s in report["stages"]] == ["maia", "cpu", "maia"]
    saved = np.load(tmp_path / "o.npz")
    np.testing.assert_array_equal(saved["y"], run_model(ir.load(topk_model), {"x": x})["y"])


def test_run_plain_model_random_inputs_report_table(topk_model, capsys):
    assert main(["run", str(topk_model), "--random", "--dims", "batch=4", "--report", "--repeat", "3"]) == 0
    text = capsys.readouterr().out
    assert "[4, 3]" in text and "latency:" in text
    assert "placement on maia100: 2 device / 1 CPU nodes" in text
    assert "unsupported op TopK" in text
    assert main(["run", str(topk_model), "--random", "--providers", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["providers"] == ["CPUExecutionProvider"]


def test_user_errors_are_one_line(topk_model, tmp_path, capsys):
    assert main(["run", str(topk_model), "--inputs", str(tmp_path / "nope.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: inputs file not found") and err.count("\n") == 1
    np.savez(tmp_path / "wrong.npz", y=np.zeros(3, np.float32))
    assert main(["run", str(topk_model), "--inputs", str(tmp_path / "wrong.npz")]) == 2
    assert "lacks inputs x" in capsys.readouterr().err
    assert main(["run", str(topk_model), "--random", "--providers", "cuda"]) == 2
    assert "unknown provider 'cuda'" in capsys.readouterr().err
    assert main(["compile", str(topk_model), "-o", str(tmp_path / "c.onnx"), "--cpu-ops", "Foo"]) == 2
    assert "--cpu-ops names ops absent" in capsys.readouterr().err
    assert not (tmp_path / "c.onnx").exists()
    assert main(["run", str(tmp_path)]) == 2
    assert "without manifest.json" in capsys.readouterr().err


def test_run_dispatches_partition_directories(llama_tiny_onnx, tmp_path, capsys):
    from maia_onnx.partition import partition_file

    partition_file(llama_tiny_onnx, tmp_path / "tp2", tp=2)
    assert main(["run", str(tmp_path / "tp2"), "--random", "--dims", "batch=1,seq=4,past=2",
                 "--compare-to", str(llama_tiny_onnx), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "partition"
    assert report["outputs"]["logits"]["shape"] == [1, 4, 256]
    assert report["outputs"]["present.0.key"]["shape"] == [1, 2, 6, 16]
    # tensor-parallel sums reorder float additions: close, not bitwise
    assert all(c["cosine"] > 0.999999 and c["max_rel"] < 1e-5 for c in report["compare"].values())
