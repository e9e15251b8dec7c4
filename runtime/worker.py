"""One process of a torchrun run of a partition directory: ``torchrun ... -m maia_onnx.runtime.worker DIR --inputs x.npz``.

Each process loads only its own ``rank{t}_stage{s}.onnx`` (role r = s * tp + t), cuts it at its collectives
with the in-process executor's segmentation (``runtime/executor.py``), runs the segments in ONNX Runtime and
performs the manifest's ``com.microsoft`` AllReduce / AllGather over the stage's tensor-parallel process group
(gloo on CPU, NCCL on GPUs).  Values crossing pipeline stages go point to point from tp rank t of one stage to
tp rank t of a later stage; microbatches flow through the stages as soon as they arrive (forward-only 1F1B).
``decode_steps`` continues a decoder greedily: each stage keeps its own KV cache (its ``present.*`` become its
next ``past_key_values.*`` without leaving the process) and role 0 broadcasts the next token.

Role 0 (on the node launched with ``--node-rank 0``) assembles the unsharded outputs and writes them
(``--save-outputs``) and the JSON timing report (``--report``); nothing is printed (console tables belong to
``maia-onnx run``).  A failure writes one line ``maia-onnx worker rank R: <cause>`` to stderr for the launcher
(``runtime/distributed.py``) and exits non-zero, which makes torchrun stop the other ranks.  Every collective
and receive is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from maia_onnx.errors import UserError
from maia_onnx.io import atomic_write, write_text_atomic
from maia_onnx.ortutil import session_options
from maia_onnx.partition.manifest import read_manifest
from maia_onnx.report import dumps
from maia_onnx.runtime.dist_protocol import (
    FAULT_ENV,
    NODE_RANK_ENV,
    DistributedRunError,
    RankTiming,
    c_order,
    error_line,
    recv_array,
    send_array,
)
from maia_onnx.runtime.executor import build_program, segment_session


def _role_map(dist, world: int) -> list[int]:
    """Process group rank playing each role. Roles follow the node ranks the user gave (``NODE_RANK_ENV``,
    set by the launcher) so the node started as 0 holds role 0 and its outputs; without it, role = rank."""
    node = os.environ.get(NODE_RANK_ENV)
    if node is None:
        return list(range(world))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    role = int(node) * local_world + int(os.environ.get("LOCAL_RANK", "0"))
    roles: list[Any] = [None] * world
    dist.all_gather_object(roles, role)
    if sorted(roles) != list(range(world)):
        raise UserError(f"node ranks and process counts do not tile the {world} ranks (roles {roles}): start every "
                        f"node with the same --nproc-per-node and a distinct --node-rank in 0..nnodes-1")
    dist_of = [0] * world
    for rank, r in enumerate(roles):
        dist_of[r] = rank
    return dist_of


class RankRunner:
    """What one process does: its own rank/stage model, its collectives, its pipeline sends and receives."""

    def __init__(self, directory: str | os.PathLike, timeout: float = 300.0, sync_collectives: bool = False):
        import torch.distributed as dist

        self.directory = Path(directory)
        self.sync_collectives = sync_collectives  # calibration: time the transfer alone, not the peers' lateness
        self.manifest = read_manifest(self.directory)
        m = self.manifest
        pg_timeout = datetime.timedelta(seconds=timeout)
        if not dist.is_initialized():
            backend = os.environ.get("MAIA_ONNX_DIST_BACKEND", "gloo")
            dist.init_process_group(backend, timeout=pg_timeout)
        self.world = dist.get_world_size()
        if self.world != m.tp * m.pp:
            raise UserError(
                f"{self.world} processes for a partition of tp={m.tp} x pp={m.pp}: launch exactly {m.tp * m.pp} "
                f"(--nproc-per-node x --nnodes)"
            )
        # self.rank is this process's role (rank/stage of the partition); self.dist_of[role] is the process
        # group rank that plays it (they differ when a c10d rendezvous orders the nodes its own way)
        self.dist_of = _role_map(dist, self.world)
        self.rank = self.dist_of.index(dist.get_rank())
        self.tp, self.pp = m.tp, m.pp
        self.tp_rank, self.stage = self.rank % self.tp, self.rank // self.tp
        # every process must create every group, in the same order
        # (new groups do not inherit the default group's timeout: pass it, or a stuck peer blocks for 30 min)
        self.tp_groups = [dist.new_group(sorted(self.dist_of[s * self.tp + t] for t in range(self.tp)),
                                         timeout=pg_timeout)
                          for s in range(self.pp)]
        self.group = self.tp_groups[self.stage]
        # all_gather returns parts in group-rank order (sorted process ranks): where each tp rank's part lands
        members = sorted(self.dist_of[self.stage * self.tp + t] for t in range(self.tp))
        self.part_of_tp = [members.index(self.dist_of[self.stage * self.tp + t]) for t in range(self.tp)]
        entry = m.rank_entry(self.tp_rank, self.stage)
        self.program = build_program(self.directory / entry["file"], self.tp_rank, self.stage)
        self.timing = RankTiming(self.rank, self.tp_rank, self.stage, process_rank=dist.get_rank())
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
        """Process group rank of the process playing (tp_rank, stage)."""
        return self.dist_of[stage * self.tp + tp_rank]

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
            tensor = torch.from_numpy(c_order(value).astype(acc_dtype, copy=True))
            dist.all_reduce(tensor, group=self.group)
            out = tensor.numpy().astype(value.dtype, copy=False)
        else:
            tensor = torch.from_numpy(c_order(value))
            parts = [torch.empty_like(tensor) for _ in range(self.tp)]
            dist.all_gather(parts, tensor, group=self.group)
            out = np.concatenate([parts[i].numpy() for i in self.part_of_tp], axis=coll.axis)
        dt = time.perf_counter() - t0
        self.timing.collective_s += dt
        self.timing.collective_bytes += int(value.nbytes)
        self.timing.collectives += 1
        self.timing.per_collective.append({"op": coll.op, "name": coll.name, "bytes": int(value.nbytes), "s": dt})
        return out

    def _session_options(self):
        """ORT options for a process that shares the host with its peers: its share of the cores, and no
        spin-waiting threads (spinning ORT pools starve the gloo threads of the other ranks on the host)."""
        so = session_options()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        so.intra_op_num_threads = max(1, (os.cpu_count() or 1) // max(local, 1))
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return so

    def _run_stage(self, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This rank's stage model on one microbatch: segments in ORT, collectives over the tp group."""
        prog = self.program
        for p in range(prog.phases):
            seg = prog.segments.get(p)
            if seg is not None and seg.nodes:
                t0 = time.perf_counter()
                if seg.session is None:
                    seg.session = segment_session(prog, seg, env, self._session_options)
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
                    env[name] = recv_array(self._global(self.tp_rank, self.producer[name]))
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
                    self.timing.p2p_bytes += send_array(value, self._global(self.tp_rank, reader))
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
                sender = stage * self.tp + t  # role
                if self.rank == sender and self.rank != 0:
                    self.timing.p2p_bytes += send_array(local[name], self.dist_of[0])
                elif self.rank == 0:
                    parts.append(local[name] if sender == 0 else recv_array(self.dist_of[sender]))
            if self.rank == 0:
                outputs[name] = np.concatenate(parts, axis=spec["axis"]) if len(parts) > 1 else parts[0]
        dist.barrier()
        return outputs if self.rank == 0 else None

    def broadcast_token(self, token: np.ndarray | None) -> np.ndarray:
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(c_order(token)) if self.rank == 0 else None
        shape = torch.tensor(list(token.shape) if self.rank == 0 else [0, 0], dtype=torch.int64)
        dist.broadcast(shape, self.dist_of[0])
        if t is None:
            t = torch.empty(tuple(int(v) for v in shape), dtype=torch.int64)
        dist.broadcast(t, self.dist_of[0])
        return t.numpy()

    def gather_timings(self) -> list[dict[str, Any]] | None:
        import torch.distributed as dist

        rows = [None] * self.world if self.rank == 0 else None
        dist.gather_object(self.timing.__dict__, rows, dst=self.dist_of[0])
        return rows


def _maybe_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    opts = dict(kv.split("=", 1) for kv in spec.split(","))
    if int(opts.get("rank", -1)) == rank and int(opts.get("at", 0)) == step:
        if opts.get("mode", "kill") == "hang":
            time.sleep(3600)  # a stuck rank: the others must time out in their next collective
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



# ------------------------------------------------------------------------------------------ process entry
def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m maia_onnx.runtime.worker", description=__doc__.splitlines()[0])
    p.add_argument("directory", help="partition directory (manifest.json + rank{t}_stage{s}.onnx)")
    p.add_argument("--inputs", required=True, help="full (unsharded) inputs, .npz with one array per graph input")
    p.add_argument("--save-outputs", default=None, help="role 0 writes the unsharded outputs here (.npz)")
    p.add_argument("--microbatches", type=int, default=1, help="pipeline microbatches for the first step")
    p.add_argument("--decode-steps", type=int, default=0, help="greedy decode steps after the prefill (KV cache)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any collective or receive may take")
    p.add_argument("--report", default=None, help="role 0 writes the JSON timing report here")
    p.add_argument("--interconnect", default="loopback",
                   help="link profile to predict the collective time with (runtime/interconnects), '' for none")
    p.add_argument("--sync-collectives", action="store_true",
                   help="calibration: barrier before each collective so its time is the transfer alone (skew_s apart)")
    return p.parse_args(argv)


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the torchrun agent that started us exits, so no rank outlives a failed run
    (torchrun starts workers in their own sessions; a rank stuck in a C call may ignore its SIGTERM)."""
    try:
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
        with np.load(args.inputs, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
        outputs, timings = run_worker(args.directory, feeds, args.microbatches, args.decode_steps, args.timeout,
                                      args.interconnect or None, args.sync_collectives)
        if outputs is not None:
            if args.save_outputs:
                with atomic_write(args.save_outputs, "wb") as fh:
                    np.savez(fh, **outputs)
            report = {"directory": str(args.directory), "microbatches": args.microbatches,
                      "decode_steps": args.decode_steps, "outputs": sorted(outputs), "ranks": timings}
            if args.report:
                write_text_atomic(args.report, dumps(report))
        return 0
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # one line naming this rank; torchrun tears down the others
        sys.stderr.write(error_line(rank, exc))
        sys.stderr.flush()
        if os.environ.get("MAIA_ONNX_DEBUG"):
            raise
        sys.stdout.flush()
        os._exit(1)  # no interpreter teardown: a process group whose peer is gone can block in its destructor


if __name__ == "__main__":
    sys.exit(main())
