#!/usr/bin/env python
"""Benchmark: partition the multi-GB llama into TP ranks vs copying its weight files, with peak RSS.

Reference run in the same process: copy model.onnx + model.onnx.data (shutil, the fastest plain copy), delete
it and ``sync`` (untimed, so the deleted copy's write-back cannot land inside the next timing), partition into
``--tp`` ranks, then copy again (the faster copy is the reference, so page-cache warmth favours the
reference, not us). RSS is sampled every 10 ms during the partition.

    python scripts/bench_partition.py [--model .cache/llama-large/model.onnx] [--tp 4] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".cache" / "llama-large" / "model.onnx"


class PeakRss:
    """Samples this process's RSS in a thread; ``peak`` is the maximum seen while active."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def settle() -> None:
    """Wait (untimed) until no write-back from an earlier step is in flight (sync; Linux/Unix only)."""
    if hasattr(os, "sync"):
        os.sync()


def copy_model(model: Path, dest_dir: Path) -> float:
    start = time.perf_counter()
    for f in (model, model.parent / f"{model.name}.data"):
        if f.exists():
            shutil.copyfile(f, dest_dir / f.name)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir beside the model)")
    ap.add_argument("--keep", action="store_true", help="keep the partition directory")
    args = ap.parse_args(argv)
    if not args.model.exists():
        print(f"{args.model} not found: run scripts/make_large_models.py first", file=sys.stderr)
        return 2
    from maia_onnx.io import initializer_bytes, load_model
    from maia_onnx.partition import partition_file

    weight_bytes = initializer_bytes(load_model(args.model))
    work = Path(tempfile.mkdtemp(prefix="bench_partition.", dir=args.workdir or args.model.parent.parent))
    try:
        copy_dir = work / "copy"
        copy_dir.mkdir()
        copy1 = copy_model(args.model, copy_dir)
        shutil.rmtree(copy_dir)
        copy_dir.mkdir()
        settle()  # the deleted copy's write-back, if any, must not land inside the partition's timing
        base_rss = psutil.Process().memory_info().rss
        with PeakRss() as rss:
            start = time.perf_counter()
            manifest = partition_file(args.model, work / f"tp{args.tp}", tp=args.tp)
            seconds = time.perf_counter() - start
        copy2 = copy_model(args.model, copy_dir)
        copy = min(copy1, copy2)
        shard_bytes = [r["weight_bytes"] for r in manifest.ranks]
        result = {
            "model": str(args.model),
            "tp": args.tp,
            "weight_bytes": weight_bytes,
            "copy_seconds": [round(copy1, 3), round(copy2, 3)],
            "partition_seconds": round(seconds, 3),
            "time_ratio_vs_copy": round(seconds / copy, 3),
            "peak_rss_bytes": rss.peak,
            "rss_before_bytes": base_rss,
            "peak_rss_ratio_vs_weights": round(rss.peak / weight_bytes, 4),
            "rank_weight_bytes": shard_bytes,
            "rank_share_of_weights": [round(b / weight_bytes, 4) for b in shard_bytes],
            "collectives": len(manifest.collectives),
            "targets": {"time_ratio_max": 2.0, "peak_rss_ratio_max": 0.25},
        }
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
