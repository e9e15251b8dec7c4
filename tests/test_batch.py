"""Tests for `maia-onnx batch`: real conversions in worker processes, failure isolation, content-addressed
cache keys, SIGKILL-safe resume with identical artifacts, dry-run and job-file validation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from maia_onnx.batch import Cache, JobFileError, object_hash, parse_job_file, plan_job, run_batch, tree_hash
from maia_onnx.cli import main

BUILTIN_JOBS = """
defaults:
  quantize: {format: fp8-e4m3}
  verify: {min_cosine: 0.95}
jobs:
  - {name: llama-fp32, model: llama-tiny, steps: [export, verify]}
  - {name: llama-fp8, model: llama-tiny, steps: [export, quantize, verify]}
  - {name: llama-tp2, model: llama-tiny, steps: [export, {partition: {tp: 2}}, verify]}
  - {name: llama-maia, model: llama-tiny, steps: [export, {compile: {device: maia100}}, verify]}
  - {name: unet-fp8, model: unet-tiny, steps: [export, quantize, verify]}
  - {name: yolo-fp32, model: yolo-tiny, steps: [export, verify]}
  - {name: broken, model: broken.onnx, steps: [quantize, verify]}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def builtin_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    (root / "broken.onnx").write_bytes(b"\x08\x07this is not a protobuf model" * 40)
    jobs = write(root / "jobs.yaml", BUILTIN_JOBS)
    report = run_batch(jobs, workers=2, show_progress=False)
    return root, report


def test_batch_of_builtin_models_finishes_good_jobs_and_reports_the_broken_one(builtin_batch):
    root, report = builtin_batch
    by_name = {j["name"]: j for j in report.jobs}
    assert [j["name"] for j in report.failed] == ["broken"]
    broken = by_name["broken"]
    assert broken["error"].startswith("quantize: ModelLoadError: cannot parse") and "broken.onnx" in broken["error"]
    assert [s["status"] for s in broken["steps"]] == ["failed", "skipped"]
    assert "Traceback" in Path(broken["log"]).read_text()
    for name in ("llama-fp32", "llama-fp8", "llama-tp2", "llama-maia", "unet-fp8", "yolo-fp32"):
        job = by_name[name]
        assert job["status"] == "ok", job
        verify = job["steps"][-1]
        assert verify["step"] == "verify" and verify["metrics"]["min_cosine"] >= 0.95
        for step in job["steps"]:
            assert Path(step["artifact"]).exists() and os.path.exists(step["link"])
    # the four llama jobs share one export: built once, then served from the cache (per-key lock)
    export_states = sorted(by_name[n]["steps"][0]["status"] for n in ("llama-fp32", "llama-fp8", "llama-tp2", "llama-maia"))
    assert export_states == ["cached", "cached", "cached", "done"]
    # artifacts are real: FP8 weights in the quantized model, a TP=2 partition, EPContext nodes when compiled
    fp8 = onnx.load(by_name["llama-fp8"]["steps"][1]["artifact"], load_external_data=False)
    assert any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in fp8.graph.initializer)
    part = Path(by_name["llama-tp2"]["steps"][1]["artifact"])
    assert json.loads((part / "manifest.json").read_text())["mesh"]["tp"] == 2
    compiled = onnx.load(by_name["llama-maia"]["steps"][1]["artifact"], load_external_data=False)
    assert any(n.op_type == "EPContext" for n in compiled.graph.node)
    saved = json.loads((Path(report.output_dir) / "report.json").read_text())
    assert saved["ok"] == 6 and saved["failed"] == 1


def test_rerun_is_fully_cached_and_corruption_is_rebuilt(builtin_batch, capsys):
    root, first = builtin_batch
    jobs = root / "jobs.yaml"
    rc = main(["batch", str(jobs), "--job", "llama-fp8", "--job", "yolo-fp32", "--json", "-j", "2"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["ok"] == 2
    assert all(s["status"] == "cached" for j in data["jobs"] for s in j["steps"])
    # flip a byte of a cached artifact: the content check notices and the step is rebuilt, not trusted
    quantized = Path(next(j for j in first.jobs if j["name"] == "llama-fp8")["steps"][1]["artifact"])
    blob = bytearray(quantized.read_bytes())
    blob[-1] ^= 0xFF
    quantized.write_bytes(bytes(blob))
    again = run_batch(jobs, only=["llama-fp8"], show_progress=False)
    assert [s["status"] for s in again.jobs[0]["steps"]] == ["cached", "done", "cached"]
    # the broken job fails again with exit code 1 and one line
    rc = main(["batch", str(jobs), "--job", "broken", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: 1 of 1 jobs failed: broken") and err.count("\n") == 1


def test_dry_run_shows_cached_and_pending_steps(builtin_batch, capsys, tmp_path):
    root, _ = builtin_batch
    rc = main(["batch", str(root / "jobs.yaml"), "--dry-run", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    states = {j["name"]: [s["state"] for s in j["steps"]] for j in plan["jobs"]}
    assert states["yolo-fp32"] == ["cached", "cached"]
    assert states["broken"] == ["will run", "will run (after upstream)"]
    # an empty cache: only the first step has a key yet
    rc = main(["batch", str(root / "jobs.yaml"), "--dry-run", "--cache-dir", str(tmp_path / "empty")])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[3:]]
    assert rc == 0 and rows and all(r[2] == "will" for r in rows)
    assert [r[1] for r in rows if r[-1] != "?"] == ["export"] * 6 + ["quantize"]


def _tiny_model(path: Path, weight: float) -> Path:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    w = numpy_helper.from_array(np.full((8, 4), weight, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def test_cache_keys_follow_content_not_names(tmp_path):
    a = _tiny_model(tmp_path / "a" / "model.onnx", 0.5)
    b = _tiny_model(tmp_path / "b" / "model.onnx", 0.25)  # same name and graph, other weights
    c = _tiny_model(tmp_path / "c" / "other.onnx", 0.5)  # same content as a, other name
    jobs = write(tmp_path / "jobs.yaml", f"""
jobs:
  - {{name: a, model: {a}, steps: [{{quantize: {{format: fp8-e4m3}}}}, verify]}}
  - {{name: b, model: {b}, steps: [{{quantize: {{format: fp8-e4m3}}}}, verify]}}
  - {{name: c, model: {c}, steps: [{{quantize: {{format: fp8-e4m3}}}}, verify]}}
  - {{name: d, model: {a}, steps: [{{quantize: {{format: fp8-e5m2}}}}, verify]}}
""")
    spec = parse_job_file(jobs)
    cache = Cache(tmp_path / "cache")
    keys = {j.name: plan_job(j, cache)[0]["key"] for j in spec.jobs}
    assert keys["a"] != keys["b"]  # different model content
    assert keys["a"] == keys["c"]  # same content under another name
    assert keys["a"] != keys["d"]  # different options


KILL_JOBS = """
defaults:
  verify: {{min_cosine: 0.95}}
jobs:
  - {{name: q8, model: {m}, steps: [{{quantize: {{format: fp8-e4m3}}}}, verify]}}
  - {{name: tp2, model: {m}, steps: [{{partition: {{tp: 2}}}}, verify]}}
  - {{name: q8-tp2, model: {m}, steps: [{{quantize: {{format: fp8-e4m3}}}}, {{partition: {{tp: 2}}}}, verify]}}
"""


def _objects(cache: Path) -> dict[str, str]:
    """key -> content hash of every committed object (and each one must be complete and verify)."""
    out = {}
    for meta_path in (cache / "objects").glob("*/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        assert object_hash(meta_path.parent) == meta["content_hash"], "a committed object is incomplete"
        out[meta["key"]] = meta["content_hash"]
    return out


def test_sigkill_midway_resumes_without_redoing_finished_steps(tmp_path, llama_tiny_onnx):
    model = tmp_path / "llama.onnx"
    shutil.copy(llama_tiny_onnx, model)
    jobs = write(tmp_path / "jobs.yaml", KILL_JOBS.format(m=model))
    cmd = [sys.executable, "-m", "maia_onnx", "batch", str(jobs), "-j", "1", "--no-progress",
           "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list((tmp_path / "cache" / "objects").glob("*/*/meta.json"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the batch finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # workers die with their parent (PR_SET_PDEATHSIG)
    finished = _objects(tmp_path / "cache")  # every committed object is complete
    assert finished

    resumed = run_batch(jobs, workers=1, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"),
                        show_progress=False)
    assert not resumed.failed
    steps = [s for j in resumed.jobs for s in j["steps"]]
    redone = [s for s in steps if s["key"] in finished and s["status"] != "cached"]
    assert not redone, f"finished steps were redone: {redone}"
    assert any(s["status"] == "done" for s in steps), "the kill came after everything had finished"

    reference = run_batch(jobs, workers=2, cache_dir=str(tmp_path / "ref-cache"), output_dir=str(tmp_path / "ref-out"),
                          show_progress=False)
    assert not reference.failed
    for got, ref in zip(resumed.jobs, reference.jobs):
        assert [s["key"] for s in got["steps"]] == [s["key"] for s in ref["steps"]]
        for gs, rs in zip(got["steps"], ref["steps"]):
            assert tree_hash(Path(gs["artifact"])) == tree_hash(Path(rs["artifact"])), (got["name"], gs["step"])
    assert _objects(tmp_path / "cache") == _objects(tmp_path / "ref-cache")


@pytest.mark.parametrize("text, message", [
    ("jobs: []", "'jobs' must be a non-empty list"),
    ("jobs: [{name: a, model: llama-tiny, steps: [quantise]}]", "unknown step 'quantise'"),
    ("jobs: [{name: a, model: llama-tiny, steps: [export, {quantize: {formatt: fp8}}]}]", "has no option 'formatt'"),
    ("jobs: [{name: a, model: llama-tiny, steps: [quantize]}]", "the first step must be export"),
    ("jobs: [{name: a, model: m.onnx, steps: [partition, quantize]}]", "quantize needs a model file"),
    ("jobs: [{name: a, model: m.onnx, steps: [verify]}, {name: a, model: m.onnx, steps: [verify]}]", "duplicate job name 'a'"),
    ("jobs: [{name: 'a b', model: m.onnx, steps: [verify]}]", "'name' must be"),
    ("jobz: []", "unknown top-level key 'jobz'"),
    ("jobs: [{name: a, model: llama-tiny, steps: [export]", "cannot parse"),
])
def test_job_file_errors_name_the_place_and_the_fix(tmp_path, text, message):
    path = write(tmp_path / "jobs.yaml", text)
    with pytest.raises(JobFileError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        parse_job_file(path)
    assert str(info.value).startswith("jobs.yaml")
    assert "\n" not in str(info.value)


def test_json_job_file_and_defaults_merge(tmp_path):
    path = write(tmp_path / "jobs.json", json.dumps({
        "defaults": {"partition": {"tp": 2}, "verify": {"min_cosine": 0.9}},
        "jobs": [{"name": "a", "model": "m.onnx", "steps": [{"partition": {"pp": 2}}, "verify"]}],
    }))
    spec = parse_job_file(path)
    job = spec.jobs[0]
    assert job.model == str(tmp_path / "m.onnx")
    assert [(s.name, s.options) for s in job.steps] == [("partition", {"tp": 2, "pp": 2}), ("verify", {"min_cosine": 0.9})]
    assert spec.cache_dir == tmp_path / ".maia-batch-cache" and spec.output_dir == tmp_path / "batch-out"
