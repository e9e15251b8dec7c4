"""The Ray backend of `maia-onnx batch` (local Ray instance) gives the same artifacts and report as local."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'maia-onnx[ray]'")

from maia_onnx.batch import object_hash, run_batch  # noqa: E402

JOBS = """
jobs:
  - {{name: q8, model: {m}, steps: [{{quantize: {{format: fp8-e4m3}}}}, verify]}}
  - {{name: tp2, model: {m}, steps: [{{partition: {{tp: 2}}}}, {{verify: {{min_cosine: 0.999}}}}]}}
  - {{name: bad, model: {m}, steps: [{{partition: {{tp: 0}}}}, verify]}}
"""


def test_ray_backend_matches_local_backend(tmp_path, llama_tiny_onnx):
    model = tmp_path / "llama.onnx"
    shutil.copy(llama_tiny_onnx, model)
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(JOBS.format(m=model))
    local = run_batch(jobs, workers=2, cache_dir=str(tmp_path / "c-local"), output_dir=str(tmp_path / "o-local"))
    remote = run_batch(jobs, workers=2, backend="ray", cache_dir=str(tmp_path / "c-ray"),
                       output_dir=str(tmp_path / "o-ray"))
    assert not ray.is_initialized()  # the local instance we started is shut down
    assert remote.backend == "ray"
    assert [j["status"] for j in remote.jobs] == [j["status"] for j in local.jobs] == ["ok", "ok", "failed"]
    assert remote.jobs[2]["error"].startswith("partition: ") and "tp" in remote.jobs[2]["error"]
    for lj, rj in zip(local.jobs[:2], remote.jobs[:2]):
        assert [s["key"] for s in lj["steps"]] == [s["key"] for s in rj["steps"]]
        assert [s["status"] for s in rj["steps"]] == ["done", "done"]
        for ls, rs in zip(lj["steps"], rj["steps"]):
            assert object_hash(Path(ls["artifact"]).parent) == object_hash(Path(rs["artifact"]).parent)
        assert rj["steps"][-1]["metrics"]["min_cosine"] == pytest.approx(lj["steps"][-1]["metrics"]["min_cosine"])
    # the quantize step's own metrics (held-out cosine, size ratio) are the same on both backends
    lq, rq = local.jobs[0]["steps"][0]["metrics"], remote.jobs[0]["steps"][0]["metrics"]
    assert 0.99 <= rq["min_cosine"] < 1.0 and rq["min_cosine"] == pytest.approx(lq["min_cosine"], abs=1e-9)
    assert 0.25 < rq["size_ratio"] == lq["size_ratio"] < 0.6
    assert remote.jobs[1]["steps"][0]["metrics"] == local.jobs[1]["steps"][0]["metrics"]  # partition
    # same cache semantics: a second Ray run finds everything cached
    again = run_batch(jobs, workers=2, backend="ray", cache_dir=str(tmp_path / "c-ray"),
                      output_dir=str(tmp_path / "o-ray"), only=["q8", "tp2"])
    assert all(s["status"] == "cached" for j in again.jobs for s in j["steps"])
