"""The batch runner: runs one job's step chain against the cache (in whatever process a backend chose) and,
on the driver side, schedules the jobs through a backend, turns their status files into progress events and
assembles the report.

A job reports its live state in ``<output>/<job>/status.json`` (rewritten atomically after every step), so
backends only need to start :func:`run_job` somewhere that sees the cache and output directories and to
call :meth:`BatchRunner.poll` / :meth:`BatchRunner.finish` while they wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from maia_onnx.batch.cache import Cache, source_hash, step_key, tool_version
from maia_onnx.batch.jobfile import Job, JobFile, is_model_file
from maia_onnx.batch.steps import STEPS, StepInput
from maia_onnx.errors import UserError
from maia_onnx.report import to_jsonable

STATUS = "status.json"
RESULT = "result.json"
REPORT = "report.json"
FINISHED = ("done", "cached", "failed", "skipped")


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(to_jsonable(data), f, indent=2, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- one job


def plan_job(job: Job, cache: Cache, verify: bool = True) -> list[dict]:
    """Keys and cache state of each step, as far as they can be known without running anything."""
    rows = []
    try:
        input_hash: str | None = source_hash(job.model)
    except UserError as exc:
        return [{"step": s.name, "key": None, "state": f"error: {exc}"} for s in job.steps]
    reference_hash = input_hash if is_model_file(job.model) else None
    for step in job.steps:
        if input_hash is None:
            rows.append({"step": step.name, "key": None, "state": "will run (after upstream)"})
            continue
        extra = {"reference": reference_hash} if step.name == "verify" else None
        key = step_key(step, input_hash, extra)
        meta = cache.lookup(key, verify=verify)
        rows.append({"step": step.name, "key": key, "state": "cached" if meta else "will run",
                     "artifact": str(cache.artifact(meta)) if meta else None})
        if step.name != "verify":
            input_hash = meta["content_hash"] if meta else None
        if step.name == "export" and meta:
            reference_hash = meta["content_hash"]
    return rows


def _link(job_dir: Path, index: int, step: str, target: Path) -> str:
    """``<output>/<job>/<i>-<step>`` -> the cached artifact (a relative symlink, swapped in atomically)."""
    link = job_dir / f"{index}-{step}"
    tmp = job_dir / f".{link.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(os.path.relpath(target, job_dir), tmp)
    os.replace(tmp, link)
    return str(link)


def _limit_threads(threads: int | None) -> None:
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:  # otherwise torch reads OMP_NUM_THREADS when the export step imports it
        sys.modules["torch"].set_num_threads(threads)


class _JobRun:
    """State of one job while it runs: its result dict (mirrored to status.json) and its log."""

    def __init__(self, job: Job, cache: Cache, output_root: str, verify_cache: bool, log):
        self.job, self.cache, self.verify_cache, self.log = job, cache, verify_cache, log
        self.dir = Path(output_root) / job.name
        self.started = time.time()
        self.result: dict[str, Any] = {
            "name": job.name, "model": job.model, "status": "running", "error": None, "log": str(self.dir / "log.txt"),
            "started": self.started, "steps": [{"step": s.name, "status": "pending", "options": s.options} for s in job.steps],
        }

    def say(self, msg: str) -> None:
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        self.log.flush()

    def status(self, state: str | None = None) -> None:
        if state:
            self.result["status"] = state
        self.result["duration_s"] = time.time() - self.started
        write_json_atomic(self.dir / STATUS, self.result)

    def fail(self, index: int, why: str) -> dict:
        self.say(traceback.format_exc())
        self.result["error"] = why
        for later in self.result["steps"][index:]:
            if later["status"] in ("pending", "running"):
                later["status"] = "skipped" if later["status"] == "pending" else "failed"
        self.status("failed")
        return self.result

    def run(self) -> dict:
        job = self.job
        self.say(f"job {job.name}: model {job.model}, steps {[s.name for s in job.steps]}, pid {os.getpid()}")
        self.status("running")
        try:
            input_hash = source_hash(job.model)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return self.fail(0, f"{type(exc).__name__}: {first_line(exc)}")
        source: Path | None = Path(job.model) if is_model_file(job.model) else None
        reference, reference_hash = (source, input_hash) if source else (None, None)
        for index, step in enumerate(job.steps):
            row = self.result["steps"][index]
            key = step_key(step, input_hash, {"reference": reference_hash} if step.name == "verify" else None)
            row.update({"key": key, "status": "running"})
            self.status()
            t0 = time.time()
            with self.cache.key_lock(key):
                meta = self.cache.lookup(key, verify=self.verify_cache)
                if meta is not None:
                    row.update({"status": "cached", "metrics": meta.get("metrics", {}), "build_s": meta.get("duration_s")})
                    self.say(f"step {index} {step.name}: cached ({key[:12]})")
                else:
                    self.say(f"step {index} {step.name}: running with {step.options} ({key[:12]})")
                    try:
                        meta = self._build(key, index, input_hash, job.model if step.name == "export" else source,
                                           reference, t0)
                    except Exception as exc:  # noqa: BLE001 - one failing job must not stop the batch
                        row["duration_s"] = time.time() - t0
                        return self.fail(index, f"{step.name}: {type(exc).__name__}: {first_line(exc)}")
                    row.update({"status": "done", "metrics": meta.get("metrics", {})})
                    self.say(f"step {index} {step.name}: done in {time.time() - t0:.2f}s")
            row["duration_s"] = time.time() - t0
            artifact = self.cache.artifact(meta)
            row["artifact"] = str(artifact)
            row["link"] = _link(self.dir, index, step.name, artifact)
            if step.name != "verify":
                source, input_hash = artifact, meta["content_hash"]
            if step.name == "export":
                reference, reference_hash = artifact, meta["content_hash"]
            self.status()
        self.status("ok")
        self.say(f"job {job.name}: ok in {self.result['duration_s']:.2f}s")
        return self.result

    def _build(self, key: str, index: int, input_hash: str, source, reference: Path | None, t0: float) -> dict:
        step = self.job.steps[index]
        with self.cache.building(key) as work:
            # the step's own stdout/stderr chatter goes to the job log (the terminal shows progress)
            with contextlib.redirect_stdout(self.log), contextlib.redirect_stderr(self.log):
                out = STEPS[step.name].run(StepInput(source, work, input_hash, reference), dict(step.options))
            return self.cache.commit(key, work, {
                "step": step.name, "options": step.options, "input_hash": input_hash, "tool": tool_version(),
                "artifact": out.artifact, "metrics": to_jsonable(out.metrics), "duration_s": time.time() - t0,
                "job": self.job.name,
            })


def run_job(job_data: dict, cache_root: str, output_root: str, threads: int | None = None,
            verify_cache: bool = True) -> dict:
    """Run one job's steps in order (in this process); never raises: failures land in the result."""
    job = Job.from_dict(job_data)
    _limit_threads(threads)
    cache = Cache(cache_root)
    cache.ensure()
    job_dir = Path(output_root) / job.name
    job_dir.mkdir(parents=True, exist_ok=True)
    with open(job_dir / "log.txt", "a") as log:
        return _JobRun(job, cache, output_root, verify_cache, log).run()


# ---------------------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class JobUpdate:
    """A progress event: a job's state changed (a step finished or started, or the job ended)."""

    job: str
    status: str  # running, ok, failed
    finished: int  # steps of this job that are done, cached, failed or skipped
    total: int  # steps of this job
    running: str | None  # the step running now
    batch_total: int  # steps of every job in the batch


@dataclass
class BatchReport:
    jobs: list[dict]
    duration_s: float
    backend: str
    workers: int
    cache_dir: str
    output_dir: str

    @property
    def failed(self) -> list[dict]:
        return [j for j in self.jobs if j.get("status") != "ok"]

    def to_dict(self) -> dict:
        return {"jobs": self.jobs, "duration_s": self.duration_s, "backend": self.backend, "workers": self.workers,
                "cache_dir": self.cache_dir, "output_dir": self.output_dir,
                "ok": len(self.jobs) - len(self.failed), "failed": len(self.failed)}


class Backend(Protocol):
    name: str

    def run(self, runner: "BatchRunner") -> list[dict]:
        """Run every job of ``runner`` (calling its poll/finish while waiting); results in job order."""


class BatchRunner:
    """Runs the jobs of a parsed job file through a backend and reports progress through ``on_update``."""

    def __init__(self, spec: JobFile, jobs: Sequence[Job], workers: int = 1, verify_cache: bool = True,
                 on_update: Callable[[JobUpdate], None] | None = None):
        if workers < 1:
            raise UserError(f"-j {workers} is invalid: use 1 or more workers")
        self.spec, self.jobs, self.workers, self.verify_cache = spec, list(jobs), workers, verify_cache
        self.on_update = on_update
        self.cache_root, self.output_root = spec.cache_dir, spec.output_dir
        self._steps = {j.name: len(j.steps) for j in self.jobs}
        self._total = sum(self._steps.values())
        self._seen: dict[str, tuple] = {}

    def job_args(self, job: Job, threads: int | None) -> tuple:
        """The arguments of :func:`run_job` for ``job`` (plain data: they cross process boundaries)."""
        return job.to_dict(), str(self.cache_root), str(self.output_root), threads, self.verify_cache

    def status_of(self, name: str) -> dict | None:
        return read_json(self.output_root / name / STATUS)

    def poll(self, name: str) -> None:
        """Read a running job's status file and emit an update when it changed."""
        self._emit(name, self.status_of(name))

    def finish(self, name: str, result: dict) -> dict:
        self._emit(name, result)
        return result

    def lost(self, name: str, why: str) -> dict:
        """The result of a job whose worker died: its last known state, the running step failed."""
        state = self.status_of(name) or {"name": name, "steps": []}
        running = next((s["step"] for s in state.get("steps", []) if s.get("status") == "running"), "setup")
        result = {**state, "status": "failed", "error": f"{why} during {running}"}
        for s in result.get("steps", []):
            if s.get("status") in ("running", "pending"):
                s["status"] = "failed" if s["status"] == "running" else "skipped"
        return self.finish(name, result)

    def _emit(self, name: str, state: dict | None) -> None:
        if self.on_update is None or state is None:
            return
        steps = state.get("steps", [])
        finished = sum(1 for s in steps if s.get("status") in FINISHED)
        running = next((s["step"] for s in steps if s.get("status") == "running"), None)
        signature = (finished, running, state.get("status"))
        if self._seen.get(name) == signature:
            return
        self._seen[name] = signature
        self.on_update(JobUpdate(name, state.get("status", ""), finished, self._steps[name], running, self._total))

    def run(self, backend: Backend) -> BatchReport:
        """Prepare the cache and output, run every job (failures are isolated), write ``report.json``."""
        cache = Cache(self.cache_root)
        cache.ensure()
        cache.clean_stale()
        self.output_root.mkdir(parents=True, exist_ok=True)
        for job in self.jobs:  # a stale result from an earlier run must not be mistaken for this one's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.output_root / job.name / RESULT)
        t0 = time.time()
        results = backend.run(self)
        report = BatchReport(results, time.time() - t0, backend.name, self.workers, str(self.cache_root),
                             str(self.output_root))
        write_json_atomic(self.output_root / REPORT, report.to_dict())
        return report
