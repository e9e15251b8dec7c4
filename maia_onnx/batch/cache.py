"""The batch cache: content hashes, step keys and a crash-safe content-addressed object store.

Every step's output lives in ``<cache>/objects/<key[:2]>/<key>/`` where the key hashes the step name, its
options, the *content* hash of its input artifact and the tool version. A step is built in ``<cache>/tmp/``
and renamed into place only after its ``meta.json`` (with the artifact's own content hash) is written, so a
kill at any moment never exposes a half-written artifact; a lookup discards objects whose files no longer
match their recorded content hash.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import maia_onnx.models
from maia_onnx import __version__
from maia_onnx.batch.jobfile import Step, is_model_file
from maia_onnx.batch.steps import SIDE_FILES
from maia_onnx.errors import UserError
from maia_onnx.io import model_content_hash, sha256_file

META = "meta.json"


def tool_version() -> str:
    return f"maia-onnx {__version__}"


def _sha_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def tree_hash(path: Path, exclude: Sequence[str] = (META,)) -> str:
    """Content hash of a file or directory tree: relative names + file contents, names sorted."""
    path = Path(path)
    if path.is_file():
        return _sha_bytes(b"file", sha256_file(path).encode())
    entries = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in exclude:
            continue
        entries.append(rel.encode() + b"\0" + sha256_file(f).encode())
    return _sha_bytes(b"tree", *entries)


def object_hash(directory: Path) -> str:
    """Content of a cache object: the artifact with its external data, not meta or the steps' side reports
    (reports carry timings, so they differ between two otherwise identical builds)."""
    return tree_hash(directory, exclude=(META, *SIDE_FILES))


def source_hash(model: str) -> str:
    """Content hash of a job's starting point: the .onnx (+ external data), an HF directory, or model code."""
    if is_model_file(model):
        if not Path(model).is_file():
            raise UserError(f"model file not found: {model} (check the job's model path)")
        try:
            return _sha_bytes(b"onnx", model_content_hash(model).encode())
        except Exception:  # noqa: BLE001 - unreadable ONNX: hash the bytes; the first step reports the real problem
            return _sha_bytes(b"file", tree_hash(Path(model)).encode())
    if model.startswith("hf:"):
        directory = Path(model[3:])
        if not directory.is_dir():
            raise UserError(f"HF directory not found: {directory} (check the job's model: hf:DIR)")
        return _sha_bytes(b"hf", tree_hash(directory, exclude=()).encode())
    # built-in name or package.module:factory: the code that defines the model is its content
    files: list[Path] = []
    if ":" in model:
        spec = importlib.util.find_spec(model.split(":", 1)[0])
        if spec is not None and spec.origin:
            files.append(Path(spec.origin))
    else:
        files += sorted(Path(maia_onnx.models.__file__).resolve().parent.glob("*.py"))
    return _sha_bytes(b"code", model.encode(), *[f.read_bytes() for f in files if f.is_file()])


def step_key(step: Step, input_hash: str, extra: Mapping[str, Any] | None = None) -> str:
    """Cache key: step name + options + input content hash + tool version (never names or paths alone)."""
    payload = {"step": step.name, "options": step.options, "input": input_hash, "tool": tool_version(),
               "extra": dict(extra or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Cache:
    """``objects/<key>/`` (complete, with meta.json) and ``tmp/`` (in progress; never read)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"

    def ensure(self) -> None:
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.objects / key[:2] / key

    def artifact(self, meta: Mapping[str, Any]) -> Path:
        """Where a committed object's artifact (file or directory) lies."""
        return self.path(meta["key"]) / meta["artifact"]

    def lookup(self, key: str, verify: bool = True) -> dict | None:
        """The meta of a complete object whose content still matches, else None (a corrupt one is removed)."""
        obj = self.path(key)
        meta_path = obj / META
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = None
        if meta is None or "artifact" not in meta or not (obj / meta["artifact"]).exists() or (
                verify and object_hash(obj) != meta.get("content_hash")):
            self._discard(obj)
            return None
        return meta

    def _discard(self, obj: Path) -> None:
        trash = self.tmp / f"trash-{obj.name}-{os.getpid()}-{time.time_ns()}"
        with contextlib.suppress(OSError):
            os.replace(obj, trash)
            shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[Path]:
        """A fresh temp dir under tmp/; :meth:`commit` moves it into objects/ atomically."""
        self.ensure()
        work = Path(tempfile.mkdtemp(prefix=f"{key[:16]}.{os.getpid()}.", dir=self.tmp))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def commit(self, key: str, work: Path, meta: dict) -> dict:
        meta = {**meta, "key": key, "content_hash": object_hash(work)}
        with open(work / META, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_tree(work)
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(work, final)  # atomic; fails if another worker committed the same key first
        except OSError:
            existing = self.lookup(key)
            if existing is None:
                raise
            return existing
        with contextlib.suppress(OSError):
            fd = os.open(final.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        return meta

    @contextlib.contextmanager
    def key_lock(self, key: str) -> Iterator[None]:
        """Exclusive per-key lock (flock: released by the kernel even on SIGKILL) so two jobs needing the
        same step build it once: the second waits and then finds it cached."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def clean_stale(self) -> int:
        """Remove temp dirs left by processes that no longer run (a killed earlier batch)."""
        removed = 0
        if not self.tmp.is_dir():
            return 0
        for entry in self.tmp.iterdir():
            match = re.match(r"^[0-9a-f]{16}\.(\d+)\.", entry.name)
            pid = int(match.group(1)) if match else None
            if pid is None or not _pid_alive(pid):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError):
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
