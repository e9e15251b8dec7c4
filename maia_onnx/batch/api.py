"""The batch entry points: parse a job file, run it on a backend (``run_batch``) or show its plan (``dry_run``)."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from maia_onnx.batch.backends import make_backend
from maia_onnx.batch.cache import Cache
from maia_onnx.batch.jobfile import parse_job_file
from maia_onnx.batch.runner import BatchReport, BatchRunner, JobUpdate, plan_job
from maia_onnx.errors import UserError


def run_batch(job_file: str | os.PathLike, workers: int = 1, backend: str = "local", address: str | None = None,
              cache_dir: str | None = None, output_dir: str | None = None, verify_cache: bool = True,
              only: Sequence[str] | None = None, on_update: Callable[[JobUpdate], None] | None = None) -> BatchReport:
    """Parse the job file, run every job (failures are isolated) and write ``<output>/report.json``.

    ``on_update`` receives a :class:`JobUpdate` whenever a job's state changes (the CLI draws progress
    bars from them); ``only`` restricts the run to these job names.
    """
    spec = parse_job_file(job_file, cache_dir, output_dir)
    jobs = [j for j in spec.jobs if not only or j.name in only]
    if only and len(jobs) != len(set(only)):
        missing = sorted(set(only) - {j.name for j in jobs})
        raise UserError(f"--job {missing[0]!r} is not in {spec.path.name} (jobs: {', '.join(j.name for j in spec.jobs)})")
    runner = BatchRunner(spec, jobs, workers, verify_cache, on_update)
    return runner.run(make_backend(backend, address))


def dry_run(job_file: str | os.PathLike, cache_dir: str | None = None, output_dir: str | None = None) -> dict:
    """The plan: each job's steps with their cache keys and whether they are cached or will run."""
    spec = parse_job_file(job_file, cache_dir, output_dir)
    cache = Cache(spec.cache_dir)
    return {"cache_dir": str(spec.cache_dir), "output_dir": str(spec.output_dir),
            "jobs": [{"name": j.name, "model": j.model, "steps": plan_job(j, cache)} for j in spec.jobs]}
