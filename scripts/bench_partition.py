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
import shutil
import sys

from _benchutil import PeakRss, add_large_model_args, copy_model, current_rss_bytes, model_missing, scratch_dir, settle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_large_model_args(ap, keep_help="keep the partition directory")
    ap.add_argument("--tp", type=int, default=4)
    args = ap.parse_args(argv)
    if model_missing(args.model):
        return 2
    from maia_onnx.io import initializer_bytes, load_model
    from maia_onnx.partition import partition_file

    weight_bytes = initializer_bytes(load_model(args.model))
    with scratch_dir("bench_partition.", args.model, args.workdir, args.keep) as work:
        copy_dir = work / "copy"
        copy_dir.mkdir()
        copy1 = copy_model(args.model, copy_dir)
        shutil.rmtree(copy_dir)
        copy_dir.mkdir()
        settle()  # the deleted copy's write-back, if any, must not land inside the partition's timing
        base_rss = current_rss_bytes()
        with PeakRss() as rss:
            manifest = partition_file(args.model, work / f"tp{args.tp}", tp=args.tp)
        seconds = rss.seconds
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
