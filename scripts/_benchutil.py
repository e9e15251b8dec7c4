"""Shared helpers of the scripts/bench_*.py benchmarks: the multi-GB model's path, peak-RSS sampling, timing, copying.

Imported as ``from _benchutil import ...`` (the scripts run as ``python scripts/bench_x.py``, so scripts/ is on sys.path).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LARGE_DIR = ROOT / ".cache" / "llama-large"
LARGE_MODEL = LARGE_DIR / "model.onnx"  # made once by scripts/make_large_models.py; benchmarks never copy it


class PeakRss:
    """Samples this process's RSS in a thread: ``peak`` is the maximum seen and ``seconds`` the wall time while active."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self.interval = interval
        self.peak = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def max_rss_bytes() -> int:
    """The process's peak RSS so far (getrusage; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best_of(fn, repeat: int = 5) -> float:
    """The fastest of ``repeat`` timed calls of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def settle() -> None:
    """Wait (untimed) until no write-back from an earlier step is in flight (sync; Linux/Unix only)."""
    if hasattr(os, "sync"):
        os.sync()


def copy_model(model: Path, dest_dir: Path) -> float:
    """Copy model.onnx and its model.onnx.data (if any) into dest_dir with shutil; returns the seconds taken."""
    start = time.perf_counter()
    for f in (model, model.parent / f"{model.name}.data"):
        if f.exists():
            shutil.copyfile(f, dest_dir / f.name)
    return time.perf_counter() - start


def add_large_model_args(parser, keep_help: str) -> None:
    """--model (default: the multi-GB llama), --workdir and --keep, as the large-model benchmarks take them."""
    parser.add_argument("--model", type=Path, default=LARGE_MODEL)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir beside the model)")
    parser.add_argument("--keep", action="store_true", help=keep_help)


def model_missing(model: Path) -> bool:
    """True (after saying how to make it) when the benchmark's model is not there."""
    if model.exists():
        return False
    print(f"{model} not found: run scripts/make_large_models.py first", file=sys.stderr)
    return True


@contextlib.contextmanager
def scratch_dir(prefix: str, model: Path, workdir: Path | None, keep: bool):
    """A fresh temp dir (in ``workdir``, else beside the model's folder) removed afterwards unless ``keep``."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir or model.parent.parent))
    try:
        yield work
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


def run_measured(cmd: list[str], work: Path, tag: str) -> tuple[float, int, str]:
    """Run ``cmd`` in a child process: (wall seconds, the child's own peak RSS in bytes, its stdout).

    ``os.wait4`` reports the child's ru_maxrss (KiB on Linux), so the figure is the command's alone.
    A non-zero exit raises with the tail of its stderr."""
    import subprocess

    out_txt, err_txt = work / f"{tag}-stdout.txt", work / f"{tag}-stderr.txt"
    t0 = time.perf_counter()
    with open(out_txt, "wb") as fo, open(err_txt, "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{tag} failed: {err_txt.read_text()[-500:]}")
    return wall, usage.ru_maxrss * 1024, out_txt.read_text()
