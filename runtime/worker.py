"""Per-process entry point for torchrun: ``torchrun --nproc-per-node N -m maia_onnx.runtime.worker DIR --inputs x.npz``.

Runs this process's rank/stage of a partition directory (see ``maia_onnx.runtime.distributed``); rank 0 writes
the unsharded outputs (``--save-outputs``), prints the per-rank timing table (or ``--json``) and writes
``--report``.  Any failure prints one line ``maia-onnx worker rank R: <cause>`` to stderr and exits non-zero,
which makes torchrun stop the other ranks.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m maia_onnx.runtime.worker", description=__doc__.splitlines()[0])
    p.add_argument("directory", help="partition directory (manifest.json + rank{t}_stage{s}.onnx)")
    p.add_argument("--inputs", required=True, help="full (unsharded) inputs, .npz with one array per graph input")
    p.add_argument("--save-outputs", default=None, help="rank 0 writes the unsharded outputs here (.npz)")
    p.add_argument("--microbatches", type=int, default=1, help="pipeline microbatches for the first step")
    p.add_argument("--decode-steps", type=int, default=0, help="greedy decode steps after the prefill (KV cache)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any collective or receive may take")
    p.add_argument("--report", default=None, help="rank 0 writes the JSON timing report here")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--interconnect", default="loopback",
                   help="link profile to predict the collective time with (runtime/interconnects), '' for none")
    p.add_argument("--sync-collectives", action="store_true",
                   help="calibration: barrier before each collective so its time is the transfer alone (skew_s apart)")
    return p.parse_args(argv)


def timing_rows(timings):
    keys = ["rank", "tp_rank", "stage", "compute_s", "collective_s", "collective_bytes", "collectives", "skew_s", "wait_s",
            "send_s", "p2p_bytes", "total_s", "predicted_collective_s"]
    return [{k: t[k] for k in keys} for t in sorted(timings, key=lambda t: t["rank"])]


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the torchrun agent that started us exits, so no rank outlives a failed run
    (torchrun starts workers in their own sessions; a rank stuck in a C call may ignore its SIGTERM)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: torchrun's own SIGTERM is all we have
        pass


def main(argv=None) -> int:
    args = _parse(argv)
    rank = os.environ.get("RANK", "?")
    _die_with_parent()
    try:
        import numpy as np

        from maia_onnx.runtime.distributed import run_worker

        with np.load(args.inputs, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
        outputs, timings = run_worker(args.directory, feeds, args.microbatches, args.decode_steps, args.timeout,
                                        args.interconnect or None, args.sync_collectives)
        if outputs is not None:
            from maia_onnx.io import atomic_write, write_text_atomic
            from maia_onnx.report import dumps, print_table

            if args.save_outputs:
                with atomic_write(args.save_outputs, "wb") as fh:
                    np.savez(fh, **outputs)
            report = {"directory": str(args.directory), "microbatches": args.microbatches,
                      "decode_steps": args.decode_steps, "outputs": sorted(outputs), "ranks": timings}
            if args.report:
                write_text_atomic(args.report, dumps(report))
            if args.json:
                print(dumps(report))
            else:
                print_table(timing_rows(timings), list(timing_rows(timings)[0]), title="per-rank timing (seconds, bytes)")
        return 0
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # one line naming this rank; torchrun tears down the others
        first = (str(exc).splitlines() or [""])[0]
        sys.stderr.write(f"maia-onnx worker rank {rank}: {type(exc).__name__}: {first}\n")
        sys.stderr.flush()
        if os.environ.get("MAIA_ONNX_DEBUG"):
            raise
        sys.stdout.flush()
        os._exit(1)  # no interpreter teardown: a process group whose peer is gone can block in its destructor


if __name__ == "__main__":
    sys.exit(main())
