"""Benchmark `maia-onnx batch`: wall time of 8 small conversion jobs with -j 2 as a ratio of -j 1.

Each round runs the same job file into a fresh cache with -j 1 and then -j 2 (alternating, so drift in
machine load hits both); the figure is the median ratio over rounds. Usage:

    python scripts/bench_batch.py [--rounds 2] [--model path/to/llama-tiny.onnx]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from maia_onnx.batch import run_batch
from maia_onnx.export import export_builtin

JOBS = """
defaults:
  verify: {{min_cosine: 0.95}}
jobs:
  - {{name: e4m3-ch, model: {m}, steps: [{{quantize: {{format: fp8-e4m3, granularity: channel}}}}, verify]}}
  - {{name: e4m3-t, model: {m}, steps: [{{quantize: {{format: fp8-e4m3, granularity: tensor}}}}, verify]}}
  - {{name: e5m2, model: {m}, steps: [{{quantize: {{format: fp8-e5m2}}}}, verify]}}
  - {{name: bf16, model: {m}, steps: [{{quantize: {{format: bf16}}}}, verify]}}
  - {{name: tp2, model: {m}, steps: [{{partition: {{tp: 2}}}}, verify]}}
  - {{name: pp2, model: {m}, steps: [{{partition: {{pp: 2}}}}, verify]}}
  - {{name: e4m3-tp2, model: {m}, steps: [{{quantize: {{format: fp8-e4m3, seed: 1}}}}, {{partition: {{tp: 2}}}}, verify]}}
  - {{name: maia100, model: {m}, steps: [{{compile: {{device: maia100}}}}, verify]}}
"""

# 8 exports of llama-tiny with different seeds (different weights, so nothing is shared through the cache)
EXPORT_JOBS = "jobs:\n" + "".join(
    f"  - {{name: export-s{i}, model: llama-tiny, steps: [{{export: {{seed: {i}}}}}, verify]}}\n" for i in range(8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="an exported llama-tiny (default: export one now)")
    parser.add_argument("--kind", choices=["convert", "export"], default="convert",
                        help="convert: quantize/partition/compile an exported model; export: 8 exports from PyTorch")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        model = Path(args.model) if args.model else root / "llama-tiny.onnx"
        if not args.model and args.kind == "convert":
            export_builtin("llama-tiny", model)
        jobs = root / "jobs.yaml"
        jobs.write_text(JOBS.format(m=model.resolve()) if args.kind == "convert" else EXPORT_JOBS)
        times: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for workers in (1, 2):
                t0 = time.perf_counter()
                report = run_batch(jobs, workers=workers, cache_dir=str(root / f"cache-{r}-{workers}"),
                                   output_dir=str(root / f"out-{r}-{workers}"))
                elapsed = time.perf_counter() - t0
                assert not report.failed, [j["error"] for j in report.failed]
                assert all(s["status"] == "done" for j in report.jobs for s in j["steps"])
                times[workers].append(elapsed)
                print(f"round {r}: -j {workers}: {elapsed:.2f} s ({len(report.jobs)} jobs)", flush=True)
        ratios = [b / a for a, b in zip(times[1], times[2])]
        print(f"-j 1 median {statistics.median(times[1]):.2f} s, -j 2 median {statistics.median(times[2]):.2f} s, "
              f"ratio -j2/-j1 median {statistics.median(ratios):.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
