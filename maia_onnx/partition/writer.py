"""Writing partition directories: rank files streamed tensor by tensor through O_DIRECT staging buffers.

``PartitionWriter`` owns everything one write needs (the disk-write thread, the staging buffers, the read
block used to cut column shards); nothing is kept between writes. Weights are materialised one at a time
(lazy slices of the source's memory-mapped data are cut here), so writing never holds a copy of all weights.
The directory layout and manifest schema are in ``maia_onnx.partition.manifest``.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import queue
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.io import atomic_dir, sha256_file
from maia_onnx.partition.manifest import (
    INLINE_LIMIT_BYTES,
    MANIFEST,
    PLACEHOLDER_LOCATION,
    Manifest,
    global_rank,
    rank_file_name,
    validate_partition,
)
from maia_onnx.passes.tensor_parallel.slices import SourceCache
from maia_onnx.report import dumps

ALIGNMENT = 64
READ_BLOCK_BYTES = 8 << 20  # rows of a column-sharded weight read per step: stays in L3 while every rank cuts it
Progress = Callable[[int], None] | None


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


class _BufferPool:
    """Page-aligned staging buffers shared by the files written together (``nfiles + 2`` of ``chunk`` bytes).

    A file holds one buffer while filling it; a full buffer goes to the writer thread and comes back here
    once on disk, so filling never waits for a particular file's write, only for any buffer to free up.
    Buffers are anonymous memory touched only as far as they are filled (small models stay small in RSS).
    """

    BLOCK = 4096

    def __init__(self, nfiles: int, chunk: int | None = None, file_bytes: int | None = None):
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
        if self.made < self.count:
            try:
                return self.free.get_nowait()
            except queue.Empty:
                self.made += 1
                return self.allocate(touch=False)  # its pages fault in as it fills
        return self.free.get()

    def allocate(self, touch: bool = True) -> np.ndarray:
        try:
            buf = np.frombuffer(mmap.mmap(-1, self.chunk), np.uint8)  # page aligned, as O_DIRECT requires
        except (OSError, ValueError):
            raw = np.empty(self.chunk + self.BLOCK, np.uint8)
            start = (-raw.ctypes.data) % self.BLOCK  # O_DIRECT needs an aligned user buffer
            buf = raw[start:start + self.chunk]
        if touch:
            # fault the pages in now, one write per page (NumPy drops the GIL; MAP_POPULATE would hold it): this
            # runs in the writer thread while the graph is rewritten (see PartitionWriter.prepare)
            buf.reshape(-1, self.BLOCK)[:, 0] = 0
        return buf

    def put(self, buf: np.ndarray) -> None:
        self.free.put(buf)


class _DirectWriter:
    """Sequential writer of one file through pooled aligned staging buffers, with O_DIRECT (page cache bypassed).

    Buffered writes of multi-GB shards are throttled by dirty-page accounting (erratic: 0.6-4 GB/s on our
    VMs, depending on what else is being written back); O_DIRECT writes of large aligned chunks run at disk
    speed, in a background thread while the next buffers fill. Callers put bytes straight into the staging
    buffer (``write``, ``write_from_file``, ``write_rows``): one copy per byte on the way to disk.
    Falls back to ordinary writes where O_DIRECT is unsupported.
    """

    BLOCK = 4096

    def __init__(self, path: Path, pool: _BufferPool, flusher: Executor):
        self.path = path
        self.pool = pool
        self.flusher = flusher
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
        self.pending: list[Future] = []

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
        self.pending.append(self.flusher.submit(self._write_all, buf, length, self.file_offset))
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


class _RankFileWriter:
    """Streams one model's initializers (over 1 KiB) into ``<path>.data``, one tensor per ``write`` call."""

    def __init__(self, owner: PartitionWriter, model: ir.Model, path: Path, pool: _BufferPool):
        self.owner = owner
        self.model = model
        self.path = Path(path)
        self.data_name = f"{self.path.name}.data"
        self.values = [v for v in model.graph.initializers.values() if v.const_value is not None]
        self.writer = _DirectWriter(self.path.parent / self.data_name, pool, owner.flusher)
        self.written = 0

    def streamable(self, index: int) -> tuple[ir.TensorProtocol, int, list[tuple[int, int]]] | None:
        """The (source, axis, ranges) of initializer ``index`` if it can be cut straight from its source."""
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

    def end(self, index: int, offset: int, progress: Progress) -> None:
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

    def write(self, index: int, progress: Progress = None) -> None:
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
            self.owner.write_slices(spec[0], spec[1], [(self, index, spec[2])], progress)
            return
        offset = self.begin()
        view = _tensor_bytes_view(tensor)
        self.writer.write(view)
        del view
        self.end(index, offset, progress)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the error being raised is the one to report
            self.writer.close()

    def finish(self) -> int:
        self.writer.flush()
        # the graph is serialised while the last weight buffers are still being written (it only refers to them)
        ir.save(self.model, self.path)
        self.writer.close()
        if self.written == 0:
            os.unlink(self.path.parent / self.data_name)
        return self.written


class PartitionWriter:
    """One partition write: owns the disk-write thread, the staging buffers and the read block.

    Use as a context manager (``close`` frees the buffers and stops the thread). ``chunk`` fixes the staging
    buffer size and ``read_block_bytes`` the rows read per step when cutting column shards (tests make both
    small to exercise buffer and block boundaries).
    """

    def __init__(self, chunk: int | None = None, read_block_bytes: int = READ_BLOCK_BYTES):
        # One thread for all disk writes, not one per file: on our VMs parallel O_DIRECT writes to several
        # files measured slower than one stream of large writes (the disk wants deep requests, not interleaved ones).
        self.flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maia-partition-writer")
        self.chunk = chunk
        self.read_block_bytes = read_block_bytes
        self._read_block = np.empty(0, np.uint8)
        self._prepared: tuple[int, Future] | None = None

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the read block and any staging buffers prepared but not used; stop the write thread."""
        self._read_block = np.empty(0, np.uint8)
        if self._prepared is not None:
            self._prepared[1].cancel()
            self._prepared = None
        self.flusher.shutdown(wait=True)

    def prepare(self, nfiles: int) -> None:
        """Allocate the staging buffers of the next ``nfiles``-file write in the background (while the graph is
        rewritten), so the first weights go to disk without waiting for fresh memory."""
        pool = _BufferPool(nfiles, self.chunk)
        self._prepared = (nfiles, self.flusher.submit(lambda: [pool.allocate() for _ in range(pool.count)]))

    def _take_prepared(self, pool: _BufferPool, nfiles: int) -> None:
        prepared, self._prepared = self._prepared, None
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

    def _block(self, nbytes: int) -> np.ndarray:
        if self._read_block.nbytes < nbytes:
            self._read_block = np.empty(nbytes, np.uint8)
        return self._read_block[:nbytes]

    def write_slices(self, source: ir.TensorProtocol, axis: int, targets, progress: Progress) -> None:
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
                    block_rows = max(1, min(outer, self.read_block_bytes // max(row, 1)))
                    block = self._block(block_rows * row)
                    for start in range(0, outer, block_rows):
                        n = min(block_rows, outer - start)
                        _pread_exact(fd, block[:n * row], base + start * row)
                        rows = block[:n * row].reshape(n, row)
                        for (w, _, _), spans in zip(targets, byte_ranges):
                            w.writer.write_rows(rows, spans)
            finally:
                os.close(fd)
        else:
            arr = SourceCache.get(source)  # evaluated once for all targets
            rows = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).reshape(outer, row)
            for (w, _, _), spans in zip(targets, byte_ranges):
                w.writer.write_rows(rows, spans)
            del rows, arr
            SourceCache.clear()
        for (w, index, _), offset in zip(targets, offsets):
            w.end(index, offset, progress)

    def write_model(self, model: ir.Model, path: Path, progress: Progress = None) -> int:
        """Save ``model`` to ``path`` with every initializer over 1 KiB streamed into ``<path>.data``.

        Tensors are materialised one at a time (lazy slices are evaluated here) and written straight to disk;
        the in-memory model is left pointing at the new file. Returns the weight bytes written.
        """
        out = _RankFileWriter(self, model, Path(path), _BufferPool(1, self.chunk, file_bytes=_weight_bytes(model)))
        try:
            for i in range(len(out.values)):
                out.write(i, progress)
        except BaseException:
            out.abort()
            raise
        return out.finish()

    def write_lockstep(self, models: Mapping[Any, tuple[ir.Model, Path]], progress: Progress = None) -> dict[Any, int]:
        """Write several rank files together, the i-th initializer of every model before the (i+1)-th.

        Rank models made by the same rewrite list their weights in the same order, so the i-th initializers of
        all ranks are usually slices of one source tensor: that tensor is read once and cut for all of them.
        """
        largest = max((_weight_bytes(model) for model, _ in models.values()), default=0)
        pool = _BufferPool(len(models), self.chunk, file_bytes=largest + ALIGNMENT * 256)
        self._take_prepared(pool, len(models))
        writers = {key: _RankFileWriter(self, model, Path(path), pool) for key, (model, path) in models.items()}
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
                    self.write_slices(source, axis, same, progress)
                    for w, s in members:
                        if s[1] != axis:
                            self.write_slices(s[0], s[1], [(w, i, s[2])], progress)
            for w in writers.values():
                w.writer.flush()
            return {key: w.finish() for key, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise

    def write_partition(
        self,
        out_dir: str | os.PathLike,
        rank_stage_models: Mapping[tuple[int, int], ir.Model] | Iterable[tuple[tuple[int, int], Callable[[], ir.Model]]],
        manifest: Mapping[str, Any],
        progress: Progress = None,
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
                sizes = self.write_lockstep(
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
                    weight_bytes = self.write_model(model, tmp / name, progress)
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
            (tmp / MANIFEST).write_text(dumps(data) + "\n")
            validate_partition(Manifest(data, tmp), check_models=False)
        return Manifest(data, out_dir)


def write_model_streaming(model: ir.Model, path: Path, progress: Progress = None) -> int:
    """``PartitionWriter.write_model`` with a writer of its own (one rank file, e.g. a checkpoint swap)."""
    with PartitionWriter() as writer:
        return writer.write_model(model, path, progress)


def write_partition(out_dir, rank_stage_models, manifest: Mapping[str, Any], progress: Progress = None) -> Manifest:
    """``PartitionWriter.write_partition`` with a writer of its own."""
    with PartitionWriter() as writer:
        return writer.write_partition(out_dir, rank_stage_models, manifest, progress)


def write_source_graph(model: ir.Model, path: str | os.PathLike, in_shards: set[str] | frozenset = frozenset()) -> Path:
    """Save ``model``'s graph with placeholders for the weights that live in the shards.

    ``in_shards``: initializer names some shard file holds (as is or sliced); those and every large
    tensor become placeholders, so swapping a checkpoint into the shards cannot leave stale copies here.
    """
    skeleton = model.clone()
    for name, value in skeleton.graph.initializers.items():
        t = value.const_value
        if t is None:
            continue
        if t.nbytes > INLINE_LIMIT_BYTES or name in in_shards:
            value.const_value = ir.ExternalTensor(
                PLACEHOLDER_LOCATION, 0, t.nbytes, t.dtype, shape=t.shape, name=name, base_dir=""
            )
        elif not isinstance(t, ir.Tensor):
            value.const_value = ir.Tensor(t.numpy(), dtype=t.dtype, name=name)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(ir.to_proto(skeleton).SerializeToString())
    return path


__all__ = ["PartitionWriter", "write_model_streaming", "write_partition", "write_source_graph"]
