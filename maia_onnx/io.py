"""Model and file I/O: lazy onnx_ir loading with external data, atomic writes that never leave partial output."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnx.external_data_helper import uses_external_data

from maia_onnx.errors import ModelLoadError, UnsupportedModelError, UserError

# Protobuf refuses messages over 2 GiB; stay clear of it with headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
EXTERNAL_SIZE_THRESHOLD = 1024  # tensors smaller than this stay inline even in external-data mode


def _check_model_path(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path} (check the path)")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, expected an .onnx file (pass the model file inside it)")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes): re-export or copy the model again")


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Fail early with a clear message when an external-data file is missing or too short."""
    sizes: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data_path = Path(tensor.base_dir) / tensor.location
            key = str(data_path)
            if key not in sizes:
                if not data_path.is_file():
                    raise ModelLoadError(
                        f"external data file {tensor.location!r} of {path.name} not found next to the model "
                        f"(expected {data_path}); copy it beside the .onnx file"
                    )
                sizes[key] = data_path.stat().st_size
            end = (tensor.offset or 0) + (tensor.length or 0)
            if end > sizes[key]:
                raise ModelLoadError(
                    f"external data file {data_path} is truncated ({sizes[key]} bytes, tensor {value.name!r} "
                    f"needs {end}); copy the complete file again"
                )


MIN_OPSET = 6  # oldest opset ONNX Runtime still has kernels for (ONNX's legacy pytorch-converted test models use it)


def check_opsets(opset_imports, where) -> None:
    """Refuse ai.onnx opsets ONNX Runtime cannot run (< 7) or newer than the installed onnx package knows."""

    newest = onnx.defs.onnx_opset_version()
    version = opset_imports.get("", opset_imports.get("ai.onnx"))
    if version is None:
        return
    if version < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where} uses opset {version}, older than the oldest supported ({MIN_OPSET}): "
            f"upgrade it with onnx.version_converter.convert_version(model, 17)"
        )
    if version > newest:
        raise UnsupportedModelError(
            f"{where} uses opset {version}, newer than the installed onnx supports ({newest}): "
            f"re-export with --opset {newest} or upgrade the onnx package"
        )


def _check_standard_ops(model: ir.Model, where) -> None:
    """Every ai.onnx node must be an op of the model's opset with a legal number of inputs (as onnx.checker requires)."""

    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None:
        return
    local = {(f.domain, f.name) for f in model.functions.values()}
    schemas: dict[str, object] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or ("", node.op_type) in local:
            continue
        if node.op_type not in schemas:
            try:
                schemas[node.op_type] = onnx.defs.get_schema(node.op_type, version, "")
            except onnx.defs.SchemaError:
                raise UnsupportedModelError(
                    f"{where}: node {node.name or node.op_type!r} uses op {node.op_type!r}, which ONNX opset {version} "
                    f"does not define (onnx.checker rejects it): fix the op type or its domain") from None
        schema = schemas[node.op_type]
        given = len(node.inputs)
        while given and node.inputs[given - 1] is None:
            given -= 1  # trailing omitted optional inputs
        if given < schema.min_input or given > schema.max_input:
            raise ModelLoadError(
                f"{where}: node {node.name or node.op_type!r} ({node.op_type}) has {given} inputs, opset {version} "
                f"allows {schema.min_input}..{schema.max_input} (onnx.checker rejects it): fix or re-export the model")


def check_model_supported(model: ir.Model, where) -> None:
    """Cheap structural checks that catch models the ONNX checker rejects before any tool trusts them."""
    check_opsets(model.opset_imports, where)
    graph = model.graph
    known = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        for value in node.inputs:
            if value is None or id(value) in known or value.producer() is not None:
                continue
            raise ModelLoadError(
                f"{where} is not a valid ONNX model: node {node.name or node.op_type!r} reads {value.name!r}, which is "
                f"no graph input, initializer or node output (onnx.checker rejects it): fix or re-export the model"
            )
    _check_standard_ops(model, where)
    for value in graph.outputs:
        if id(value) not in known and value.producer() is None:
            raise ModelLoadError(
                f"{where} is not a valid ONNX model: graph output {value.name!r} is produced by no node: fix or re-export it"
            )


class _BinaryAttributeFilter(logging.Filter):
    # EPContext nodes keep binary programs in STRING attributes, exactly as ORT's own EPs do; onnx_ir warns
    # about every such attribute, which is noise here.
    def filter(self, record):
        return "UTF-8" not in record.getMessage()


def quiet_binary_attribute_warnings() -> None:
    for name in ("onnx_ir", "onnx_ir.serde", "onnx_ir._core"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BinaryAttributeFilter) for f in logger.filters):
            logger.addFilter(_BinaryAttributeFilter())


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model as onnx_ir; external weights stay memory-mapped (never read eagerly)."""
    quiet_binary_attribute_warnings()
    path = Path(path)
    _check_model_path(path)
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises a zoo of types for garbage input
        cause = exc.__cause__
        if isinstance(cause, ValueError) and "model is invalid" in str(cause):
            # it parsed, but the graph breaks ONNX rules (e.g. a value produced twice): say which, not "truncated?"
            reason = str(cause).splitlines()[0][:200]
            raise ModelLoadError(f"{path} is not a valid ONNX model: {reason}: fix or re-export it") from exc
        raise ModelLoadError(
            f"cannot parse {path} as an ONNX model ({type(exc).__name__}): is it truncated or not ONNX?"
        ) from exc
    check_model_supported(model, path)
    _check_external_data(model, path)
    return model


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of all initializers (as stored), without loading external data."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse to overwrite an input and make sure the output directory is writable."""
    output = Path(output)
    for inp in inputs:
        if inp is not None and same_file(output, inp):
            raise UserError(f"output path {output} is the input path: choose a different -o so the input is kept")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"output directory {parent} does not exist: create it first")
    if not parent.is_dir():
        raise UserError(f"output directory {parent} is a file, not a directory: choose another -o")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output directory {parent} is not writable: choose another -o")
    return output


def _os_error(exc: OSError, target: Path) -> UserError:
    if exc.errno == errno.ENOSPC:
        return UserError(f"no space left on device while writing {target}: free disk space and retry (nothing was written)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"permission denied writing {target}: choose a writable output location")
    return UserError(f"cannot write {target}: {exc.strerror or exc}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temp file beside ``path``; rename over it only if the block finishes without error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _os_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory that replaces ``path`` as a whole when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(exc, path) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _wants_external(model: ir.Model, external_data: bool | None) -> bool:
    if external_data is not None:
        return external_data
    return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Save atomically: model (and ``<name>.data`` when external) appear together or not at all.

    ``external_data=None`` switches to external data automatically above the protobuf limit.
    Weights already memory-mapped from another file are streamed, not loaded whole.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    use_external = _wants_external(model, external_data)
    data_name = f"{path.name}.data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        tmp_model = tmpdir / path.name
        if use_external:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=EXTERNAL_SIZE_THRESHOLD)
        else:
            proto = ir.to_proto(model)
            # Tensors that were external in the source must be inlined, or the output would point at the input's data.
            if any(uses_external_data(t) for t in proto.graph.initializer):
                for value in model.graph.initializers.values():
                    if isinstance(value.const_value, ir.ExternalTensor):
                        value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
                proto = ir.to_proto(model)
            with open(tmp_model, "wb") as f:
                f.write(proto.SerializeToString())
        data_tmp = tmpdir / data_name
        if data_tmp.exists():
            os.replace(data_tmp, parent / data_name)
        elif (parent / data_name).exists() and not use_external:
            os.unlink(parent / data_name)  # stale side file from an earlier external save
        os.replace(tmp_model, path)
    except OSError as exc:
        raise _os_error(exc, path) from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def external_data_files(model: ir.Model) -> list[Path]:
    """The external data files the model's initializers reference, each once, in first-reference order."""
    files: dict[Path, None] = {}
    for value in model.graph.initializers.values():
        t = value.const_value
        if isinstance(t, ir.ExternalTensor):
            files.setdefault(Path(t.base_dir) / t.location)
    return list(files)


def model_content_hash(path: str | os.PathLike) -> str:
    """Hash of a model file and its external data files (content, not names)."""
    path = Path(path)
    h = hashlib.sha256()
    h.update(sha256_file(path).encode())
    for data in external_data_files(ir.load(path)):
        h.update(sha256_file(data).encode())
    return h.hexdigest()


class SpillFile:
    """Arrays parked on disk while a long computation makes more of them (GPTQ's packed weights of a multi-GB
    model), each read back whole on demand.  One unlinked temporary file (``TMPDIR``) that vanishes when closed or
    when the process ends, so nothing is left behind; reads use ``pread`` into fresh memory, never a mapping, so the
    pages read stay out of this process's resident set once the array is dropped."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._file = tempfile.TemporaryFile(prefix="maia-spill-", dir=directory)
        self._end = 0

    def put(self, array: np.ndarray) -> tuple[int, np.dtype, tuple[int, ...]]:
        """Write ``array``; returns the handle ``get`` takes."""
        array = np.ascontiguousarray(array)
        data = memoryview(array.reshape(-1).view(np.uint8))
        offset = self._end
        try:
            written = os.pwrite(self._file.fileno(), data, offset)
            while written < len(data):
                written += os.pwrite(self._file.fileno(), data[written:], offset + written)
        except OSError as exc:
            raise _os_error(exc, Path(tempfile.gettempdir())) from exc
        self._end += len(data)
        return offset, array.dtype, tuple(array.shape)

    def get(self, handle: tuple[int, np.dtype, tuple[int, ...]]) -> np.ndarray:
        offset, dtype, shape = handle
        out = np.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise UserError(f"spill file ended {len(view) - done} bytes early: was {tempfile.gettempdir()} cleaned?")
            done += n
        return out

    def close(self) -> None:
        self._file.close()


def give_back_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``).  Streaming a multi-GB model frees and
    allocates arrays of tens of MB; glibc keeps those under its 32 MB mmap threshold in the heap, where freed
    pieces still count in the resident set, so a long run's RSS would creep up by hundreds of MB.  A no-op where
    the C library has no ``malloc_trim``."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def release_mapping(tensor) -> None:
    """Unmap a memory-mapped external tensor's file now, so streaming a model keeps one tensor resident, not all
    of them; the tensor maps again if read later.  Anything else is left alone."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # a view of the mapping is still alive: it goes when the view does
            pass


def proto_without_initializers(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a proto with no initializers, for callers that add only the ones they need
    (``initializer_proto``): no weight is read from disk or computed, whatever their size.  The model is left as
    it was."""
    graph = model.graph
    saved = dict(graph.initializers)
    graph.initializers.clear()
    try:
        return ir.to_proto(model)
    finally:
        graph.initializers.update(saved)


def initializer_proto(value: ir.Value) -> onnx.TensorProto:
    """One initializer as a proto: a file reference for external data, the values otherwise (a lazy tensor is
    computed now)."""
    tensor = ir.serde.serialize_tensor(value.const_value)
    tensor.name = value.name
    return tensor
