#!/usr/bin/env python
"""Calibration point for the collective cost model: TP2 and PP2 of the large llama under torchrun (gloo, loopback).

Partitions ``.cache/llama-large/model.onnx`` (made once by scripts/make_large_models.py) into
``.cache/dist-bench/{tp2,pp2}`` if not there yet, runs each with one process per rank, barriers before every
collective (``--sync-collectives``) so the measured time is the transfer itself, and prints measured collective
time next to what ``runtime/perfmodel`` (the model ``maia-onnx analyze`` uses) predicts for the same collectives
on the ``loopback`` interconnect profile.

    python scripts/bench_distributed.py [--seq 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LARGE = ROOT / ".cache" / "llama-large" / "model.onnx"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layouts", default="tp2,pp2")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    if not LARGE.exists():
        print(f"bench_distributed: {LARGE} is missing; run scripts/make_large_models.py first")
        return 0

    import numpy as np

    from maia_onnx.io import load_model
    from maia_onnx.ortutil import make_inputs
    from maia_onnx.passes.pipeline_parallel import partition_model
    from maia_onnx.runtime.distributed import launch

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        feeds = make_inputs(load_model(LARGE), seed=0, dims={"batch": args.batch, "seq": args.seq, "past": 0})
        inputs = Path(tmp) / "in.npz"
        np.savez(inputs, **feeds)
        for layout in args.layouts.split(","):
            tp = int(layout[2:]) if layout.startswith("tp") else 1
            pp = int(layout[2:]) if layout.startswith("pp") else 1
            directory = ROOT / ".cache" / "dist-bench" / layout
            if not (directory / "manifest.json").exists():
                t0 = time.perf_counter()
                partition_model(load_model(LARGE), directory, tp=tp, pp=pp)
                print(f"partitioned {layout} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            t0 = time.perf_counter()
            report = launch(directory, inputs, None, timeout=args.timeout, interconnect="loopback", sync_collectives=True)
            wall = time.perf_counter() - t0
            for r in sorted(report["ranks"], key=lambda r: r["rank"]):
                results.append({
                    "layout": layout, "rank": r["rank"], "stage": r["stage"], "compute_s": r["compute_s"],
                    "collectives": r["collectives"], "collective_MB": r["collective_bytes"] / 1e6,
                    "measured_coll_s": r["collective_s"], "predicted_coll_s": r["predicted_collective_s"],
                    "measured/predicted": (r["collective_s"] / r["predicted_collective_s"]) if r["predicted_collective_s"] else None,
                    "skew_s": r["skew_s"], "p2p_MB": r["p2p_bytes"] / 1e6, "wait_s": r["wait_s"], "run_wall_s": wall,
                })
    from maia_onnx.report import print_table

    print_table(results, list(results[0]), title=f"torchrun gloo loopback, llama-large prefill batch {args.batch} seq {args.seq}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
