"""Local batch backend: each job in its own worker process, at most ``workers`` at a time.

Workers start from a forkserver (no torch/ORT thread pools inherited through fork), a crashing job fails
alone, and on Linux every worker dies with the batch process (PR_SET_PDEATHSIG) so a kill leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing import connection as mp_connection
from pathlib import Path

from maia_onnx.batch.runner import RESULT, BatchRunner, first_line, read_json, run_job, write_json_atomic

# imported once in the forkserver and inherited by every worker (saves ~1 s of imports per job)
PRELOAD = ["maia_onnx.batch.backends.local", "numpy", "onnx", "onnx_ir", "onnxruntime"]


def _worker_main(job_data: dict, cache_root: str, output_root: str, threads: int | None, verify_cache: bool) -> None:
    _die_with_parent()
    try:
        result = run_job(job_data, cache_root, output_root, threads, verify_cache)
    except BaseException as exc:  # noqa: BLE001 - last resort: still leave a result
        result = {"name": job_data["name"], "status": "failed", "error": f"{type(exc).__name__}: {first_line(exc)}",
                  "steps": []}
    write_json_atomic(Path(output_root) / job_data["name"] / RESULT, result)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the batch process dies, so a killed run leaves no orphans."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LocalBackend:
    name = "local"

    def run(self, runner: BatchRunner) -> list[dict]:
        linux = sys.platform.startswith("linux")
        ctx = mp.get_context("forkserver" if linux else "spawn")
        if linux:
            ctx.set_forkserver_preload(PRELOAD)
        threads = max(1, _cpus() // runner.workers)
        pending = list(runner.jobs)
        running: dict[str, mp.process.BaseProcess] = {}
        results: dict[str, dict] = {}
        try:
            while pending or running:
                while pending and len(running) < runner.workers:
                    job = pending.pop(0)
                    proc = ctx.Process(target=_worker_main, name=f"maia-batch-{job.name}",
                                       args=runner.job_args(job, threads))
                    proc.start()
                    running[job.name] = proc
                # wake as soon as a worker exits (to start the next job at once), else every 0.2 s for progress
                mp_connection.wait([proc.sentinel for proc in running.values()], timeout=0.2)
                for name, proc in list(running.items()):
                    runner.poll(name)
                    if proc.exitcode is None:
                        continue
                    proc.join()
                    result = read_json(runner.output_root / name / RESULT)
                    if result is None:
                        results[name] = runner.lost(name, f"worker died (exit code {proc.exitcode})")
                    else:
                        results[name] = runner.finish(name, result)
                    del running[name]
        finally:
            for proc in running.values():  # interrupted: stop our own workers
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        return [results[j.name] for j in runner.jobs]
