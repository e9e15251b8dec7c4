"""Batch conversion jobs: a job file of step chains, run in parallel with a crash-safe content-addressed cache.

Modules: ``jobfile`` (schema and validation), ``steps`` (the step registry over the public verbs),
``cache`` (content hashes and the object store), ``runner`` (one job's chain; the driver that schedules jobs
through a backend and emits progress events), ``backends`` (``local`` processes, ``ray`` tasks) and ``api``
(``run_batch``, ``dry_run``). Schema and semantics: docs/batch.md.
"""

from __future__ import annotations

from maia_onnx.batch.api import dry_run, run_batch
from maia_onnx.batch.cache import Cache, object_hash, source_hash, step_key, tree_hash
from maia_onnx.batch.jobfile import Job, JobFile, JobFileError, Step, parse_job_file
from maia_onnx.batch.runner import BatchReport, BatchRunner, JobUpdate, plan_job, run_job
from maia_onnx.batch.steps import STEPS, StepFailed

__all__ = ["STEPS", "BatchReport", "BatchRunner", "Cache", "Job", "JobFile", "JobFileError", "JobUpdate", "Step",
           "StepFailed", "dry_run", "object_hash", "parse_job_file", "plan_job", "run_batch", "run_job",
           "source_hash", "step_key", "tree_hash"]
