"""Offline compile for Maia: replace each device partition with a com.microsoft EPContext node holding a Maia program.

Follows ONNX Runtime's EPContext design (the convention of QNN/OpenVINO/TensorRT offline compile): one
``com.microsoft::EPContext`` node per partition with ``source="MaiaExecutionProvider"``, ``main_context``,
``embed_mode``, ``ep_cache_context`` (the program bytes when embedded, else the side file's path relative to the
model), ``ep_sdk_version``, ``partition_name``, ``hardware_architecture`` and ``onnx_model_filename``.
CPU nodes stay plain ONNX.

The Maia program (``MAIAPRG1``) is deterministic bytes:
``magic(8) | header_len(u64 LE) | header JSON (sorted keys) | pad to 64 | ONNX subgraph | weights (64-aligned)``.
The header lists the partition I/O, every weight (name, ONNX dtype, device format, shape, offset, length: FP8
bytes as stored, MX elements and E8M0 scales as stored), and the plan (schedule and a liveness-based memory arena
plan, roofline estimate). A side file (``embed_mode=0``) is a ``MAIACTX1`` container: header JSON
``{partition_name: [offset, length]}`` followed by the programs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

import onnx_ir as ir

from maia_onnx.errors import UserError
from maia_onnx.runtime.capability import Placement, get_capability

PROVIDER = "MaiaExecutionProvider"
EP_SDK_VERSION = "maia-onnx-emulator-1"
PROGRAM_MAGIC = b"MAIAPRG1"
CONTAINER_MAGIC = b"MAIACTX1"
ALIGN = 64

# ONNX dtype -> the device storage format name written in the program header.
DEVICE_FORMAT = {
    "FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16", "FLOAT8E4M3FN": "fp8-e4m3fn", "FLOAT8E5M2": "fp8-e5m2",
    "FLOAT8E8M0": "e8m0", "FLOAT4E2M1": "fp4-e2m1", "INT8": "int8", "UINT8": "uint8", "INT64": "int64",
    "INT32": "int32", "BOOL": "bool", "INT4": "int4", "UINT4": "uint4",
}


def _pad(n: int) -> int:
    return (-n) % ALIGN


@dataclass
class CompileResult:
    model: ir.Model
    placement: Placement
    programs: dict[str, bytes] = field(default_factory=dict)  # partition name -> program bytes (embedded compiles)
    path: Path | None = None
    side_file: Path | None = None

    def summary(self) -> dict:
        out = self.placement.summary()
        out["output"] = str(self.path) if self.path else None
        out["side_file"] = str(self.side_file) if self.side_file else None
        return out


def _value_spec(value: ir.Value) -> dict:
    shape = None if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
    return {"name": value.name, "dtype": value.dtype.name if value.dtype is not None else None, "shape": shape}


def _numel(value: ir.Value, dims: Mapping[str, int]) -> int:
    total = 1
    for d in value.shape or ():
        total *= d if isinstance(d, int) else int(dims.get(str(d), dims.get("*", 1)))
    return total


def _memory_plan(nodes: list[ir.Node], outputs: set[str], dims: Mapping[str, int]) -> dict:
    """First-fit arena for intermediate activations by liveness over the schedule (sizes at ``dims``)."""
    last_use: dict[str, int] = {}
    for step, node in enumerate(nodes):
        for v in node.inputs:
            if v is not None:
                last_use[v.name] = step
    buffers = []
    live: list[tuple[int, int, int]] = []  # (offset, size, last step)
    arena = 0
    for step, node in enumerate(nodes):
        live = [b for b in live if b[2] >= step]
        for v in node.outputs:
            if v.dtype is None:
                continue
            size = _numel(v, dims) * max(v.dtype.itemsize, 1)
            size += _pad(int(size))
            last = len(nodes) if v.name in outputs else last_use.get(v.name, step)
            offset = 0
            for b_off, b_size, _ in sorted(live):
                if offset + size <= b_off:
                    break
                offset = max(offset, b_off + b_size)
            live.append((offset, int(size), last))
            arena = max(arena, offset + int(size))
            buffers.append({"value": v.name, "offset": offset, "bytes": int(size), "first": step, "last": last})
    return {"arena_bytes": arena, "buffers": buffers, "dims": dict(sorted(dims.items()))}


def _subgraph_proto(model: ir.Model, nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value], name: str) -> bytes:
    """The partition as an ONNX model without weights (they travel packed beside it)."""
    import onnx

    from onnx_ir import serde

    graph = onnx.GraphProto(name=name)
    graph.node.extend(serde.serialize_node(n) for n in nodes)
    graph.input.extend(serde.serialize_value(v) for v in inputs)
    graph.output.extend(serde.serialize_value(v) for v in outputs)
    proto = onnx.ModelProto(ir_version=model.ir_version, producer_name="maia-onnx")
    used_domains = {n.domain or "" for n in nodes}
    for domain, version in sorted(model.opset_imports.items()):
        if domain in used_domains or domain == "":
            proto.opset_import.add(domain=domain, version=version)
    for function in model.functions.values():
        proto.functions.append(serde.serialize_function(function))
    proto.graph.CopyFrom(graph)
    return proto.SerializeToString(deterministic=True)


def write_program(
    f: BinaryIO,
    model: ir.Model,
    nodes: list[ir.Node],
    inputs: list[ir.Value],
    outputs: list[ir.Value],
    weights: list[ir.Value],
    name: str,
    device: str,
    estimate: Mapping,
    dims: Mapping[str, int],
) -> int:
    """Stream one Maia program into ``f`` (one weight in memory at a time); returns bytes written."""
    graph_bytes = _subgraph_proto(model, nodes, inputs, outputs, name)
    offset = len(graph_bytes) + _pad(len(graph_bytes))
    weight_specs = []
    for value in weights:
        tensor = value.const_value
        spec = _value_spec(value)
        spec["shape"] = list(tensor.shape)
        spec["format"] = DEVICE_FORMAT.get(tensor.dtype.name, tensor.dtype.name.lower())
        spec["offset"] = offset
        spec["length"] = int(tensor.nbytes)
        weight_specs.append(spec)
        offset += int(tensor.nbytes) + _pad(int(tensor.nbytes))
    header = {
        "format_version": 1,
        "partition_name": name,
        "device": device,
        "inputs": [_value_spec(v) for v in inputs],
        "outputs": [_value_spec(v) for v in outputs],
        "graph": {"offset": 0, "length": len(graph_bytes)},
        "weights": weight_specs,
        "plan": {
            "schedule": [n.name for n in nodes],
            "memory": _memory_plan(nodes, {v.name for v in outputs}, dims),
            "estimate": dict(estimate),
        },
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    prefix = PROGRAM_MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes
    prefix += b"\0" * _pad(len(prefix))
    f.write(prefix)
    f.write(graph_bytes + b"\0" * _pad(len(graph_bytes)))
    for value in weights:
        data = value.const_value.tobytes()
        f.write(data)
        f.write(b"\0" * _pad(len(data)))
    return len(prefix) + offset


def _partition_io(graph: ir.Graph, members: list[ir.Node]) -> tuple[list[ir.Value], list[ir.Value], list[ir.Value]]:
    """(inputs from outside, outputs used outside, weights) of a partition, in first-appearance order."""
    member_ids = {id(n) for n in members}
    graph_inputs = {id(v) for v in graph.inputs}
    inputs: list[ir.Value] = []
    weights: list[ir.Value] = []
    seen: set[int] = set()
    for node in members:
        for v in node.inputs:
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            producer = v.producer()
            if producer is not None and id(producer) in member_ids:
                continue
            if v.const_value is not None and id(v) not in graph_inputs:
                weights.append(v)
            else:
                inputs.append(v)
    outputs = []
    for node in members:
        for v in node.outputs:
            if v.is_graph_output() or any(id(c) not in member_ids for c, _ in v.uses()):
                outputs.append(v)
    return inputs, outputs, weights


def _silence_utf8_warnings():
    # The embedded program is binary in a STRING attribute, exactly like ORT's own EPs embed their contexts;
    # onnx_ir logs a UTF-8 warning for every such attribute, which is noise for this use.
    class _Filter(logging.Filter):
        def filter(self, record):
            return "UTF-8" not in record.getMessage()

    for name in ("onnx_ir", "onnx_ir.serde", "onnx_ir._core"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Filter) for f in logger.filters):
            logger.addFilter(_Filter())


def compile_model(
    model: ir.Model | str | os.PathLike,
    output: str | os.PathLike | None = None,
    device: str = "maia100",
    embed: bool = True,
    excluded_ops: Iterable[str] = (),
    dims: Mapping[str, int] | None = None,
    external_data: bool | None = None,
    progress: bool = False,
) -> CompileResult:
    """Compile ``model`` for ``device``: partitions -> EPContext nodes. With ``output`` the result is saved atomically.

    ``embed=False`` writes the programs to ``<output stem>_maia.bin`` beside the output (needs ``output``).
    An in-memory model is modified in place (pass a copy to keep it); a path is loaded and never modified.
    """
    from maia_onnx.io import atomic_write, check_output_path, load_model, save_model

    _silence_utf8_warnings()
    source_name = None
    if isinstance(model, (str, os.PathLike)):
        source_name = Path(model).name
        if output is not None:
            check_output_path(output, model)
        model = load_model(model)
    elif output is not None:
        check_output_path(output)
    if not embed and output is None:
        raise UserError("--no-embed needs an output path (the side file is written next to it): pass -o")
    if any(n.op_type == "EPContext" and n.domain == "com.microsoft" for n in model.graph):
        raise UserError("model already contains EPContext nodes (it is compiled): compile the original model instead")
    dims = dict(dims or {})
    placement = get_capability(model, device, excluded_ops=excluded_ops, dims=dims)
    graph = model.graph
    nodes = list(graph)
    partitions = [(p, [nodes[i] for i in p.node_indices]) for p in placement.partitions]

    side_path = None
    if not embed:
        output = Path(output)
        side_path = output.with_name(f"{output.stem}_maia.bin")

    programs: dict[str, bytes] = {}
    io_of = {}
    iterator = partitions
    if progress:
        from tqdm import tqdm

        iterator = tqdm(partitions, desc="compile", unit="partition", file=None)
    # Serialise every program before the graph is rewritten (the subgraphs reference the original values).
    side_index: dict[str, list[int]] = {}
    body_chunks_path = None
    if side_path is not None:
        import tempfile

        fd, body_chunks_path = tempfile.mkstemp(prefix=f".{side_path.name}.", suffix=".body", dir=side_path.parent)
        body = os.fdopen(fd, "wb")
    try:
        offset = 0
        for info, members in iterator:
            inputs, outputs, weights = _partition_io(graph, members)
            io_of[info.name] = (inputs, outputs, weights)
            estimate = {"flops": info.flops, "bytes": info.bytes, "est_time_s": info.est_time_s}
            if side_path is None:
                buf = io.BytesIO()
                write_program(buf, model, members, inputs, outputs, weights, info.name, placement.device, estimate, dims)
                programs[info.name] = buf.getvalue()
            else:
                length = write_program(body, model, members, inputs, outputs, weights, info.name, placement.device, estimate, dims)
                side_index[info.name] = [offset, length]
                offset += length
        if side_path is not None:
            body.close()
    except BaseException:
        if body_chunks_path:
            body.close()
            os.unlink(body_chunks_path)
        raise

    side_filename = side_path.name if side_path is not None else None
    replaced: dict[int, ir.Value] = {}  # id(original output) -> EPContext output, for later partitions' inputs
    for k, (info, members) in enumerate(partitions):
        inputs, outputs, _ = io_of[info.name]
        inputs = [replaced.get(id(v), v) for v in inputs]
        attributes = [
            ir.AttrString("source", PROVIDER),
            ir.AttrInt64("main_context", 1 if (embed or k == 0) else 0),
            ir.AttrInt64("embed_mode", 1 if embed else 0),
            ir.Attr("ep_cache_context", ir.AttributeType.STRING, programs[info.name] if embed else side_filename),
            ir.AttrString("ep_sdk_version", EP_SDK_VERSION),
            ir.AttrString("partition_name", info.name),
            ir.AttrString("hardware_architecture", placement.device),
        ]
        if source_name:
            attributes.append(ir.AttrString("onnx_model_filename", source_name))
        ctx = ir.Node("com.microsoft", "EPContext", inputs, attributes, num_outputs=len(outputs), name=info.name)
        for old, new in zip(outputs, ctx.outputs):
            new.name, new.type, new.shape = old.name, old.type, old.shape
            old.name = None
        for old, new in zip(outputs, ctx.outputs):
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            replaced[id(old)] = new
        graph.insert_after(members[-1], ctx)
        graph.remove(members, safe=False)
    graph.sort()
    model.opset_imports.setdefault("com.microsoft", 1)
    used = {id(v) for node in graph for v in node.inputs if v is not None} | {id(v) for v in graph.outputs}
    for name in [n for n, v in graph.initializers.items() if id(v) not in used and v not in graph.inputs]:
        del graph.initializers[name]

    result = CompileResult(model=model, placement=placement, programs=programs)
    if output is None:
        return result
    output = Path(output)
    try:
        if side_path is not None:
            with atomic_write(side_path) as f:
                header = json.dumps(side_index, sort_keys=True, separators=(",", ":")).encode()
                prefix = CONTAINER_MAGIC + struct.pack("<Q", len(header)) + header
                prefix += b"\0" * _pad(len(prefix))
                # offsets in the index are relative to the end of the prefix
                f.write(prefix)
                with open(body_chunks_path, "rb") as src:
                    while chunk := src.read(1 << 24):
                        f.write(chunk)
        save_model(model, output, external_data=external_data)
    finally:
        if body_chunks_path and os.path.exists(body_chunks_path):
            os.unlink(body_chunks_path)
    result.path = output
    result.side_file = side_path
    return result


def read_container_index(data) -> tuple[dict[str, list[int]], int]:
    """(partition -> [offset, length], start of the programs) of a MAIACTX1 side file's bytes/mmap."""
    if bytes(data[:8]) != CONTAINER_MAGIC:
        raise UserError("Maia context side file is not a MAIACTX1 container: recompile the model with maia-onnx compile")
    (length,) = struct.unpack("<Q", bytes(data[8:16]))
    index = json.loads(bytes(data[16 : 16 + length]))
    start = 16 + length
    return index, start + _pad(start)
