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

from _benchutil import LARGE_MODEL as LARGE
from _benchutil import ROOT


def allreduce_sweep_worker() -> None:
    """torchrun body: time gloo all-reduces of growing size between the ranks; rank 0 prints JSON rows."""
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rows = []
    for size in [2**k for k in range(10, 25, 2)]:  # 1 KiB .. 16 MiB of float32
        t = torch.ones(size // 4)
        for _ in range(3):
            dist.all_reduce(t)
        reps = 20 if size <= 2**20 else 5
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        rows.append({"bytes": size, "s": (time.perf_counter() - t0) / reps})
    if dist.get_rank() == 0:
        print("SWEEP " + json.dumps(rows))
    dist.destroy_process_group()


def fit_link(rows, ranks: int = 2) -> tuple[float, float]:
    """Least-squares alpha (s per ring step) and bandwidth (B/s) of perfmodel's ring all-reduce formula."""
    import numpy as np

    steps = 2 * (ranks - 1)
    x = np.array([[steps, steps / ranks * r["bytes"]] for r in rows])
    y = np.array([r["s"] for r in rows])
    (alpha, inv_bw), *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(alpha), float(1.0 / inv_bw)


def link_sweep() -> dict:
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           __file__, "--allreduce-sweep-worker"], capture_output=True, text=True, env=env, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SWEEP ")), None)
    if line is None:
        raise RuntimeError(f"all-reduce sweep failed: {proc.stderr[-2000:]}")
    rows = json.loads(line[6:])
    alpha, bw = fit_link(rows)
    return {"rows": rows, "alpha_s": alpha, "bandwidth_Bps": bw}


def main(argv=None) -> int:
    if argv is None and "--allreduce-sweep-worker" in sys.argv:
        allreduce_sweep_worker()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layouts", default="tp2,pp2")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--link-sweep", action="store_true", help="also time gloo all-reduces 1 KiB..16 MiB and fit alpha/bandwidth")
    args = ap.parse_args(argv)
    if not LARGE.exists():
        print(f"bench_distributed: {LARGE} is missing; run scripts/make_large_models.py first")
        return 0

    import numpy as np

    from maia_onnx.io import load_model
    from maia_onnx.ortutil import make_inputs
    from maia_onnx.partition import partition_model
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
    link = None
    if args.link_sweep:
        from maia_onnx.runtime.perfmodel import allreduce_time
        from maia_onnx.runtime.profiles import load_interconnect

        link = link_sweep()
        profile = load_interconnect("loopback")
        rows = [{"bytes": r["bytes"], "measured_s": r["s"],
                 "loopback_profile_s": allreduce_time(r["bytes"], 2, profile.bandwidth, profile.alpha),
                 "fitted_s": allreduce_time(r["bytes"], 2, link["bandwidth_Bps"], link["alpha_s"])} for r in link["rows"]]
        print_table(rows, list(rows[0]), title="gloo all-reduce, 2 ranks on this host")
        print(f"fitted: alpha {link['alpha_s'] * 1e6:.1f} us per ring step, bandwidth {link['bandwidth_Bps'] / 1e9:.2f} GB/s "
              f"(profile: {profile.alpha * 1e6:.0f} us, {profile.bandwidth / 1e9:.1f} GB/s)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"runs": results, "link_sweep": link}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
