#!/usr/bin/env python
"""Benchmark: pipeline partition, re-shard from shards and safetensors checkpoints of the multi-GB llama.

Reference in the same process: copying model.onnx + model.onnx.data (shutil; the faster of a copy before
and after, so page-cache warmth favours the reference). Measured against it:
  1. partition --pp 2 (flops balance)                       -> time ratio, peak RSS, stage loads / imbalance
  2. reshard PP2 -> TP2 x PP2 from the shards alone          -> time ratio, peak RSS
  3. checkpoint: save the PP2 weights as safetensors, load them back into a partition -> time ratios
Peak RSS is sampled every 10 ms and reported relative to the model's weight bytes.

    python scripts/bench_pp.py [--model .cache/llama-large/model.onnx] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from _benchutil import PeakRss, add_large_model_args, copy_model, current_rss_bytes, model_missing, scratch_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_large_model_args(ap, keep_help="keep the partition directories")
    args = ap.parse_args(argv)
    if model_missing(args.model):
        return 2
    from maia_onnx.io import initializer_bytes, load_model
    from maia_onnx.partition import load_checkpoint, partition_model, save_checkpoint
    from maia_onnx.partition.reshard import reshard

    weight_bytes = initializer_bytes(load_model(args.model))
    result: dict = {"model": str(args.model), "weight_bytes": weight_bytes}
    with scratch_dir("bench_pp.", args.model, args.workdir, args.keep) as work:
        copy_dir = work / "copy"
        copy_dir.mkdir()
        copy1 = copy_model(args.model, copy_dir)
        shutil.rmtree(copy_dir)
        result["rss_before_bytes"] = current_rss_bytes()

        with PeakRss() as pp_rss:
            _, plan = partition_model(load_model(args.model), work / "pp2", pp=2, balance="flops")
        with PeakRss() as rs_rss:
            manifest, _ = reshard(work / "pp2", work / "tp2pp2", tp=2, pp=2)
        with PeakRss() as ck_rss:
            save_checkpoint(work / "pp2", work / "ckpt")
        shutil.rmtree(work / "tp2pp2")  # disk: keep at most three copies of the weights around
        with PeakRss() as ld_rss:
            load_checkpoint(work / "pp2", work / "ckpt", work / "pp2_loaded")
        copy_dir.mkdir()
        copy2 = copy_model(args.model, copy_dir)
        copy = min(copy1, copy2)
        result.update(
            {
                "copy_seconds": [round(copy1, 3), round(copy2, 3)],
                "pp2": {
                    "seconds": round(pp_rss.seconds, 3),
                    "time_ratio_vs_copy": round(pp_rss.seconds / copy, 3),
                    "peak_rss_bytes": pp_rss.peak,
                    "peak_rss_ratio_vs_weights": round(pp_rss.peak / weight_bytes, 4),
                    "stage_loads_flops": plan.loads,
                    "imbalance_pct": round(plan.imbalance_pct, 2),
                    "boundaries": plan.boundaries,
                },
                "reshard_pp2_to_tp2pp2": {
                    "seconds": round(rs_rss.seconds, 3),
                    "time_ratio_vs_copy": round(rs_rss.seconds / copy, 3),
                    "peak_rss_bytes": rs_rss.peak,
                    "peak_rss_ratio_vs_weights": round(rs_rss.peak / weight_bytes, 4),
                    "collectives": len(manifest.collectives),
                },
                "checkpoint_save": {"seconds": round(ck_rss.seconds, 3), "time_ratio_vs_copy": round(ck_rss.seconds / copy, 3),
                                    "peak_rss_ratio_vs_weights": round(ck_rss.peak / weight_bytes, 4)},
                "checkpoint_load": {"seconds": round(ld_rss.seconds, 3), "time_ratio_vs_copy": round(ld_rss.seconds / copy, 3),
                                    "peak_rss_ratio_vs_weights": round(ld_rss.peak / weight_bytes, 4)},
            }
        )
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
