"""Ray backend for `maia-onnx batch`: the same run_job per job as Ray tasks, same cache and report.

The cache and output directories must be on storage every Ray node sees (a shared filesystem);
progress is read from the jobs' status files there, exactly as for the local backend.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from maia_onnx.errors import UserError


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise UserError("--backend ray needs Ray: pip install 'maia-onnx[ray]'") from exc
    return ray


def run_ray(jobs: Sequence, cache_root: Path, output_root: Path, workers: int, progress=None,
            address: str | None = None, verify_cache: bool = True) -> list[dict]:
    """Run every job as a Ray task (1 CPU each); starts a local Ray instance when no address is given."""
    from maia_onnx.batch import STATUS, _read_json, run_job

    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False, include_dashboard=False)
            else:
                ray.init(num_cpus=max(1, workers), log_to_driver=False, include_dashboard=False)
        except Exception as exc:  # noqa: BLE001 - connection problems become one line
            raise UserError(f"cannot start/connect Ray ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            f"check --address or run 'ray start --head'") from exc
        started_here = True
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(run_job)
        cluster_cpus = int(ray.cluster_resources().get("CPU", workers) or workers)
        threads = 1 if cluster_cpus <= workers else None
        refs = {job.name: task.remote(job.to_dict(), str(cache_root), str(output_root), threads, verify_cache)
                for job in jobs}
        steps_of = {job.name: len(job.steps) for job in jobs}
        results: dict[str, dict] = {}
        pending = dict(refs)
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0.2)
            ready_set = set(ready)
            for name, ref in list(pending.items()):
                if progress:
                    progress.update(name, _read_json(Path(output_root) / name / STATUS), steps_of[name])
                if ref not in ready_set:
                    continue
                try:
                    results[name] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a dead worker fails its job only
                    state = _read_json(Path(output_root) / name / STATUS) or {"name": name, "steps": []}
                    results[name] = {**state, "status": "failed",
                                     "error": f"ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                if progress:
                    progress.update(name, results[name], steps_of[name])
                del pending[name]
            if pending and not ready:
                time.sleep(0.05)
        return [results[job.name] for job in jobs]
    finally:
        if started_here:
            ray.shutdown()
