"""Partition and reshard verify themselves: the written shards run against the unsharded model before the
directory appears, a wrong partition is refused (one line, non-zero exit, nothing written) and --no-verify skips it.

Wrong partitions are made by wrapping the real tensor-parallel split (the function ``partition_model`` calls):
a row-parallel layer that forgets its AllReduce, or one rank's weight slice with its rows reversed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from maia_onnx.cli import main
from maia_onnx.errors import ValidationError
from maia_onnx.io import load_model
from maia_onnx.ortutil import compare, run_model
from maia_onnx.partition import partition_file, reshard_directory
from maia_onnx.partition.verify import FP32_TOLERANCE, QUANTIZED_TP_TOLERANCE, make_probe
from maia_onnx.passes import tensor_parallel
from maia_onnx.runtime.executor import run_partition

_REAL_SPLIT = tensor_parallel.split_model


def _without_allreduce(which: int):
    """The real TP split, then the ``which``-th AllReduce removed from every rank (its output reads the local
    partial sum): a row-parallel layer whose ranks never add their halves. The manifest is kept consistent."""

    def split(model, tp, **kwargs):
        ranks, fragment = _REAL_SPLIT(model, tp, **kwargs)
        target = [c for c in fragment["collectives"] if c["op"] == "AllReduce"][which]
        for rank in ranks:
            node = next(n for n in rank.graph if n.op_type == "AllReduce" and n.outputs[0].name == target["output"])
            local, out = node.inputs[0], node.outputs[0]
            ir.convenience.replace_all_uses_with(out, local)
            for i, graph_out in enumerate(rank.graph.outputs):
                if graph_out is out:
                    rank.graph.outputs[i] = local
            rank.graph.remove(node, safe=False)
        fragment["collectives"] = [c for c in fragment["collectives"] if c is not target]
        return ranks, fragment

    return split


def _reversed_shard():
    """The real TP split, then rank 1's first split 2-D weight with its rows in reverse order."""

    def split(model, tp, **kwargs):
        ranks, fragment = _REAL_SPLIT(model, tp, **kwargs)
        name = next(n for n, spec in fragment["tensors"].items()
                    if spec.get("axis") is not None and len(spec.get("full_shape") or ()) == 2)
        inits = ranks[1].graph.initializers
        value = inits.get(f"{name}__tp") or inits[name]
        rows = np.array(value.const_value.numpy(), copy=True)[::-1].copy()
        value.const_value = ir.Tensor(rows, name=value.name)
        return ranks, fragment

    return split


BROKEN = {"row_parallel_without_allreduce": _without_allreduce(1), "reversed_shard": _reversed_shard()}


@pytest.fixture(scope="module")
def llama_fp8(llama_tiny_onnx, tmp_path_factory) -> Path:
    from maia_onnx.quantize import quantize_model

    out = tmp_path_factory.mktemp("verify_fp8") / "llama-fp8.onnx"
    with warnings.catch_warnings():  # calibrating on random inputs warns; irrelevant here
        warnings.simplefilter("ignore")
        quantize_model(llama_tiny_onnx, out, format="fp8-e4m3", show_progress=False, evaluate=False)
    return out


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """``maia-onnx ARGS`` as the console runs it: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n not in keep)


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_cli_refuses_a_wrong_partition_and_writes_nothing(llama_tiny_onnx, tmp_path, monkeypatch, broken, capsys):
    monkeypatch.setattr(tensor_parallel, "split_model", BROKEN[broken])
    out = tmp_path / "part"
    code, stdout, stderr = _cli(capsys, "partition", str(llama_tiny_onnx), "-o", str(out), "--tp", "2")
    assert code == ValidationError.exit_code, stderr
    errors = _error_lines(stderr)
    assert len(errors) == 1, stderr
    assert "the partition was not written" in errors[0] and "tolerance 1e-05" in errors[0], errors[0]
    assert not out.exists()
    assert _leftovers(tmp_path, set()) == []  # no staging or scratch directory left either


def test_refusal_keeps_an_existing_partition(llama_tiny_onnx, tmp_path, monkeypatch):
    out = tmp_path / "part"
    first = partition_file(llama_tiny_onnx, out, tp=2)
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(tensor_parallel, "split_model", BROKEN["reversed_shard"])
    with pytest.raises(ValidationError, match="the partition was not written"):
        partition_file(llama_tiny_onnx, out, tp=2)
    assert (out / "manifest.json").read_bytes() == before and first.verification.verified
    assert _leftovers(tmp_path, {"part"}) == []


def test_quantized_tp_bound_still_refuses_a_missing_allreduce(llama_fp8, tmp_path, monkeypatch):
    """FP8 shards get a looser bound than FP32 under TP (see verify.py): it must still catch a broken rewrite."""
    monkeypatch.setattr(tensor_parallel, "split_model", _without_allreduce(-1))  # the last one (o_proj / down_proj)
    with pytest.raises(ValidationError) as info:
        partition_file(llama_fp8, tmp_path / "part", tp=2)
    message = str(info.value)
    assert f"tolerance {QUANTIZED_TP_TOLERANCE:g}" in message and "\n" not in message
    assert not (tmp_path / "part").exists()


def test_cli_verifies_by_default_and_reports_it(llama_tiny_onnx, tmp_path, capsys):
    out = tmp_path / "part"
    code, stdout, stderr = _cli(capsys, "partition", str(llama_tiny_onnx), "-o", str(out), "--tp", "2", "--pp", "2", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    check = report["verification"]
    assert check["verified"] is True and check["outputs"] == 5 and check["tolerance"] == FP32_TOLERANCE
    assert 0 <= check["max_rel"] <= FP32_TOLERANCE
    assert report["verified"] == f"true (max rel err {check['max_rel']:.2g} over 5 outputs)"
    # the reported error is the real one: recompute it from the written partition on the same inputs
    probe = make_probe(load_model(llama_tiny_onnx), tp=2, pp=2)
    assert probe.microbatches == 2
    reference = run_model(llama_tiny_onnx, probe.feeds)
    got = run_partition(out, probe.feeds, microbatches=probe.microbatches)
    assert max(compare(reference[k], got[k])["max_rel"] for k in reference) == pytest.approx(check["max_rel"], abs=1e-12)
    code, table, _ = _cli(capsys, "partition", str(llama_tiny_onnx), "-o", str(tmp_path / "t"), "--tp", "2")
    assert code == 0
    assert "verified: true (max rel err " in table


def test_no_verify_skips_the_check(llama_tiny_onnx, tmp_path, monkeypatch, capsys):
    """With --no-verify even a broken rewrite is written (that is what skipping means), and the report says so."""
    monkeypatch.setattr(tensor_parallel, "split_model", BROKEN["row_parallel_without_allreduce"])
    out = tmp_path / "part"
    code, stdout, stderr = _cli(capsys, "partition", str(llama_tiny_onnx), "-o", str(out), "--tp", "2", "--no-verify", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["verified"] == "skipped (--no-verify)" and report["verification"]["verified"] is None
    assert (out / "manifest.json").is_file()
    code, table, _ = _cli(capsys, "partition", str(llama_tiny_onnx), "-o", str(tmp_path / "t"), "--tp", "2", "--no-verify")
    assert code == 0 and "verified: skipped (--no-verify)" in table


def test_quantized_pipeline_split_is_bit_exact_and_tp_within_bound(llama_fp8, tmp_path):
    pp_only = partition_file(llama_fp8, tmp_path / "pp2", pp=2)
    assert pp_only.verification.tolerance == 0 and pp_only.verification.max_rel == 0
    tp = partition_file(llama_fp8, tmp_path / "tp2", tp=2)
    assert tp.verification.verified and tp.verification.max_rel <= QUANTIZED_TP_TOLERANCE


def test_reshard_verifies(llama_tiny_onnx, tmp_path, monkeypatch, capsys):
    partition_file(llama_tiny_onnx, tmp_path / "tp2", tp=2)
    report = reshard_directory(tmp_path / "tp2", tmp_path / "pp2", tp=1, pp=2)
    assert report["verification"]["verified"] is True and report["verification"]["max_rel"] <= FP32_TOLERANCE

    monkeypatch.setattr(tensor_parallel, "split_model", BROKEN["reversed_shard"])
    code, stdout, stderr = _cli(capsys, "reshard", str(tmp_path / "tp2"), "-o", str(tmp_path / "tp4"), "--tp", "4")
    assert code == ValidationError.exit_code, stderr
    errors = _error_lines(stderr)
    assert len(errors) == 1 and "the partition was not written" in errors[0], stderr
    assert not (tmp_path / "tp4").exists()
    assert _leftovers(tmp_path, {"tp2", "pp2"}) == []

    code, stdout, _ = _cli(capsys, "reshard", str(tmp_path / "tp2"), "-o", str(tmp_path / "tp4"), "--tp", "4",
                                        "--no-verify", "--json")
    assert code == 0
    assert json.loads(stdout)["verified"] == "skipped (--no-verify)"


def test_shards_that_fail_to_run_are_refused(llama_tiny_onnx, tmp_path, monkeypatch, capsys):
    """A per-rank shape constant left wrong (the diffusers cross-attention case of issue 14) makes the shards
    crash in ORT: that is a refusal in one line, not an internal error and not a written partition."""

    def split(model, tp, **kwargs):
        ranks, fragment = _REAL_SPLIT(model, tp, **kwargs)
        for rank in ranks:
            # the first reshape to heads whose target is built at run time: Concat(Shape..., heads, head_dim)
            heads = next(c.inputs[-2] for n in rank.graph if n.op_type == "Reshape"
                         for c in [n.inputs[1].producer()] if c is not None and c.op_type == "Concat"
                         and c.inputs[-2].const_value is not None and c.inputs[-2].const_value.size == 1)
            heads.const_value = ir.Tensor(heads.const_value.numpy() * 2, name=heads.name)  # twice this rank's heads
        return ranks, fragment

    monkeypatch.setattr(tensor_parallel, "split_model", split)
    out = tmp_path / "part"
    code, stdout, stderr = _cli(capsys, "partition", str(llama_tiny_onnx), "-o", str(out), "--tp", "2")
    assert code == ValidationError.exit_code, stderr
    errors = _error_lines(stderr)
    assert len(errors) == 1 and "fail to run" in errors[0] and "internal error" not in errors[0], stderr
    assert not out.exists()
