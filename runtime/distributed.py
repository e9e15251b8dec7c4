"""Launch a partition directory with one process per rank under torchrun and turn a failed run into one line.

``launch`` starts ``torchrun ... -m maia_onnx.runtime.worker DIR ...`` (the rank processes, see
``runtime/worker.py``) on this node and waits.  One node: torchrun's standalone rendezvous.  Several nodes:
every node runs ``launch`` with the same ``nnodes`` and rendezvous endpoint (c10d rendezvous) and its own
``node_rank``; the node started as 0 holds role 0, which writes the unsharded outputs and the report.  A rank
that dies, hangs or raises fails the whole run with a ``DistributedRunError`` naming the rank and the cause.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from maia_onnx.errors import InvalidOptionError
from maia_onnx.partition.manifest import read_manifest
from maia_onnx.runtime.dist_protocol import (
    ERROR_LINE,
    FAULT_ENV,
    NODE_RANK_ENV,
    DistributedRunError,
    timing_rows,
    worker_argv,
)

__all__ = ["DistributedRunError", "FAULT_ENV", "launch", "timing_rows"]

DEFAULT_PORT = 29400  # torchrun's c10d rendezvous port


def rendezvous_args(nnodes: str | int = 1, node_rank: int | None = None, rdzv_endpoint: str | None = None,
                    master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """torchrun's rendezvous options: standalone on one node, c10d on ``rdzv_endpoint`` (or
    ``master_addr:master_port``) across several."""
    nnodes = str(nnodes)
    endpoint = rdzv_endpoint
    if endpoint is None and master_addr:
        endpoint = f"{master_addr}:{master_port or DEFAULT_PORT}"
    elif endpoint is not None and master_addr:
        raise InvalidOptionError("--rdzv-endpoint and --master-addr both name the rendezvous: pass one")
    if nnodes != "1" and endpoint is None:
        raise InvalidOptionError(f"--nnodes {nnodes} needs the rendezvous every node joins: "
                                 "--master-addr HOST (and --master-port) or --rdzv-endpoint HOST:PORT")
    if node_rank is not None and nnodes.isdigit() and not 0 <= node_rank < int(nnodes):
        raise InvalidOptionError(f"--node-rank {node_rank} is outside 0..{int(nnodes) - 1} for --nnodes {nnodes}")
    if endpoint is None:
        return [f"--nnodes={nnodes}", "--standalone"]
    return [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]


def launch(directory: str | os.PathLike, inputs_path: str | os.PathLike, save_outputs: str | os.PathLike | None = None,
           nproc_per_node: int | None = None, nnodes: str | int = "1", rdzv_endpoint: str | None = None,
           microbatches: int = 1, decode_steps: int = 0, timeout: float = 300.0, report_path: str | os.PathLike | None = None,
           extra_env: Mapping[str, str] | None = None,
           interconnect: str = "loopback", sync_collectives: bool = False, node_rank: int | None = None,
           master_addr: str | None = None, master_port: int | None = None) -> dict[str, Any]:
    """Run the ranks of ``directory`` that this node hosts and wait; raise DistributedRunError naming the
    failing rank and its cause if any rank fails or the whole run exceeds ``timeout`` (plus start-up slack).

    Returns the JSON report role 0 wrote (per-rank timings, output names; ``{}`` on a node that does not
    hold role 0) with torchrun's stderr under ``"log"``.
    """
    manifest = read_manifest(directory)
    world = manifest.tp * manifest.pp
    nodes = int(str(nnodes).split(":")[-1])
    if nproc_per_node is None:
        if world % nodes:
            raise InvalidOptionError(f"{world} ranks do not split evenly over {nodes} nodes: pass --nproc-per-node")
        nproc_per_node = world // nodes
    rdzv = rendezvous_args(nnodes, node_rank, rdzv_endpoint, master_addr, master_port)
    with tempfile.TemporaryDirectory(prefix="maia-dist-") as tmp:
        report = Path(report_path) if report_path else Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", *rdzv,
               *worker_argv(directory, inputs_path, report, microbatches=microbatches, decode_steps=decode_steps,
                            timeout=timeout, interconnect=interconnect, sync_collectives=sync_collectives,
                            save_outputs=save_outputs)]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        if node_rank is not None:
            env[NODE_RANK_ENV] = str(node_rank)
        env.update(extra_env or {})
        # torchrun in its own process group so a timeout can stop it whole; the workers die with it
        # (worker.py asks the kernel for SIGKILL when their parent exits)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DistributedRunError(f"torchrun run of {directory} did not finish within {timeout + 60:.0f} s; "
                                      f"raise --timeout or check the ranks") from exc
        if proc.returncode != 0:
            raise DistributedRunError(_failure_message(out + err, proc.returncode, directory))
        result = json.loads(report.read_text()) if report.exists() else {}
        result["log"] = err
        return result


_PEER_LOST = re.compile(r"remote worker|peer|Connection (closed|reset)|Broken pipe|EOF", re.I)


def _silent_ranks(worker_lines: Mapping[str, str], directory) -> list[str]:
    """Ranks of the partition that printed no error line (candidates for the one that died)."""
    try:
        manifest = read_manifest(directory)
        world = manifest.tp * manifest.pp
    except Exception:  # the message must still be produced when the directory is unreadable
        return []
    return [str(r) for r in range(world) if str(r) not in worker_lines]


def _failure_message(log: str, returncode: int, directory) -> str:
    """One line naming the failing rank and the cause, from torchrun's root-cause report and the workers' lines."""
    worker_lines = {}
    for line in log.splitlines():
        m = ERROR_LINE.match(line)
        if m:
            worker_lines.setdefault(m.group(1), m.group(2))
    root = log.split("Root Cause", 1)[1] if "Root Cause" in log else log
    pattern = r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)"
    found = re.search(pattern, root)
    # a rank killed by a signal is the cause even when a peer's broken-connection error was reported first
    # (SIGTERM is torchrun stopping the survivors, not a cause)
    killed = [m for m in re.finditer(pattern, log) if int(m.group(2)) < 0 and int(m.group(2)) != -15]
    if killed:
        found = killed[0]
    if found and int(found.group(2)) < 0 and int(found.group(2)) != -15:
        rank, code = found.group(1), int(found.group(2))
        cause = f"rank {rank} died (signal {-code})"
    elif (silent := _silent_ranks(worker_lines, directory)) and all(_PEER_LOST.search(v) and "time" not in v.lower() for v in worker_lines.values()):
        # every rank that spoke only lost a peer: the rank that said nothing is the one that died
        cause = f"rank {silent[0]} died (no error of its own; its peers lost the connection to it)"
    elif found and found.group(1) in worker_lines:
        rank = found.group(1)
        cause = f"rank {rank}: {worker_lines[rank]}"
    elif worker_lines:
        rank, line = next(iter(worker_lines.items()))
        cause = f"rank {rank}: {line}"
    elif found:
        cause = f"rank {found.group(1)} exited with code {found.group(2)}"
    else:
        tail = [line for line in log.splitlines() if line.strip()][-1:] or ["no output"]
        cause = f"torchrun exited with code {returncode}: {tail[0]}"
    if "timed out" in cause.lower() or "timeout" in cause.lower():
        cause += " (a peer rank stopped answering; --timeout bounds every collective)"
    return f"distributed run of {directory} failed: {cause}"
