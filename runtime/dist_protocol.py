"""What the torchrun launcher (``runtime/distributed.py``) and the rank processes (``runtime/worker.py``) agree on.

The worker's command line, the one-line error each failing rank writes to stderr, the JSON report rank 0
writes, per-rank timing records and the wire format of tensors sent point to point between pipeline stages.
Both sides import this module and never each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from maia_onnx.errors import MaiaOnnxError, UserError
from maia_onnx.runtime.perfmodel import collective_time
from maia_onnx.runtime.profiles import load_interconnect

WORKER_MODULE = "maia_onnx.runtime.worker"
FAULT_ENV = "MAIA_ONNX_FAULT"  # test hook: "rank=R,at=STEP[,mode=hang]" kills (or hangs) rank R before step STEP
NODE_RANK_ENV = "MAIA_ONNX_NODE_RANK"  # the node rank the user asked for (c10d rendezvous assigns its own)
ERROR_LINE = re.compile(r"maia-onnx worker rank (\d+): (.*)")

# numpy dtypes that travel as themselves; anything else (bf16, fp8) travels as raw bytes
_WIRE_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_, np.int16]
_MAX_DIMS = 8
_DTYPE_NAME_BYTES = 32

TIMING_COLUMNS = ["rank", "process_rank", "tp_rank", "stage", "compute_s", "collective_s", "collective_bytes", "collectives", "skew_s",
                  "wait_s", "send_s", "p2p_bytes", "total_s", "predicted_collective_s"]


class DistributedRunError(MaiaOnnxError):
    """A multi-process run failed (a rank died, timed out or raised)."""

    exit_code = 3


def error_line(rank: str | int, exc: BaseException) -> str:
    """The line a failing rank writes to stderr; the launcher finds it with ``ERROR_LINE``."""
    first = (str(exc).splitlines() or [""])[0]
    return f"maia-onnx worker rank {rank}: {type(exc).__name__}: {first}\n"


def worker_argv(directory, inputs_path, report, microbatches: int = 1, decode_steps: int = 0, timeout: float = 300.0,
                interconnect: str = "loopback", sync_collectives: bool = False, save_outputs=None) -> list[str]:
    """Arguments after ``torchrun ... -m maia_onnx.runtime.worker`` (parsed by ``worker._parse``)."""
    argv = ["-m", WORKER_MODULE, str(directory), "--inputs", str(inputs_path), "--microbatches", str(microbatches),
            "--decode-steps", str(decode_steps), "--timeout", str(timeout), "--report", str(report),
            "--interconnect", interconnect]
    if sync_collectives:
        argv += ["--sync-collectives"]
    if save_outputs:
        argv += ["--save-outputs", str(save_outputs)]
    return argv


def timing_rows(timings) -> list[dict[str, Any]]:
    """Per-rank timing records (as rank 0 reports them) -> table rows in rank order."""
    return [{k: t[k] for k in TIMING_COLUMNS} for t in sorted(timings, key=lambda t: t["rank"])]


@dataclass
class RankTiming:
    """Wall-clock accounting of one rank (seconds, bytes)."""

    rank: int  # role: stage * tp + tp_rank
    tp_rank: int
    stage: int
    process_rank: int = -1  # rank in the process group (differs from the role when the rendezvous reorders nodes)
    compute_s: float = 0.0
    collective_s: float = 0.0
    collective_bytes: int = 0
    collectives: int = 0
    send_s: float = 0.0
    p2p_bytes: int = 0
    wait_s: float = 0.0  # blocked receiving from an earlier stage: the pipeline bubble
    skew_s: float = 0.0  # with sync_collectives: waiting for the slowest tp peer before each collective
    total_s: float = 0.0
    predicted_collective_s: float | None = None  # runtime/perfmodel for the same collectives on `interconnect`
    interconnect: str | None = None
    per_collective: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "per_collective"}

    def predict(self, interconnect: str, tp: int) -> None:
        """What ``maia-onnx analyze``'s cost model (runtime/perfmodel) predicts for exactly these collectives."""
        link = load_interconnect(interconnect)
        total = 0.0
        for c in self.per_collective:
            # perfmodel sizes an all-gather by what every rank ends up with: tp times one rank's input
            size = c["bytes"] * (tp if c["op"] == "AllGather" else 1)
            c["predicted_s"] = collective_time(c["op"], size, tp, link)
            total += c["predicted_s"]
        self.predicted_collective_s = total
        self.interconnect = link.name


# ------------------------------------------------------------------------------------------ wire
def c_order(arr) -> np.ndarray:
    """C-contiguous view or copy that keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    arr = np.asarray(arr)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _header(arr: np.ndarray):
    import torch

    if arr.ndim > _MAX_DIMS:
        raise UserError(f"tensor of rank {arr.ndim} crosses a pipeline stage; at most {_MAX_DIMS} dims are supported")
    code = next((i for i, d in enumerate(_WIRE_DTYPES) if arr.dtype == np.dtype(d)), -1)
    head = [arr.ndim, code, arr.dtype.itemsize] + list(arr.shape) + [0] * (_MAX_DIMS - arr.ndim)
    return torch.tensor(head, dtype=torch.int64)


def send_array(arr: np.ndarray, dst: int) -> int:
    """Send one array to process ``dst`` (header, dtype name for ml_dtypes, payload); returns its bytes."""
    import torch
    import torch.distributed as dist

    arr = c_order(arr)
    head = _header(arr)
    dist.send(head, dst)
    if int(head[1]) < 0:  # ml_dtypes (bfloat16, float8...): name the dtype, then ship the raw bytes
        name = np.frombuffer(arr.dtype.name.encode().ljust(_DTYPE_NAME_BYTES), dtype=np.uint8)
        dist.send(torch.from_numpy(name.copy()), dst)
    payload = arr if int(head[1]) >= 0 else arr.reshape(-1).view(np.uint8)
    if arr.size:
        dist.send(torch.from_numpy(payload.reshape(-1)), dst)
    return arr.nbytes


def recv_array(src: int) -> np.ndarray:
    """Receive what ``send_array`` sent from process ``src``: same dtype, shape and bytes."""
    import torch
    import torch.distributed as dist

    head = torch.empty(3 + _MAX_DIMS, dtype=torch.int64)
    dist.recv(head, src)
    ndim, code, itemsize = (int(v) for v in head[:3])
    shape = tuple(int(v) for v in head[3 : 3 + ndim])
    n = int(np.prod(shape, dtype=np.int64))
    if code >= 0:
        dtype = np.dtype(_WIRE_DTYPES[code])
        out = np.empty(n, dtype=dtype)
    else:
        name = torch.empty(_DTYPE_NAME_BYTES, dtype=torch.uint8)
        dist.recv(name, src)
        dtype_name = bytes(name.numpy()).rstrip(b" ").decode()
        if not hasattr(ml_dtypes, dtype_name):
            raise DistributedRunError(f"received a tensor of unsupported dtype {dtype_name!r} from rank {src}")
        dtype = np.dtype(getattr(ml_dtypes, dtype_name))
        out = np.empty(n * itemsize, dtype=np.uint8)
    if n:
        dist.recv(torch.from_numpy(out), src)
    return out.view(dtype).reshape(shape)
