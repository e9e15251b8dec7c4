"""Run a partition directory with one process per rank on torch.distributed (gloo on CPU, NCCL on GPUs).

Each process (launched by torchrun) loads only its own ``rank{t}_stage{s}.onnx`` (global rank = s * tp + t),
cuts it at its collectives with the in-process executor's segmentation (``runtime/executor.py``), runs the
segments in ONNX Runtime and performs the manifest's ``com.microsoft`` AllReduce / AllGather over the stage's
tensor-parallel process group.  Values crossing pipeline stages go point to point from tp rank t of one stage
to tp rank t of a later stage; microbatches flow through the stages as soon as they arrive (forward-only
1F1B: every stage works on microbatch i while the next stage works on i - 1).  ``decode_steps`` continues a
decoder greedily: each stage keeps its own KV cache (its ``present.*`` become its next ``past_key_values.*``
without leaving the process) and rank 0 broadcasts the next token.  Rank 0 assembles the unsharded outputs.

Every collective and receive is bounded by ``timeout`` (the process group's timeout); a rank that dies makes
the others fail in their next collective, and ``launch`` turns that into one error naming the rank and cause.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from maia_onnx.errors import MaiaOnnxError, UserError

# numpy dtypes that travel as themselves; anything else (bf16, fp8) travels as raw bytes
_WIRE_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_, np.int16]
_MAX_DIMS = 8
_DTYPE_NAME_BYTES = 32
FAULT_ENV = "MAIA_ONNX_FAULT"  # test hook: "rank=R,at=STEP[,mode=hang]" kills (or hangs) rank R before step STEP


class DistributedRunError(MaiaOnnxError):
    """A multi-process run failed (a rank died, timed out or raised)."""

    exit_code = 3


@dataclass
class RankTiming:
    """Wall-clock accounting of one rank (seconds, bytes)."""

    rank: int
    tp_rank: int
    stage: int
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
        from maia_onnx.runtime.perfmodel import collective_time
        from maia_onnx.runtime.profiles import load_interconnect

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
def _c_order(arr) -> np.ndarray:
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


def _send_array(arr: np.ndarray, dst: int) -> int:
    import torch
    import torch.distributed as dist

    arr = _c_order(arr)
    head = _header(arr)
    dist.send(head, dst)
    if int(head[1]) < 0:  # ml_dtypes (bfloat16, float8...): name the dtype, then ship the raw bytes
        name = np.frombuffer(arr.dtype.name.encode().ljust(_DTYPE_NAME_BYTES), dtype=np.uint8)
        dist.send(torch.from_numpy(name.copy()), dst)
    payload = arr if int(head[1]) >= 0 else arr.reshape(-1).view(np.uint8)
    if arr.size:
        dist.send(torch.from_numpy(payload.reshape(-1)), dst)
    return arr.nbytes


def _recv_array(src: int) -> np.ndarray:
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
        import ml_dtypes

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


# ------------------------------------------------------------------------------------------ runner
class RankRunner:
    """What one process does: its own rank/stage model, its collectives, its pipeline sends and receives."""

    def __init__(self, directory: str | os.PathLike, timeout: float = 300.0, sync_collectives: bool = False):
        import torch.distributed as dist

        from maia_onnx.partition import read_manifest
        from maia_onnx.runtime.executor import build_program

        self.directory = Path(directory)
        self.sync_collectives = sync_collectives  # calibration: time the transfer alone, not the peers' lateness
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        pg_timeout = datetime.timedelta(seconds=timeout)
        if not dist.is_initialized():
            backend = os.environ.get("MAIA_ONNX_DIST_BACKEND", "gloo")
            dist.init_process_group(backend, timeout=pg_timeout)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        if self.world != m.tp * m.pp:
            raise UserError(
                f"{self.world} processes for a partition of tp={m.tp} x pp={m.pp}: launch exactly {m.tp * m.pp} "
                f"(--nproc-per-node x --nnodes)"
            )
        self.tp, self.pp = m.tp, m.pp
        self.tp_rank, self.stage = self.rank % self.tp, self.rank // self.tp
        # every process must create every group, in the same order
        # (new groups do not inherit the default group's timeout: pass it, or a stuck peer blocks for 30 min)
        self.tp_groups = [dist.new_group([s * self.tp + t for t in range(self.tp)], timeout=pg_timeout)
                          for s in range(self.pp)]
        self.group = self.tp_groups[self.stage]
        entry = m.rank_entry(self.tp_rank, self.stage)
        self.program = build_program(self.directory / entry["file"], self.tp_rank, self.stage)
        self.timing = RankTiming(self.rank, self.tp_rank, self.stage)
        # which stage produces each cross-stage value, and which later stages read it
        self.producer: dict[str, int] = {}
        for st in m.stages:
            for name in st["outputs"]:
                self.producer.setdefault(name, st["stage"])
        self.readers: dict[str, list[int]] = {}
        for st in m.stages:
            for name in st["inputs"]:
                if name in self.producer and self.producer[name] < st["stage"]:
                    self.readers.setdefault(name, []).append(st["stage"])
        self.source_inputs = set(m.source_input_names())

    # -- helpers
    def _global(self, tp_rank: int, stage: int) -> int:
        return stage * self.tp + tp_rank

    def _shard(self, name: str, value: np.ndarray) -> np.ndarray:
        spec = self.manifest.inputs.get(name, {"sharding": "replicated"})
        if spec.get("sharding") == "split":
            axis = spec["axis"]
            if value.shape[axis] % self.tp:
                raise UserError(f"input {name!r} has size {value.shape[axis]} on axis {axis}, not divisible by tp={self.tp}")
            return np.split(value, self.tp, axis=axis)[self.tp_rank]
        return value

    def _collective(self, coll, value: np.ndarray) -> np.ndarray:
        import torch
        import torch.distributed as dist

        if self.sync_collectives:
            t0 = time.perf_counter()
            dist.barrier(group=self.group)
            self.timing.skew_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        if coll.op == "AllReduce":
            acc_dtype = value.dtype if value.dtype in (np.float32, np.float64) or value.dtype.kind in "iu" else np.float32
            tensor = torch.from_numpy(_c_order(value).astype(acc_dtype, copy=True))
            dist.all_reduce(tensor, group=self.group)
            out = tensor.numpy().astype(value.dtype, copy=False)
        else:
            tensor = torch.from_numpy(_c_order(value))
            parts = [torch.empty_like(tensor) for _ in range(self.tp)]
            dist.all_gather(parts, tensor, group=self.group)
            out = np.concatenate([p.numpy() for p in parts], axis=coll.axis)
        dt = time.perf_counter() - t0
        self.timing.collective_s += dt
        self.timing.collective_bytes += int(value.nbytes)
        self.timing.collectives += 1
        self.timing.per_collective.append({"op": coll.op, "name": coll.name, "bytes": int(value.nbytes), "s": dt})
        return out

    def _session_options(self):
        """ORT options for a process that shares the host with its peers: its share of the cores, and no
        spin-waiting threads (spinning ORT pools starve the gloo threads of the other ranks on the host)."""
        from maia_onnx.ortutil import session_options

        so = session_options()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        so.intra_op_num_threads = max(1, (os.cpu_count() or 1) // max(local, 1))
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return so

    def _run_stage(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This rank's stage model on one microbatch: segments in ORT, collectives over the tp group."""
        from maia_onnx.runtime.executor import _segment_session

        prog = self.program
        for p in range(prog.phases):
            seg = prog.segments.get(p)
            if seg is not None and seg.nodes:
                t0 = time.perf_counter()
                if seg.session is None:
                    seg.session = _segment_session(prog, seg, env, self._session_options)
                env.update(zip(seg.outputs, seg.session.run(seg.outputs, {k: env[k] for k in seg.inputs})))
                self.timing.compute_s += time.perf_counter() - t0
            for coll in prog.collectives.get(p, []):
                env[coll.output] = self._collective(coll, env[coll.input])
        return {name: env[name] for name in prog.graph_outputs}

    def forward(self, feeds: Mapping[str, np.ndarray] | None, microbatches: int = 1,
                cache: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """One pipelined forward. ``feeds``: full source inputs (read where needed). Returns this rank's stage
        outputs concatenated over microbatches."""
        m = self.manifest
        axis = m.data.get("microbatch", {}).get("axis", 0)
        chunks = self._split(feeds or {}, microbatches, axis)
        results: list[dict[str, np.ndarray]] = []
        for mb in range(microbatches):
            env: dict[str, np.ndarray] = {}
            for name in self.program.graph_inputs:
                if cache is not None and name in cache:
                    env[name] = cache[name][mb] if isinstance(cache[name], list) else cache[name]
                elif name in self.producer and self.producer[name] < self.stage:
                    t0 = time.perf_counter()
                    env[name] = _recv_array(self._global(self.tp_rank, self.producer[name]))
                    self.timing.wait_s += time.perf_counter() - t0
                elif name in self.source_inputs:
                    if name not in chunks[mb]:
                        raise UserError(f"missing input {name!r} for stage {self.stage}: pass it in the inputs (.npz)")
                    env[name] = self._shard(name, chunks[mb][name])
                else:
                    raise DistributedRunError(f"rank {self.rank}: no source for input {name!r} of stage {self.stage}")
            out = self._run_stage(env)
            t0 = time.perf_counter()
            for name, value in out.items():
                for reader in sorted(set(self.readers.get(name, []))):
                    self.timing.p2p_bytes += _send_array(value, self._global(self.tp_rank, reader))
            self.timing.send_s += time.perf_counter() - t0
            results.append(out)
        if microbatches == 1:
            return results[0]
        return {k: np.concatenate([r[k] for r in results], axis=axis) for k in results[0]}

    @staticmethod
    def _split(feeds: Mapping[str, np.ndarray], microbatches: int, axis: int) -> list[dict[str, np.ndarray]]:
        if microbatches <= 1:
            return [dict(feeds)]
        return [{k: np.array_split(np.asarray(v), microbatches, axis=axis)[i] for k, v in feeds.items()}
                for i in range(microbatches)]

    def gather_outputs(self, local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Assemble the unsharded source outputs on rank 0 (None elsewhere)."""
        import torch.distributed as dist

        m = self.manifest
        outputs: dict[str, np.ndarray] = {}
        for name in m.source_output_names():
            spec = m.outputs.get(name, {"sharding": "replicated"})
            stage = spec.get("stage", self.pp - 1)
            senders = list(range(self.tp)) if spec.get("sharding") == "split" else [0]
            parts = []
            for t in senders:
                src = self._global(t, stage)
                if self.rank == src and self.rank != 0:
                    self.timing.p2p_bytes += _send_array(local[name], 0)
                elif self.rank == 0:
                    parts.append(local[name] if src == 0 else _recv_array(src))
            if self.rank == 0:
                outputs[name] = np.concatenate(parts, axis=spec["axis"]) if len(parts) > 1 else parts[0]
        dist.barrier()
        return outputs if self.rank == 0 else None

    def broadcast_token(self, token: np.ndarray | None) -> np.ndarray:
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(_c_order(token)) if self.rank == 0 else None
        shape = torch.tensor(list(token.shape) if self.rank == 0 else [0, 0], dtype=torch.int64)
        dist.broadcast(shape, 0)
        if t is None:
            t = torch.empty(tuple(int(v) for v in shape), dtype=torch.int64)
        dist.broadcast(t, 0)
        return t.numpy()

    def gather_timings(self) -> list[dict[str, Any]] | None:
        import torch.distributed as dist

        rows = [None] * self.world if self.rank == 0 else None
        dist.gather_object(self.timing.__dict__, rows, dst=0)
        return rows


def _maybe_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    opts = dict(kv.split("=", 1) for kv in spec.split(","))
    if int(opts.get("rank", -1)) == rank and int(opts.get("at", 0)) == step:
        if opts.get("mode", "kill") == "hang":
            time.sleep(3600)  # a stuck rank: the others must time out in their next collective
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def run_worker(directory: str | os.PathLike, inputs: Mapping[str, np.ndarray] | None, microbatches: int = 1,
               decode_steps: int = 0, timeout: float = 300.0, interconnect: str | None = "loopback",
               sync_collectives: bool = False) -> tuple[dict[str, np.ndarray] | None, list | None]:
    """Body of one process: prefill (+ greedy decode steps). Rank 0 returns (outputs, timings); others (None, None).

    Outputs: the last step's source outputs under their names, every step's under ``step{k}.{name}``, and the
    generated tokens as ``tokens`` when decoding.
    """
    import torch.distributed as dist

    runner = RankRunner(directory, timeout=timeout, sync_collectives=sync_collectives)
    if decode_steps and ("logits" not in runner.manifest.source_output_names()
                         or not any(n.startswith("past_key_values.") for n in runner.source_inputs)):
        raise UserError("--decode-steps needs a decoder with a 'logits' output and past_key_values.* inputs")
    t_start = time.perf_counter()
    collected: dict[str, np.ndarray] = {}
    tokens = []
    feeds = dict(inputs or {})
    cache: dict[str, np.ndarray] | None = None
    # On failure the exception propagates without destroy_process_group(): with a peer gone, tearing the
    # group down can block; the worker exits the process instead.
    for step in range(decode_steps + 1):
        _maybe_fault(runner.rank, step)
        local = runner.forward(feeds, microbatches if step == 0 else 1, cache)
        outs = runner.gather_outputs(local)
        # each stage keeps its own KV cache: present.X -> past_key_values.X without leaving the process
        cache = {"past_key_values." + k[len("present."):]: v for k, v in local.items() if k.startswith("present.")}
        if runner.rank == 0:
            for k, v in outs.items():
                collected[f"step{step}.{k}"] = v
                collected[k] = v
        if step < decode_steps:
            token = None
            if runner.rank == 0:
                token = np.argmax(outs["logits"][:, -1, :], axis=-1).astype(np.int64)[:, None]
                tokens.append(token)
            token = runner.broadcast_token(token)
            feeds = {"input_ids": token}
    runner.timing.total_s = time.perf_counter() - t_start
    if interconnect:
        runner.timing.predict(interconnect, runner.tp)
    timings = runner.gather_timings()
    if runner.rank == 0 and tokens:
        collected["tokens"] = np.concatenate(tokens, axis=1)
    dist.destroy_process_group()
    return (collected, timings) if runner.rank == 0 else (None, None)


# ------------------------------------------------------------------------------------------ launcher
def launch(directory: str | os.PathLike, inputs_path: str | os.PathLike, save_outputs: str | os.PathLike | None = None,
           nproc_per_node: int | None = None, nnodes: str = "1", rdzv_endpoint: str | None = None,
           microbatches: int = 1, decode_steps: int = 0, timeout: float = 300.0, report_path: str | os.PathLike | None = None,
           extra_env: Mapping[str, str] | None = None, quiet: bool = True,
           interconnect: str = "loopback", sync_collectives: bool = False) -> dict[str, Any]:
    """Start ``torchrun -m maia_onnx.runtime.worker DIR ...`` and wait; raise DistributedRunError naming the
    failing rank and its cause if any rank fails or the whole run exceeds ``timeout`` (plus start-up slack).

    Returns the JSON report written by rank 0 (per-rank timings, output names).
    """
    import json
    import tempfile

    from maia_onnx.partition import read_manifest

    manifest = read_manifest(directory)
    world = manifest.tp * manifest.pp
    nproc = nproc_per_node or world
    with tempfile.TemporaryDirectory(prefix="maia-dist-") as tmp:
        report = Path(report_path) if report_path else Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
        if rdzv_endpoint:
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
        else:
            cmd += ["--standalone"]
        cmd += ["-m", "maia_onnx.runtime.worker", str(directory), "--inputs", str(inputs_path),
                "--microbatches", str(microbatches), "--decode-steps", str(decode_steps), "--timeout", str(timeout),
                "--report", str(report), "--interconnect", interconnect]
        if sync_collectives:
            cmd += ["--sync-collectives"]
        if save_outputs:
            cmd += ["--save-outputs", str(save_outputs)]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(extra_env or {})
        # torchrun in its own process group so a timeout can stop it whole; the workers die with it
        # (worker.py asks the kernel for SIGKILL when their parent exits)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired as exc:
            import signal

            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DistributedRunError(f"torchrun run of {directory} did not finish within {timeout + 60:.0f} s; "
                                      f"raise --timeout or check the ranks") from exc
        proc = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if proc.returncode != 0:
            raise DistributedRunError(_failure_message(proc.stdout + proc.stderr, proc.returncode, directory))
        if not quiet:
            sys.stderr.write(proc.stderr)
        return json.loads(report.read_text()) if report.exists() else {}


_PEER_LOST = __import__("re").compile(r"remote worker|peer|Connection (closed|reset)|Broken pipe|EOF", __import__("re").I)


def _silent_ranks(worker_lines: Mapping[str, str], directory) -> list[str]:
    """Ranks of the partition that printed no error line (candidates for the one that died)."""
    try:
        from maia_onnx.partition import read_manifest

        manifest = read_manifest(directory)
        world = manifest.tp * manifest.pp
    except Exception:  # the message must still be produced when the directory is unreadable
        return []
    return [str(r) for r in range(world) if str(r) not in worker_lines]


def _failure_message(log: str, returncode: int, directory) -> str:
    """One line naming the failing rank and the cause, from torchrun's root-cause report and the workers' lines."""
    import re

    worker_lines = {}
    for line in log.splitlines():
        m = re.match(r"maia-onnx worker rank (\d+): (.*)", line)
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


# ------------------------------------------------------------------------------------------ CLI hook
def launcher_options(func):
    """click options for ``maia-onnx run DIR --launcher torchrun ...`` (decorate the run command with this)."""
    import click

    options = [
        click.option("--launcher", type=click.Choice(["inprocess", "torchrun"]), default="inprocess", show_default=True,
                     help="Partition directories: run all ranks in this process, or one process per rank via torchrun."),
        click.option("--nproc-per-node", type=int, default=None, help="torchrun: processes on this node (default: all ranks)."),
        click.option("--nnodes", default="1", show_default=True, help="torchrun: number of nodes (or MIN:MAX)."),
        click.option("--rdzv-endpoint", default=None, help="torchrun: HOST:PORT of the rendezvous for multi-node runs."),
        click.option("--microbatches", type=int, default=1, show_default=True, help="Pipeline microbatches (first step)."),
        click.option("--decode-steps", type=int, default=0, show_default=True,
                     help="torchrun: greedy decode steps after the prefill, each stage keeping its KV cache."),
        click.option("--timeout", "dist_timeout", type=float, default=300.0, show_default=True,
                     help="torchrun: seconds any collective or pipeline receive may take."),
        click.option("--interconnect", default="loopback", show_default=True,
                     help="torchrun: link profile whose predicted collective time is reported beside the measured one."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def run_torchrun(directory, inputs_path, save_outputs=None, nproc_per_node=None, nnodes="1", rdzv_endpoint=None,
                 microbatches=1, decode_steps=0, dist_timeout=300.0, interconnect="loopback") -> dict[str, Any]:
    """The work behind ``--launcher torchrun``: a result dict (outputs' names, per-rank timing rows)."""
    if not inputs_path:
        raise UserError("--launcher torchrun needs --inputs x.npz (full, unsharded inputs; every rank reads its part)")
    report = launch(directory, inputs_path, save_outputs, nproc_per_node=nproc_per_node, nnodes=nnodes,
                    rdzv_endpoint=rdzv_endpoint, microbatches=microbatches, decode_steps=decode_steps,
                    timeout=dist_timeout, interconnect=interconnect)
    from maia_onnx.runtime.worker import timing_rows

    return {"model": str(directory), "kind": "partition", "launcher": "torchrun", "outputs": report.get("outputs", []),
            "saved": str(save_outputs) if save_outputs else None, "ranks": timing_rows(report.get("ranks", []))}


def print_timing(result: dict[str, Any], as_json: bool = False) -> None:
    """Per-rank timing table (or JSON) for a torchrun result."""
    from maia_onnx.report import dumps, print_table

    if as_json:
        print(dumps(result))
        return
    rows = result.get("ranks") or []
    if rows:
        print_table(rows, list(rows[0]), title=f"{result['model']}: per-rank timing (seconds, bytes)")
