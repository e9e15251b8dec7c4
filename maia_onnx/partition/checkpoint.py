"""Safetensors checkpoints of partition weights: write each shard's initializers, swap them back into a partition.

A checkpoint directory holds ``rank{r}_stage{s}.safetensors`` (one per shard file of the partition,
same tensor names as the shard's initializers) and ``checkpoint.json`` (files, sha256, layout).
Files are written tensor by tensor (never two copies of the weights in memory) in the standard
safetensors layout, FP8 as ``F8_E4M3``/``F8_E5M2``; reading memory-maps them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError, ModelLoadError, UserError
from maia_onnx.io import atomic_dir, atomic_write, load_model, sha256_file, write_text_atomic
from maia_onnx.partition.manifest import MANIFEST, read_manifest
from maia_onnx.partition.writer import write_model_streaming
from maia_onnx.report import dumps

CHECKPOINT_INDEX = "checkpoint.json"
_ALIGN = 8

# ONNX dtype -> safetensors dtype tag (the tags safetensors itself writes)
_ST_DTYPE = {
    ir.DataType.FLOAT: "F32",
    ir.DataType.DOUBLE: "F64",
    ir.DataType.FLOAT16: "F16",
    ir.DataType.BFLOAT16: "BF16",
    ir.DataType.INT64: "I64",
    ir.DataType.INT32: "I32",
    ir.DataType.INT16: "I16",
    ir.DataType.INT8: "I8",
    ir.DataType.UINT64: "U64",
    ir.DataType.UINT32: "U32",
    ir.DataType.UINT16: "U16",
    ir.DataType.UINT8: "U8",
    ir.DataType.BOOL: "BOOL",
    ir.DataType.FLOAT8E4M3FN: "F8_E4M3",
    ir.DataType.FLOAT8E5M2: "F8_E5M2",
}
_IR_DTYPE = {v: k for k, v in _ST_DTYPE.items()}


def _np_dtype(dtype: ir.DataType) -> np.dtype:
    return np.dtype(dtype.numpy())


@dataclass
class ShardFile:
    """One shard model of a partition directory."""

    rank: int
    stage: int
    path: Path

    @property
    def stem(self) -> str:
        return f"rank{self.rank}_stage{self.stage}"


def partition_shards(partition_dir: str | os.PathLike) -> list[ShardFile]:
    """The rank files of a partition directory, as its manifest lists them (stage-major)."""
    manifest = read_manifest(partition_dir, check_models=False)
    return sorted((ShardFile(t, s, path) for t, s, path in manifest.rank_files()), key=lambda f: (f.stage, f.rank))


# ---------------------------------------------------------------- safetensors writer / reader


def _tensor_entry(tensor: ir.TensorProtocol) -> tuple[str, list[int], int, str | None]:
    dtype = tensor.dtype
    shape = [int(d) for d in tensor.shape.numpy()]
    if dtype in _ST_DTYPE:
        return _ST_DTYPE[dtype], shape, tensor.nbytes, None
    # Packed sub-byte formats (INT4, FP4, ...): stored as raw bytes, original type kept in the metadata.
    return "U8", [tensor.nbytes], tensor.nbytes, dtype.name


def _byte_view(tensor: ir.TensorProtocol) -> memoryview | bytes:
    """The tensor's raw bytes, as a view into its array where possible (no extra copy of big weights)."""
    if tensor.dtype not in _ST_DTYPE:
        return tensor.tobytes()  # packed sub-byte types: their own byte layout
    arr = np.ascontiguousarray(tensor.numpy())
    if not arr.dtype.isnative:
        return tensor.tobytes()
    return memoryview(arr.reshape(-1).view(np.uint8))


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, ir.TensorProtocol]],
                      metadata: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """Stream ``(name, tensor)`` pairs into one safetensors file, atomically; one tensor in memory at a time.

    Returns the path and the file's sha256 (hashed while writing, so the file is never read back).
    """
    import hashlib

    items = list(tensors)
    header: dict[str, object] = {}
    packed: dict[str, str] = {}
    offset = 0
    for name, tensor in items:
        st_dtype, shape, nbytes, original = _tensor_entry(tensor)
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        if original:
            packed[name] = original
    meta = dict(metadata or {})
    if packed:
        meta["maia.packed_dtypes"] = json.dumps(packed, sort_keys=True)
    if meta:
        header["__metadata__"] = {str(k): str(v) for k, v in meta.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % _ALIGN)
    path = Path(path)
    digest = hashlib.sha256()
    with atomic_write(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        for _, tensor in items:
            view = _byte_view(tensor)
            f.write(view)
            digest.update(view)
            del view
            # drop a memory-mapped source's mapping: otherwise every written tensor stays resident
            release = getattr(tensor, "release", None)
            if callable(release):
                release()
    return path, digest.hexdigest()


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}): re-write the checkpoint") from exc
    meta = header.pop("__metadata__", {}) or {}
    return header, meta, 8 + n


def _read_range(path: Path, offset: int, nbytes: int) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(offset)
        raw = np.frombuffer(f.read(nbytes), dtype=np.uint8)
    if raw.size != nbytes:
        raise ModelLoadError(f"{path} is truncated: re-write the checkpoint")
    return raw


def read_safetensors(path: str | os.PathLike) -> dict[str, ir.TensorProtocol]:
    """Tensors of a safetensors file as lazy onnx_ir tensors (FP8/BF16 as ml_dtypes).

    Each tensor is read from disk when asked for and not kept, so streaming a checkpoint into a
    partition holds one tensor at a time.
    """
    path = Path(path)
    header, meta, base = read_safetensors_header(path)
    packed = json.loads(meta.get("maia.packed_dtypes", "{}"))
    size = path.stat().st_size
    out: dict[str, ir.TensorProtocol] = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if base + end > size:
            raise ModelLoadError(f"{path} is truncated (tensor {name!r} ends past the file): re-write the checkpoint")
        if name in packed:
            out[name] = _packed(path, base + begin, end - begin, ir.DataType[packed[name]], name)
            continue
        if entry["dtype"] not in _IR_DTYPE:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported safetensors dtype {entry['dtype']}")
        dtype = _IR_DTYPE[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])

        def load(offset=base + begin, nbytes=end - begin, dtype=dtype, shape=shape, name=name) -> ir.Tensor:
            return ir.Tensor(_read_range(path, offset, nbytes).view(_np_dtype(dtype)).reshape(shape), dtype=dtype, name=name)

        out[name] = ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(shape), name=name)
    return out


def _packed(path: Path, offset: int, nbytes: int, dtype: ir.DataType, name: str) -> ir.TensorProtocol:
    # Sub-byte tensors need the shape of the initializer they replace; they are rebuilt in swap_weights.
    return ir.Tensor(_read_range(path, offset, nbytes), name=name, doc_string=f"packed:{dtype.name}")


# ---------------------------------------------------------------- partition <-> checkpoint


def save_checkpoint(partition_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, progress: bool = False) -> dict:
    """Write every shard's initializers to ``checkpoint_dir/rank{r}_stage{s}.safetensors`` (atomic as a whole)."""
    shards = partition_shards(partition_dir)
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.resolve() == Path(partition_dir).resolve():
        raise UserError(f"--checkpoint {checkpoint_dir} is the partition directory itself: choose a separate directory")
    files = {}
    manifest_hash = sha256_file(Path(partition_dir) / "manifest.json")
    iterator: Iterator[ShardFile] = iter(shards)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(shards, desc="checkpoint", unit="shard", file=sys.stderr)
    with atomic_dir(checkpoint_dir) as tmp:
        for shard in iterator:
            model = load_model(shard.path)
            tensors = [(name, v.const_value) for name, v in model.graph.initializers.items() if v.const_value is not None]
            out, digest = write_safetensors(
                tmp / f"{shard.stem}.safetensors",
                tensors,
                {"maia.rank": str(shard.rank), "maia.stage": str(shard.stage), "maia.source": shard.path.name},
            )
            files[out.name] = {
                "rank": shard.rank,
                "stage": shard.stage,
                "tensors": len(tensors),
                "bytes": sum(t.nbytes for _, t in tensors),
                "sha256": digest,
            }
            del model
        index = {"format": "maia-onnx-checkpoint", "version": 1, "partition_manifest_sha256": manifest_hash, "files": files}
        write_text_atomic(tmp / CHECKPOINT_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def _checkpoint_index(checkpoint_dir: Path) -> dict:
    idx = checkpoint_dir / CHECKPOINT_INDEX
    if not checkpoint_dir.is_dir():
        raise ModelLoadError(f"checkpoint directory {checkpoint_dir} not found: pass a directory written with --checkpoint")
    if not idx.is_file():
        raise ModelLoadError(f"{checkpoint_dir} has no {CHECKPOINT_INDEX}: it is not a maia-onnx checkpoint (write one with --checkpoint)")
    return json.loads(idx.read_text())


def swap_weights(model: ir.Model, tensors: Mapping[str, ir.TensorProtocol], where: str) -> int:
    """Replace ``model``'s initializers by ``tensors`` (same names, shapes, dtypes); returns the count swapped."""
    inits = model.graph.initializers
    missing = sorted(set(inits) - set(tensors))
    extra = sorted(set(tensors) - set(inits))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unknown {extra[:3]}"
        raise InvalidOptionError(
            f"checkpoint {where} does not match the partition ({what}): use a checkpoint written for this TP/PP layout"
        )
    for name, value in inits.items():
        new = tensors[name]
        old = value.const_value
        if new.doc_string and new.doc_string.startswith("packed:"):
            if new.nbytes != old.nbytes:
                raise InvalidOptionError(
                    f"checkpoint {where}: packed tensor {name!r} has {new.nbytes} bytes, the partition expects {old.nbytes}"
                )
            new = ir.Tensor(np.asarray(new.numpy()).view(np.uint8), dtype=old.dtype, shape=old.shape, name=name)
        if new.dtype != old.dtype or tuple(new.shape.numpy()) != tuple(old.shape.numpy()):
            raise InvalidOptionError(
                f"checkpoint {where}: tensor {name!r} is {new.dtype.name}{list(new.shape.numpy())} but the partition "
                f"expects {old.dtype.name}{list(old.shape.numpy())}: use a checkpoint of the same layout and format"
            )
        value.const_value = new
    return len(inits)


def load_checkpoint(partition_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike,
                    progress: bool = False) -> dict:
    """Write ``output_dir``: the partition at ``partition_dir`` with its weights swapped from ``checkpoint_dir``.

    Shapes, dtypes and names must match shard by shard; the input partition is left untouched.
    """
    partition_dir = Path(partition_dir)
    checkpoint_dir = Path(checkpoint_dir)
    output_dir = Path(output_dir)
    shards = partition_shards(partition_dir)
    index = _checkpoint_index(checkpoint_dir)
    if output_dir.resolve() == partition_dir.resolve():
        raise UserError(f"-o {output_dir} is the input partition: choose a different output directory")
    wanted = {f"{s.stem}.safetensors" for s in shards}
    have = set(index.get("files", {}))
    if wanted != have:
        raise InvalidOptionError(
            f"checkpoint {checkpoint_dir} holds {len(have)} shard file(s) but the partition has {len(wanted)} "
            f"(e.g. {sorted(wanted ^ have)[:2]}): use a checkpoint written for this TP/PP layout"
        )
    manifest = json.loads((partition_dir / MANIFEST).read_text())
    swapped = 0
    iterator: Iterable[ShardFile] = shards
    if progress:
        from tqdm import tqdm

        iterator = tqdm(shards, desc="load checkpoint", unit="shard", file=sys.stderr)
    with atomic_dir(output_dir) as tmp:
        shard_names = {s.path.name for s in shards}
        for p in partition_dir.iterdir():
            if p.is_file() and p.name != MANIFEST and p.name not in shard_names and not p.name.endswith(".onnx.data"):
                shutil.copy2(p, tmp / p.name)
        for shard in iterator:
            name = f"{shard.stem}.safetensors"
            st_path = checkpoint_dir / name
            expected = index["files"][name].get("sha256")
            if expected and sha256_file(st_path) != expected:
                raise ModelLoadError(f"checkpoint file {st_path} does not match its sha256 in {CHECKPOINT_INDEX}: it is corrupt or was edited")
            model = load_model(shard.path)
            swapped += swap_weights(model, read_safetensors(st_path), str(st_path))
            # The partition writer's own layout, so a swapped partition is byte-identical to a fresh one.
            weight_bytes = write_model_streaming(model, tmp / shard.path.name)
            del model
            for entry in manifest.get("ranks", []):
                if entry.get("file") == shard.path.name:
                    entry["sha256"] = sha256_file(tmp / shard.path.name)
                    entry["weight_bytes"] = weight_bytes
                    entry["data"] = f"{shard.path.name}.data" if (tmp / f"{shard.path.name}.data").exists() else None
        manifest.setdefault("extra", {})["checkpoint"] = {"loaded_from": str(checkpoint_dir), "files": len(shards)}
        (tmp / MANIFEST).write_text(dumps(manifest) + "\n")
    return {"output": str(output_dir), "shards": len(shards), "tensors_swapped": swapped}


__all__ = [
    "CHECKPOINT_INDEX",
    "ShardFile",
    "load_checkpoint",
    "partition_shards",
    "read_safetensors",
    "read_safetensors_header",
    "save_checkpoint",
    "swap_weights",
    "write_safetensors",
]
