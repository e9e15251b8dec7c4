"""Lazy weight slices: a rank's cut of a source weight, read only when it is written, the source read once.

``lazy_slice`` makes a ``SlicedTensor`` (an ``ir.LazyTensor`` that says which source, axis and ranges it is,
so the partition writer can stream the bytes straight from the source file); ``SourceCache`` keeps the last
source read in full so the ``tp`` ranks' slices of one tensor read it once; ``shard_ranges`` is the Megatron
layout of one axis, fused blocks (Q|K|V) included.
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir


class SourceCache:
    """The last source weight read in full, so the ranks' lazy slices of one tensor read it once, not tp times.

    Each read is a fresh array (never a reused buffer): a slice handed out earlier may still be alive.
    """

    key: int | None = None
    array: np.ndarray | None = None

    @classmethod
    def get(cls, tensor: ir.TensorProtocol) -> np.ndarray:
        if cls.key != id(tensor) or cls.array is None:
            cls.array = None
            cls.array = read_whole(tensor)
            cls.key = id(tensor)
        return cls.array

    @classmethod
    def clear(cls) -> None:
        cls.key, cls.array = None, None

    @classmethod
    def release_buffers(cls) -> None:
        cls.clear()


def read_whole(tensor: ir.TensorProtocol) -> np.ndarray:
    """The whole tensor in a private array: external data by positional reads (no mmap page faults)."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth % 8 == 0:
        dtype = np.dtype(tensor.dtype.numpy())
        shape = tuple(int(d) for d in tensor.shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = np.empty(nbytes, np.uint8)
        view = memoryview(raw)
        path = os.path.join(str(tensor.base_dir), tensor.location)
        fd = os.open(path, os.O_RDONLY)
        try:
            done, offset = 0, tensor.offset or 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"unexpected end of {path} reading {tensor.name!r}")
                done += n
        finally:
            view.release()
            os.close(fd)
        return raw.view(dtype).reshape(shape)
    arr = np.array(tensor.numpy(), copy=True)
    release = getattr(tensor, "release", None)
    if callable(release):
        try:
            release()
        except BufferError:
            pass
    return arr


class SlicedTensor(ir.LazyTensor):
    """A lazy slice of a source weight that says what it is: ``slice_source`` cut along ``slice_axis`` to
    ``slice_ranges`` (concatenated). The partition writer reads that description and streams the slice from
    the source file straight to disk; anyone else evaluating it gets a private array."""

    __slots__ = ("slice_axis", "slice_ranges", "slice_source")

    def __init__(self, func, dtype, shape, *, source, axis: int, ranges, name: str | None = None):
        super().__init__(func, dtype=dtype, shape=shape, name=name)
        self.slice_source = source
        self.slice_axis = axis
        self.slice_ranges = tuple(tuple(r) for r in ranges)


def lazy_slice(tensor: ir.TensorProtocol, axis: int, ranges: list[tuple[int, int]], name: str, last: bool) -> SlicedTensor:
    """Part(s) of ``tensor`` along ``axis`` (concatenated), read only when written; ``last``: the final
    rank's cut, after which the cached source is dropped (it is read once per tensor, not once per rank)."""
    shape = [int(d) for d in tensor.shape]
    shape[axis] = sum(b - a for a, b in ranges)
    dtype = tensor.dtype

    def load() -> ir.Tensor:
        arr = SourceCache.get(tensor)
        pieces = []
        for a, b in ranges:
            index = [slice(None)] * arr.ndim
            index[axis] = slice(a, b)
            pieces.append(arr[tuple(index)])
        part = pieces[0]
        if len(pieces) > 1 or not part.flags["C_CONTIGUOUS"]:
            out_shape = list(part.shape)
            out_shape[axis] = shape[axis]
            # a fresh array per slice: a shared scratch buffer here let the next rank's cut overwrite this
            # rank's weights (Conv input-channel shards came out identical on every rank -> wrong TP outputs)
            out = np.empty(out_shape, dtype=part.dtype)
            np.concatenate(pieces, axis=axis, out=out)
            part = out
        # (a contiguous leading-axis shard stays a view of the cached source: that array is never reused)
        if last:
            SourceCache.clear()  # nobody needs this tensor any more
        return ir.Tensor(part, dtype=dtype, name=name)

    return SlicedTensor(load, dtype, ir.Shape(shape), source=tensor, axis=axis, ranges=ranges, name=name)


def shard_ranges(size: int, tp: int, rank: int, sections=1) -> list[tuple[int, int]]:
    """Rank ``rank``'s ranges of an axis of ``size`` made of ``sections`` equal fused blocks (e.g. Q|K|V), or of
    ``(size, split)`` segments (a segment that is not split is held whole by every rank)."""
    if isinstance(sections, tuple):
        ranges, offset = [], 0
        for n, split in sections:
            ranges.append((offset + rank * (n // tp), offset + (rank + 1) * (n // tp)) if split else (offset, offset + n))
            offset += n
        return ranges
    block = size // sections
    n = block // tp
    return [(s * block + rank * n, s * block + (rank + 1) * n) for s in range(sections)]
