"""Ray batch backend: the same run_job per job as Ray tasks (1 CPU each), same cache and report.

The cache and output directories must be on storage every Ray node sees (a shared filesystem); progress is
read from the jobs' status files there, exactly as for the local backend.
"""

from __future__ import annotations

import time

from maia_onnx.batch.runner import BatchRunner, first_line, run_job
from maia_onnx.errors import UserError
from maia_onnx.extras import require


def _import_ray():
    return require("ray", "ray", "--backend ray")  # optional heavy extra: imported only when this backend runs


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address  # None: start (and shut down) a local Ray instance for the run

    def run(self, runner: BatchRunner) -> list[dict]:
        ray = _import_ray()
        started_here = False
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False, include_dashboard=False)
                else:
                    ray.init(num_cpus=runner.workers, log_to_driver=False, include_dashboard=False)
            except Exception as exc:  # noqa: BLE001 - connection problems become one line
                raise UserError(f"cannot start/connect Ray ({type(exc).__name__}: {first_line(exc)}); "
                                f"check --address or run 'ray start --head'") from exc
            started_here = True
        try:
            return self._run(ray, runner)
        finally:
            if started_here:
                ray.shutdown()

    @staticmethod
    def _run(ray, runner: BatchRunner) -> list[dict]:
        task = ray.remote(num_cpus=1, max_retries=0)(run_job)
        cluster_cpus = int(ray.cluster_resources().get("CPU", runner.workers) or runner.workers)
        threads = 1 if cluster_cpus <= runner.workers else None
        pending = {job.name: task.remote(*runner.job_args(job, threads)) for job in runner.jobs}
        results: dict[str, dict] = {}
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0.2)
            ready_set = set(ready)
            for name, ref in list(pending.items()):
                runner.poll(name)
                if ref not in ready_set:
                    continue
                try:
                    results[name] = runner.finish(name, ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - a dead worker fails its job only
                    results[name] = runner.lost(name, f"ray task failed: {type(exc).__name__}: {first_line(exc)}")
                del pending[name]
            if pending and not ready:
                time.sleep(0.05)
        return [results[job.name] for job in runner.jobs]
