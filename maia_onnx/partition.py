"""Partition directories: the manifest schema, the streaming writer, the reader and the validator.

A partition directory holds one ONNX model per (tensor-parallel rank, pipeline stage) plus ``manifest.json``::

    DIR/manifest.json
    DIR/rank{t}_stage{s}.onnx          # standalone, checker-clean ONNX (imports com.microsoft for collectives)
    DIR/rank{t}_stage{s}.onnx.data     # that file's own external weights (absent when it has none)

``t`` is the tensor-parallel rank inside a stage (0..tp-1), ``s`` the pipeline stage (0..pp-1); the global
device rank is ``s * tp + t``.

Manifest (``format: "maia-onnx-partition"``, ``version: 1``; JSON, keys sorted)::

    mesh:        {tp, pp, world_size}
    source:      {path, sha256, inputs: [io], outputs: [io]}   # io = {name, dtype, shape}; shape items int|str|null
    ranks:       [{rank, tp_rank, stage, file, data|null, weight_bytes, sha256}]      # one per file
                 # sha256 of the .onnx file: the reader refuses a rank file edited or swapped afterwards
    stages:      [{stage, inputs: [names], outputs: [names]}]
                 # a stage's graph inputs are source inputs or outputs of earlier stages (same tp_rank feeds
                 # same tp_rank); its outputs are source outputs or tensors later stages consume
    inputs:      {name: {sharding: "replicated"|"split", axis: int|null}}
                 # how the executor feeds a full source input to each tp rank: "split" = rank t gets
                 # the t-th of tp equal chunks along axis (e.g. a KV cache split by heads)
    outputs:     {name: {sharding: "replicated"|"split", axis: int|null, stage: int}}
                 # how the full output is assembled: replicated = take tp rank 0, split = concat along axis
    collectives: [{id, stage, op: "AllReduce"|"AllGather", node, input, output, axis|null, group_size,
                   group: [global ranks], dtype, elements_per_token}]
                 # in execution order; node/input/output are the same names in every tp rank of the stage
    tensors:     {source initializer name: {kind, axis|null, full_shape, shards: {tp_rank: [start, stop]},
                   sections?: k}}
                 # kind: column | row | vocab | replicated | sliced (which part of the weight went where);
                 # fused weights (GPT-2 Q|K|V, sections=k) list k [start, stop] ranges per rank, concatenated
                 # in that order in the rank's tensor
    microbatch:  {axis: 0}     # axis along which run_partition splits inputs into pipeline microbatches
    extra:       {...}         # free-form provenance (pass options, PP balance, etc.)

The schema is shared by the TP pass, the PP pass, resharding, the in-process executor and the torchrun worker.
Weights are streamed tensor by tensor into each file's external data (lazy slices of the source's
memory-mapped data are evaluated one at a time), so writing never holds a copy of all weights.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.errors import UserError
from maia_onnx.io import atomic_dir, sha256_file

FORMAT = "maia-onnx-partition"
VERSION = 1
MANIFEST = "manifest.json"
INLINE_LIMIT_BYTES = 1024  # smaller tensors stay inside the .onnx file
ALIGNMENT = 64

COLLECTIVE_DOMAIN = "com.microsoft"
COLLECTIVE_OPS = ("AllReduce", "AllGather")


def rank_file_name(tp_rank: int, stage: int) -> str:
    return f"rank{tp_rank}_stage{stage}.onnx"


def global_rank(tp_rank: int, stage: int, tp: int) -> int:
    return stage * tp + tp_rank


class PartitionError(UserError):
    """A partition directory is missing, inconsistent or does not match its manifest."""


@dataclass
class Manifest:
    """Typed access to manifest.json (``data`` is the plain dict that is written)."""

    data: dict[str, Any]
    directory: Path | None = None

    @property
    def tp(self) -> int:
        return int(self.data["mesh"]["tp"])

    @property
    def pp(self) -> int:
        return int(self.data["mesh"]["pp"])

    @property
    def ranks(self) -> list[dict[str, Any]]:
        return self.data["ranks"]

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.data["stages"]

    @property
    def collectives(self) -> list[dict[str, Any]]:
        return self.data.get("collectives", [])

    @property
    def inputs(self) -> dict[str, dict[str, Any]]:
        return self.data.get("inputs", {})

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        return self.data.get("outputs", {})

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        return self.data.get("tensors", {})

    def rank_entry(self, tp_rank: int, stage: int) -> dict[str, Any]:
        for entry in self.ranks:
            if entry["tp_rank"] == tp_rank and entry["stage"] == stage:
                return entry
        raise PartitionError(f"manifest has no rank {tp_rank} stage {stage}: the partition is incomplete; re-run partition")

    def rank_path(self, tp_rank: int, stage: int) -> Path:
        base = self.directory or Path(".")
        return base / self.rank_entry(tp_rank, stage)["file"]

    def source_output_names(self) -> list[str]:
        return [o["name"] for o in self.data["source"]["outputs"]]

    def source_input_names(self) -> list[str]:
        return [i["name"] for i in self.data["source"]["inputs"]]


def io_spec(value: ir.Value) -> dict[str, Any]:
    """JSON description of a graph input/output: name, dtype name, shape (ints, symbols or null)."""
    shape = None
    if value.shape is not None:
        shape = [d if isinstance(d, int) else (str(d) if d is not None and str(d) else None) for d in value.shape]
    return {"name": value.name, "dtype": value.dtype.name if value.dtype is not None else None, "shape": shape}


def new_manifest(tp: int, pp: int, source_model: ir.Model, source_path: str | os.PathLike | None, source_hash: str | None) -> dict[str, Any]:
    """A manifest skeleton with mesh and source filled in; callers add stages, inputs, outputs, collectives, tensors."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "mesh": {"tp": tp, "pp": pp, "world_size": tp * pp},
        "source": {
            "path": str(source_path) if source_path is not None else None,
            "sha256": source_hash,
            "inputs": [io_spec(v) for v in source_model.graph.inputs],
            "outputs": [io_spec(v) for v in source_model.graph.outputs],
        },
        "ranks": [],
        "stages": [],
        "inputs": {},
        "outputs": {},
        "collectives": [],
        "tensors": {},
        "microbatch": {"axis": 0},
        "extra": {},
    }


# ---------------------------------------------------------------------------------------------- writing


def _tensor_bytes_view(tensor: ir.TensorProtocol) -> memoryview | bytes:
    """The tensor's raw little-endian bytes, as a view into its array when possible (no extra copy)."""
    if tensor.dtype in (ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1):
        return tensor.tobytes()
    arr = tensor.numpy()
    if not arr.flags["C_CONTIGUOUS"]:
        arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8))


def _release(tensor: Any) -> None:
    release = getattr(tensor, "release", None)
    if callable(release):
        try:
            release()
        except BufferError:  # a view of the mapping is still alive elsewhere; it is dropped with it
            pass


_FLUSH_POOL = None


def _flush_pool():
    """One background thread for all disk writes: buffers are filled while earlier ones are written.

    One thread, not one per file: on our VMs parallel O_DIRECT writes to several files measured slower than
    one stream of large writes (the disk wants deep requests, not interleaved ones).
    """
    global _FLUSH_POOL
    if _FLUSH_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _FLUSH_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maia-partition-writer")
    return _FLUSH_POOL


class _BufferPool:
    """Page-aligned staging buffers shared by the files written together (``nfiles + 2`` of ``chunk`` bytes).

    A file holds one buffer while filling it; a full buffer goes to the writer thread and comes back here
    once on disk, so filling never waits for a particular file's write, only for any buffer to free up.
    Buffers are anonymous memory touched only as far as they are filled (small models stay small in RSS).
    """

    BLOCK = 4096

    def __init__(self, nfiles: int, chunk: int | None = None, file_bytes: int | None = None):
        import queue

        if chunk is None:
            # 64 MiB writes measured ~1.6x the throughput of 16 MiB ones with O_DIRECT; cap the total near 384 MiB
            chunk = max(8 << 20, min(64 << 20, (384 << 20) // (nfiles + 2)))
        if file_bytes is not None:  # small files: no buffer larger than the largest file needs
            chunk = min(chunk, -(-(file_bytes + ALIGNMENT) // self.BLOCK) * self.BLOCK)
        self.chunk = max(self.BLOCK, chunk // self.BLOCK * self.BLOCK)
        self.count = nfiles + 2
        self.free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self.made = 0

    def get(self) -> np.ndarray:
        import queue

        if self.made < self.count:
            try:
                return self.free.get_nowait()
            except queue.Empty:
                self.made += 1
                return self._allocate(touch=False)  # its pages fault in as it fills
        return self.free.get()

    def _allocate(self, touch: bool = True) -> np.ndarray:
        import mmap

        try:
            buf = np.frombuffer(mmap.mmap(-1, self.chunk), np.uint8)  # page aligned, as O_DIRECT requires
        except (OSError, ValueError):
            raw = np.empty(self.chunk + self.BLOCK, np.uint8)
            start = (-raw.ctypes.data) % self.BLOCK  # O_DIRECT needs an aligned user buffer
            buf = raw[start:start + self.chunk]
        if touch:
            # fault the pages in now, one write per page (NumPy drops the GIL; MAP_POPULATE would hold it): this
            # runs in the writer thread while the graph is rewritten (see prepare_write_buffers)
            buf.reshape(-1, self.BLOCK)[:, 0] = 0
        return buf

    def put(self, buf: np.ndarray) -> None:
        self.free.put(buf)


_PREPARED: tuple[int, Any] | None = None  # (files, future list of buffers) from prepare_write_buffers


def prepare_write_buffers(nfiles: int) -> None:
    """Allocate the staging buffers of the next ``nfiles``-file write in the background (while the graph is
    rewritten), so the first weights go to disk without waiting for fresh memory."""
    global _PREPARED
    pool = _BufferPool(nfiles)
    _PREPARED = (nfiles, _flush_pool().submit(lambda: [pool._allocate() for _ in range(pool.count)]))


def _take_prepared(pool: _BufferPool, nfiles: int) -> None:
    global _PREPARED
    prepared, _PREPARED = _PREPARED, None
    if prepared is None or prepared[0] != nfiles:
        return
    try:
        buffers = prepared[1].result()
    except Exception:  # noqa: BLE001 - allocate on demand instead
        return
    for buf in buffers:
        if buf.nbytes == pool.chunk and pool.made < pool.count:
            pool.made += 1
            pool.put(buf)


class _DirectWriter:
    """Sequential writer of one file through pooled aligned staging buffers, with O_DIRECT (page cache bypassed).

    Buffered writes of multi-GB shards are throttled by dirty-page accounting (erratic: 0.6-4 GB/s on our
    VMs, depending on what else is being written back); O_DIRECT writes of large aligned chunks run at disk
    speed, in a background thread while the next buffers fill. Callers put bytes straight into the staging
    buffer (``write``, ``write_from_file``, ``write_rows``): one copy per byte on the way to disk.
    Falls back to ordinary writes where O_DIRECT is unsupported.
    """

    BLOCK = 4096

    def __init__(self, path: Path, pool: _BufferPool | None = None):
        self.path = path
        self.pool = pool or _BufferPool(1)
        self.offset = 0  # logical bytes written
        self.fill = 0
        self.file_offset = 0  # where the current buffer goes in the file
        self.direct = hasattr(os, "O_DIRECT")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError:
            self.direct = False
            self.fd = os.open(path, flags, 0o644)
        self.buf: np.ndarray | None = None
        self.pending: list = []

    def _space(self) -> np.ndarray:
        """The unfilled rest of the current staging buffer (a full one is sent to disk first)."""
        if self.buf is None:
            self.buf = self.pool.get()
        elif self.fill == len(self.buf):
            self._submit(self.fill)
            self.buf = self.pool.get()
        return self.buf[self.fill:]

    def _advance(self, n: int) -> None:
        self.fill += n
        self.offset += n

    def write(self, data) -> None:
        view = np.frombuffer(memoryview(data).cast("B"), np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        pos, total = 0, len(view)
        while pos < total:
            space = self._space()
            n = min(total - pos, len(space))
            space[:n] = view[pos:pos + n]
            self._advance(n)
            pos += n

    def write_from_file(self, fd: int, offset: int, length: int) -> None:
        """``length`` bytes of another file read straight into the staging buffer (no intermediate copy)."""
        done = 0
        while done < length:
            space = self._space()
            n = min(length - done, len(space))
            got = 0
            while got < n:
                r = os.preadv(fd, [space[got:n]], offset + done + got)
                if r <= 0:
                    raise OSError(f"unexpected end of file reading {length} bytes at offset {offset}")
                got += r
            self._advance(n)
            done += n

    def write_rows(self, rows: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        """For each row of the 2-D uint8 ``rows``: its byte ranges ``[lo, hi)`` in order, gathered straight
        into the staging buffer (a column shard of a row-major weight, several ranges for fused Q|K|V)."""
        width = sum(hi - lo for lo, hi in ranges)
        i, count = 0, rows.shape[0]
        while i < count:
            space = self._space()
            k = min(len(space) // width, count - i)
            if k == 0:  # the row straddles the buffer end (or is larger than a buffer): piece by piece
                for lo, hi in ranges:
                    self.write(rows[i, lo:hi])
                i += 1
                continue
            dest = space[:k * width].reshape(k, width)
            col = 0
            for lo, hi in ranges:
                np.copyto(dest[:, col:col + hi - lo], rows[i:i + k, lo:hi])
                col += hi - lo
            self._advance(k * width)
            i += k

    def _submit(self, length: int) -> None:
        self._check()
        buf, self.buf = self.buf, None
        self.pending.append(_flush_pool().submit(self._write_all, buf, length, self.file_offset))
        self.file_offset += length
        self.fill = 0

    def _check(self) -> None:
        """Re-raise a failed background write (e.g. disk full) here; forget finished ones."""
        still = []
        for future in self.pending:
            if future.done():
                future.result()
            else:
                still.append(future)
        self.pending = still

    def _write_all(self, buf: np.ndarray, length: int, offset: int) -> None:
        view = memoryview(buf)[:length]
        done = 0
        try:
            while done < length:
                try:
                    done += os.pwrite(self.fd, view[done:], offset + done)
                except OSError:
                    if not self.direct:
                        raise
                    # O_DIRECT refused at write time: reopen buffered and go on at the same position
                    os.close(self.fd)
                    self.fd = os.open(self.path, os.O_WRONLY)
                    self.direct = False
        finally:
            view.release()
            self.pool.put(buf)

    def flush(self) -> None:
        """Send the last, partly filled buffer to disk (padded for O_DIRECT; ``close`` truncates the file)."""
        if self.buf is not None:
            if self.fill:
                padded = -(-self.fill // self.BLOCK) * self.BLOCK if self.direct else self.fill
                self.buf[self.fill:padded] = 0
                self._submit(padded)
            else:
                self.pool.put(self.buf)
                self.buf = None

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.flush()
            for future in self.pending:
                future.result()
            self.pending = []
            os.ftruncate(self.fd, self.offset)
        finally:
            for future in self.pending:  # after an error: let the other writes finish before closing the fd
                future.exception()
            if self.buf is not None:
                self.pool.put(self.buf)
                self.buf = None
            os.close(self.fd)
            self.fd = -1


def _file_bytes(tensor: ir.TensorProtocol) -> tuple[str, int] | None:
    """(path, offset) when the tensor's bytes are a contiguous byte range of an external data file."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth % 8 == 0:
        return os.path.join(str(tensor.base_dir), tensor.location), int(tensor.offset or 0)
    return None


def _slice_of(tensor: ir.TensorProtocol) -> tuple[ir.TensorProtocol, int, list[tuple[int, int]]] | None:
    """(source, axis, ranges) for a weight the writer can cut itself: a tensor-parallel slice or a whole
    external tensor (one range over axis 0); None for anything that must be evaluated (then written)."""
    source = getattr(tensor, "slice_source", None)
    if source is not None:
        return source, tensor.slice_axis, list(tensor.slice_ranges)
    if _file_bytes(tensor) is not None and tensor.shape is not None and len(tensor.shape) > 0:
        return tensor, 0, [(0, int(tensor.shape[0]))]
    return None


class _RankFileWriter:
    """Streams one model's initializers (over 1 KiB) into ``<path>.data``, one tensor per ``write`` call."""

    def __init__(self, model: ir.Model, path: Path, pool: _BufferPool | None = None):
        self.model = model
        self.path = Path(path)
        self.data_name = f"{self.path.name}.data"
        self.values = [v for v in model.graph.initializers.values() if v.const_value is not None]
        self.writer = _DirectWriter(self.path.parent / self.data_name, pool)
        self.written = 0

    def streamable(self, index: int) -> tuple[ir.TensorProtocol, int, list[tuple[int, int]]] | None:
        """The (source, axis, ranges) of initializer ``index`` if ``write_slice`` can write it."""
        if index >= len(self.values):
            return None
        tensor = self.values[index].const_value
        if tensor.nbytes <= INLINE_LIMIT_BYTES:
            return None
        spec = _slice_of(tensor)
        if spec is None or spec[0].dtype.bitwidth % 8 or spec[0].dtype != tensor.dtype:
            return None
        return spec

    def begin(self) -> int:
        """Align the data file for the next tensor; returns its offset."""
        writer = self.writer
        pad = (-writer.offset) % ALIGNMENT
        if pad:
            writer.write(bytes(pad))
        return writer.offset

    def end(self, index: int, offset: int, progress: Callable[[int], None] | None) -> None:
        """Point initializer ``index`` at the bytes written since ``begin``."""
        value = self.values[index]
        tensor = value.const_value
        length = self.writer.offset - offset
        _release(tensor)
        value.const_value = ir.ExternalTensor(
            self.data_name, offset, length, tensor.dtype, shape=tensor.shape, name=value.name, base_dir=self.path.parent
        )
        self.written += length
        if progress:
            progress(length)

    def write(self, index: int, progress: Callable[[int], None] | None = None) -> None:
        if index >= len(self.values):
            return
        value = self.values[index]
        tensor = value.const_value
        if tensor.nbytes <= INLINE_LIMIT_BYTES:
            if not isinstance(tensor, ir.Tensor):
                # a private copy: a lazy shard may be a view that keeps its whole source weight alive
                value.const_value = ir.Tensor(np.array(tensor.numpy(), copy=True), dtype=tensor.dtype, name=value.name)
            return
        spec = self.streamable(index)
        if spec is not None:
            _write_slices(spec[0], spec[1], [(self, index, spec[2])], progress)
            return
        offset = self.begin()
        view = _tensor_bytes_view(tensor)
        self.writer.write(view)
        del view
        self.end(index, offset, progress)

    def abort(self) -> None:
        with __import__("contextlib").suppress(Exception):  # the error being raised is the one to report
            self.writer.close()

    def finish(self) -> int:
        self.writer.flush()
        # the graph is serialised while the last weight buffers are still being written (it only refers to them)
        ir.save(self.model, self.path)
        self.writer.close()
        if self.written == 0:
            os.unlink(self.path.parent / self.data_name)
        return self.written


READ_BLOCK_BYTES = 8 << 20  # rows of a column-sharded weight read per step: stays in L3 while every rank cuts it


def _write_slices(source: ir.TensorProtocol, axis: int, targets, progress) -> None:
    """Write each target's slice of ``source`` (``targets``: [(rank writer, initializer index, ranges)]).

    The source is read once for all targets. Contiguous slices (leading-axis shards, whole tensors) are read
    from the source file straight into each file's staging buffer; others are read a block of rows at a time
    and every target's columns are gathered from that block into its staging buffer.
    """
    shape = [int(d) for d in source.shape]
    axis = axis % len(shape)
    itemsize = source.dtype.bitwidth // 8
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:]) * itemsize  # bytes per index of the split axis
    row = shape[axis] * inner  # bytes per outer index
    byte_ranges = [[(a * inner, b * inner) for a, b in ranges] for _, _, ranges in targets]
    offsets = [w.begin() for w, _, _ in targets]
    located = _file_bytes(source)
    if located is not None:
        path, base = located
        fd = os.open(path, os.O_RDONLY)
        try:
            if outer == 1:
                for (w, _, _), spans in zip(targets, byte_ranges):
                    for lo, hi in spans:
                        w.writer.write_from_file(fd, base + lo, hi - lo)
            else:
                block_rows = max(1, min(outer, READ_BLOCK_BYTES // max(row, 1)))
                block = _read_block(block_rows * row)
                for start in range(0, outer, block_rows):
                    n = min(block_rows, outer - start)
                    _pread_exact(fd, block[:n * row], base + start * row)
                    rows = block[:n * row].reshape(n, row)
                    for (w, _, _), spans in zip(targets, byte_ranges):
                        w.writer.write_rows(rows, spans)
        finally:
            os.close(fd)
    else:
        from maia_onnx.passes.tensor_parallel import _SourceCache

        arr = _SourceCache.get(source)  # evaluated once for all targets
        rows = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).reshape(outer, row)
        for (w, _, _), spans in zip(targets, byte_ranges):
            w.writer.write_rows(rows, spans)
        del rows, arr
        _SourceCache.clear()
    for (w, index, _), offset in zip(targets, offsets):
        w.end(index, offset, progress)


_READ_BLOCK = np.empty(0, np.uint8)


def release_buffers() -> None:
    """Free the writer's reusable read block and any staging buffers prepared but not used."""
    global _READ_BLOCK, _PREPARED
    _READ_BLOCK = np.empty(0, np.uint8)
    if _PREPARED is not None:
        _PREPARED[1].cancel()
        _PREPARED = None


def _read_block(nbytes: int) -> np.ndarray:
    global _READ_BLOCK
    if _READ_BLOCK.nbytes < nbytes:
        _READ_BLOCK = np.empty(nbytes, np.uint8)
    return _READ_BLOCK[:nbytes]


def _pread_exact(fd: int, out: np.ndarray, offset: int) -> None:
    done, total = 0, out.nbytes
    while done < total:
        n = os.preadv(fd, [out[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {total} bytes at offset {offset}")
        done += n


def _weight_bytes(model: ir.Model) -> int:
    """Bytes a model's external weights will take (upper bound: alignment padding aside)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes > INLINE_LIMIT_BYTES:
            total += tensor.nbytes + ALIGNMENT
    return total


def write_model_streaming(model: ir.Model, path: Path, progress: Callable[[int], None] | None = None) -> int:
    """Save ``model`` to ``path`` with every initializer over 1 KiB streamed into ``<path>.data``.

    Tensors are materialised one at a time (lazy slices are evaluated here) and written straight to disk;
    the in-memory model is left pointing at the new file. Returns the weight bytes written.
    """
    out = _RankFileWriter(model, path, _BufferPool(1, file_bytes=_weight_bytes(model)))
    try:
        for i in range(len(out.values)):
            out.write(i, progress)
    except BaseException:
        out.abort()
        raise
    return out.finish()


def write_models_lockstep(models: Mapping[Any, tuple[ir.Model, Path]], progress: Callable[[int], None] | None = None) -> dict[Any, int]:
    """Write several rank files together, the i-th initializer of every model before the (i+1)-th.

    Rank models made by the same rewrite list their weights in the same order, so the i-th initializers of
    all ranks are usually slices of one source tensor: that tensor is read once and cut for all of them.
    """
    largest = max((_weight_bytes(model) for model, _ in models.values()), default=0)
    pool = _BufferPool(len(models), file_bytes=largest + ALIGNMENT * 256)
    _take_prepared(pool, len(models))
    writers = {key: _RankFileWriter(model, path, pool) for key, (model, path) in models.items()}
    try:
        longest = max((len(w.values) for w in writers.values()), default=0)
        for i in range(longest):
            groups: dict[int, list] = {}
            for w in writers.values():
                spec = w.streamable(i)
                if spec is None:
                    w.write(i, progress)
                else:
                    groups.setdefault(id(spec[0]), []).append((w, spec))
            for members in groups.values():
                source, axis = members[0][1][0], members[0][1][1]
                same = [(w, i, s[2]) for w, s in members if s[1] == axis]
                _write_slices(source, axis, same, progress)
                for w, s in members:
                    if s[1] != axis:
                        _write_slices(s[0], s[1], [(w, i, s[2])], progress)
        for w in writers.values():
            w.writer.flush()
        return {key: w.finish() for key, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def write_partition(
    out_dir: str | os.PathLike,
    rank_stage_models: Mapping[tuple[int, int], ir.Model] | Iterable[tuple[tuple[int, int], Callable[[], ir.Model]]],
    manifest: Mapping[str, Any],
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Write a partition directory atomically (all files appear together or none do).

    ``rank_stage_models``: ``{(tp_rank, stage): ir.Model}`` or an iterable of ``((tp_rank, stage), factory)``
    where ``factory()`` builds that model on demand, so only one rank's graph is alive at a time.
    ``manifest``: everything but ``ranks`` (filled in here with file names, weight bytes and hashes).
    The result is validated before the directory is renamed into place.
    """
    out_dir = Path(out_dir)
    data = json.loads(json.dumps(dict(manifest)))  # private deep copy; also proves it is JSON-clean
    items = rank_stage_models.items() if isinstance(rank_stage_models, Mapping) else rank_stage_models
    with atomic_dir(out_dir) as tmp:
        ranks = []
        if isinstance(rank_stage_models, Mapping):
            sizes = write_models_lockstep(
                {key: (model, tmp / rank_file_name(*key)) for key, model in rank_stage_models.items()}, progress
            )
            items = [(key, sizes[key]) for key in rank_stage_models]
        for (tp_rank, stage), model in items:
            name = rank_file_name(tp_rank, stage)
            if isinstance(model, int):
                weight_bytes = model
            else:
                if callable(model) and not isinstance(model, ir.Model):
                    model = model()
                weight_bytes = write_model_streaming(model, tmp / name, progress)
            del model
            data_file = f"{name}.data"
            ranks.append(
                {
                    "rank": global_rank(tp_rank, stage, data["mesh"]["tp"]),
                    "tp_rank": tp_rank,
                    "stage": stage,
                    "file": name,
                    "data": data_file if (tmp / data_file).exists() else None,
                    "weight_bytes": weight_bytes,
                    "sha256": sha256_file(tmp / name),
                }
            )
        data["ranks"] = sorted(ranks, key=lambda r: r["rank"])
        from maia_onnx.report import dumps

        (tmp / MANIFEST).write_text(dumps(data) + "\n")
        result = Manifest(data, tmp)
        validate_partition(result, check_models=False)
    return Manifest(data, out_dir)


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Load and validate ``DIR/manifest.json`` (structure and files; not the weights)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PartitionError(f"{directory} is not a partition directory: pass the folder written by 'maia-onnx partition'")
    path = directory / MANIFEST
    if not path.is_file():
        raise PartitionError(f"{directory} has no {MANIFEST}: pass the folder written by 'maia-onnx partition'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PartitionError(f"{path} is not valid JSON (line {exc.lineno}): re-run partition to rewrite it") from exc
    manifest = Manifest(data, directory)
    validate_partition(manifest)
    return manifest


def is_partition_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def load_rank_model(manifest: Manifest, tp_rank: int, stage: int) -> ir.Model:
    from maia_onnx.io import load_model

    return load_model(manifest.rank_path(tp_rank, stage))


def validate_partition(manifest: Manifest, check_models: bool = True) -> None:
    """Check the manifest is self-consistent and matches the files beside it; one-line errors name the problem."""
    d = manifest.data
    where = manifest.directory / MANIFEST if manifest.directory else MANIFEST
    if d.get("format") != FORMAT:
        raise PartitionError(f"{where}: not a maia-onnx partition manifest (format={d.get('format')!r})")
    if d.get("version") != VERSION:
        raise PartitionError(f"{where}: manifest version {d.get('version')} is not supported (expected {VERSION}); re-run partition")
    for key in ("mesh", "source", "ranks", "stages"):
        if key not in d:
            raise PartitionError(f"{where}: missing key {key!r}; re-run partition")
    tp, pp = manifest.tp, manifest.pp
    if tp < 1 or pp < 1 or d["mesh"].get("world_size", tp * pp) != tp * pp:
        raise PartitionError(f"{where}: mesh {d['mesh']} is inconsistent (world_size must be tp*pp)")
    expected = {(t, s) for t in range(tp) for s in range(pp)}
    present = {(r["tp_rank"], r["stage"]) for r in d["ranks"]}
    if present != expected:
        missing = sorted(expected - present)
        extra = sorted(present - expected)
        raise PartitionError(
            f"{where}: ranks do not match mesh tp={tp} pp={pp} (missing {missing}, unexpected {extra}); re-run partition"
        )
    if len(d["stages"]) != pp or sorted(s["stage"] for s in d["stages"]) != list(range(pp)):
        raise PartitionError(f"{where}: expected {pp} stage entries 0..{pp - 1}; re-run partition")
    for c in d.get("collectives", []):
        if c.get("op") not in COLLECTIVE_OPS:
            raise PartitionError(f"{where}: collective {c.get('id')} has unknown op {c.get('op')!r}")
        if c.get("group_size") != len(c.get("group", [])) or c.get("group_size") != tp:
            raise PartitionError(f"{where}: collective {c.get('id')} group {c.get('group')} does not match tp={tp}")
    for name, spec in d.get("inputs", {}).items():
        if spec.get("sharding") not in ("replicated", "split"):
            raise PartitionError(f"{where}: input {name!r} has unknown sharding {spec.get('sharding')!r}")
    for name, spec in d.get("outputs", {}).items():
        if spec.get("sharding") not in ("replicated", "split"):
            raise PartitionError(f"{where}: output {name!r} has unknown sharding {spec.get('sharding')!r}")
    if manifest.directory is None:
        return
    for r in d["ranks"]:
        f = manifest.directory / r["file"]
        if not f.is_file():
            raise PartitionError(f"{f} listed in the manifest is missing: the partition is incomplete; re-run partition")
        if r.get("data") and not (manifest.directory / r["data"]).is_file():
            raise PartitionError(f"weights file {manifest.directory / r['data']} is missing: copy the whole partition directory")
    if check_models:
        import onnx

        stage_io = {s["stage"]: s for s in d["stages"]}
        for r in d["ranks"]:
            # a shard swapped or edited after partitioning would run and give wrong answers without this check
            if r.get("sha256") and sha256_file(manifest.directory / r["file"]) != r["sha256"]:
                raise PartitionError(
                    f"{manifest.directory / r['file']} does not match the sha256 in its manifest (changed after "
                    f"partitioning): re-run partition or copy the original partition directory")
            proto = onnx.load(str(manifest.directory / r["file"]), load_external_data=False)
            inputs = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
            outputs = {o.name for o in proto.graph.output}
            stage = stage_io[r["stage"]]
            if inputs != set(stage["inputs"]) or outputs != set(stage["outputs"]):
                raise PartitionError(
                    f"{r['file']} does not match the manifest's stage {r['stage']} inputs/outputs "
                    f"(model has {sorted(inputs)} -> {sorted(outputs)}); the manifest and models are mismatched, re-run partition"
                )


def check_source(manifest: Manifest, model_path: str | os.PathLike) -> None:
    """Fail when ``model_path`` is not the model this partition was made from (content hash)."""
    from maia_onnx.io import model_content_hash

    want = manifest.data["source"].get("sha256")
    if want and model_content_hash(model_path) != want:
        raise PartitionError(
            f"{model_path} is not the source of partition {manifest.directory} (content hash differs); "
            "partition the model again or pass the original"
        )


@dataclass
class CollectiveRecord:
    """One collective in a rank model (same in every tp rank of a stage)."""

    op: str
    node: str
    input: str
    output: str
    axis: int | None
    group_size: int
    dtype: str | None = None
    elements_per_token: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def find_collectives(model: ir.Model) -> list[CollectiveRecord]:
    """Collective nodes of a rank model in graph order."""
    found = []
    for node in model.graph:
        if node.domain == COLLECTIVE_DOMAIN and node.op_type in COLLECTIVE_OPS:
            axis = node.attributes.get("axis")
            group = node.attributes.get("group_size")
            found.append(
                CollectiveRecord(
                    op=node.op_type,
                    node=node.name,
                    input=node.inputs[0].name,
                    output=node.outputs[0].name,
                    axis=axis.as_int() if axis is not None else None,
                    group_size=group.as_int() if group is not None else 1,
                    dtype=node.outputs[0].dtype.name if node.outputs[0].dtype is not None else None,
                )
            )
    return found


# ---------------------------------------------------------------------------------------------- API


def source_fingerprint(path: str | os.PathLike, full_limit_bytes: int = 1 << 30) -> str:
    """sha256 identifying a model: full content below 1 GiB; above, the graph file plus each external
    data file's size and first/middle/last MiB (a full hash would cost as much as the partition itself)."""
    import hashlib

    from maia_onnx.io import model_content_hash

    path = Path(path)
    files = sorted({p for p in path.parent.glob(f"{path.name}*")} | {path})
    proto_size = path.stat().st_size
    data_files = _external_files(path)
    total = proto_size + sum(f.stat().st_size for f in data_files)
    if total <= full_limit_bytes:
        return model_content_hash(path)
    h = hashlib.sha256()
    h.update(sha256_file(path).encode())
    chunk = 1 << 20
    for f in data_files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for offset in (0, max(0, size // 2 - chunk // 2), max(0, size - chunk)):
                fh.seek(offset)
                h.update(fh.read(chunk))
    del files
    return "sampled:" + h.hexdigest()


def _external_files(path: Path) -> list[Path]:
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(path), load_external_data=False)
    names = set()
    for t in proto.graph.initializer:
        if uses_external_data(t):
            for entry in t.external_data:
                if entry.key == "location":
                    names.add(entry.value)
    return [path.parent / n for n in sorted(names)]


def partition_file(
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    balance: str = "flops",
    progress: bool = False,
) -> Manifest:
    """Partition an ONNX file into ``tp`` x ``pp`` rank files under ``out_dir`` (atomic; input untouched)."""
    from maia_onnx.errors import InvalidOptionError
    from maia_onnx.io import check_output_path, load_model

    if tp < 1 or pp < 1:
        raise InvalidOptionError(f"--tp {tp} --pp {pp}: both degrees must be >= 1")
    out_dir = Path(out_dir)
    check_output_path(out_dir, model_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir} is a file: give a directory path for the partition")
    import gc

    # The graph work allocates ~10^5 IR objects in reference cycles; the cyclic collector rescanning them
    # all measured ~0.1-0.2 s of a multi-GB partition. Nothing here relies on it: paused, then restored.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _partition_file(model_path, out_dir, tp, pp, balance, progress, load_model)
    finally:
        if gc_was_enabled:
            gc.enable()


def _partition_file(model_path, out_dir: Path, tp: int, pp: int, balance: str, progress: bool, load_model) -> Manifest:
    model = load_model(model_path)
    _prefetch(model_path)
    from maia_onnx.io import initializer_bytes as _weights

    if _weights(model) > 256 << 20:
        prepare_write_buffers(tp * pp)
    from maia_onnx.io import initializer_bytes
    from maia_onnx.passes.pipeline_parallel import partition_model

    total = initializer_bytes(model)
    bar = None

    def advance(nbytes: int) -> None:
        # the bar appears with the first weight written, so option errors print alone
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"partition tp{tp} pp{pp}", file=sys.stderr)
        bar.update(nbytes)

    try:
        from maia_onnx.passes.tensor_parallel import _SourceCache

        _, plan = partition_model(
            model, out_dir, tp=tp, pp=pp, balance=balance, source_path=str(model_path),
            source_hash=source_fingerprint(model_path), progress=advance if progress else None,
            consume_model=True,  # loaded here for this call only: rewrite it instead of cloning it
        )
    finally:
        _SourceCache.release_buffers()
        release_buffers()
        if bar is not None:
            bar.close()
    manifest = read_manifest(out_dir)
    manifest.plan = plan  # the PP plan (stage loads, imbalance) for reports; not persisted beyond the manifest
    return manifest


def _prefetch(model_path: str | os.PathLike) -> None:
    """Ask the kernel to read the external weights ahead (asynchronously) while the graph is rewritten.

    (A reader thread instead measured slower on 2 cores: it competes with the rewrite for CPU.)
    """
    if not hasattr(os, "posix_fadvise"):
        return
    for f in _external_files(Path(model_path)):
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass


_ITEMSIZE = {"FLOAT": 4, "FLOAT16": 2, "BFLOAT16": 2, "DOUBLE": 8, "INT64": 8, "INT32": 4, "FLOAT8E4M3FN": 1, "FLOAT8E5M2": 1}


def summary_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """Per rank file: weights, collectives per forward and collective payload bytes per token."""
    rows = []
    for entry in manifest.ranks:
        colls = [c for c in manifest.collectives if c.get("stage") == entry["stage"]]
        per_token = sum((c.get("elements_per_token") or 0) * _ITEMSIZE.get(c.get("dtype") or "FLOAT", 4) for c in colls)
        # ring algorithms: AllReduce moves 2(n-1)/n of the tensor per rank, AllGather (n-1)/n
        n = manifest.tp
        wire = sum(
            (c.get("elements_per_token") or 0) * _ITEMSIZE.get(c.get("dtype") or "FLOAT", 4)
            * (2 if c["op"] == "AllReduce" else 1) * (n - 1) / n
            for c in colls
        )
        rows.append(
            {
                "rank": entry["rank"],
                "tp_rank": entry["tp_rank"],
                "stage": entry["stage"],
                "file": entry["file"],
                "weight_bytes": entry["weight_bytes"],
                "collectives": len(colls),
                "allreduce": sum(1 for c in colls if c["op"] == "AllReduce"),
                "allgather": sum(1 for c in colls if c["op"] == "AllGather"),
                "payload_bytes_per_token": int(per_token),
                "wire_bytes_per_token": int(wire),
            }
        )
    return rows
