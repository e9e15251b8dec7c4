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
plan, roofline estimate). A side file (``embed_mode=0``) is a ``MAIACTX1`` container: the programs, then a
footer JSON index ``{partition_name: [offset, length]}`` (so the file is written in one streaming pass).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError, ModelLoadError, UserError, ValidationError
from maia_onnx.graph.costs import ANY_DIM, value_numel
from maia_onnx.inputs import make_inputs
from maia_onnx.io import atomic_write, check_output_path, load_model, quiet_binary_attribute_warnings, save_model
from maia_onnx.ortutil import compare, run_model
from maia_onnx.runtime.capability import Placement, get_capability
from maia_onnx.runtime.fusions import FusionReport, FusionRule, fold_host_arithmetic, fuse_device_partitions

PROVIDER = "MaiaExecutionProvider"
EP_SDK_VERSION = "maia-onnx-emulator-1"
PROGRAM_MAGIC = b"MAIAPRG1"
CONTAINER_MAGIC = b"MAIACTX1"
ALIGN = 64
EMBED_LIMIT_BYTES = 1_500_000_000  # embedded programs live in one protobuf (2 GiB cap) with the rest of the graph
# Compile checks itself: every output of the compiled model (emulated Maia) against the input model in ONNX Runtime
# on synthesized inputs. Partitioning alone is bit-exact; fusions change float rounding in the last bits (never on
# a quantized path: runtime/fusions.py refuses those), so the bound is on max |diff| / max |reference| per output.
VERIFY_TOLERANCE = 1e-5

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
    fusions: FusionReport = field(default_factory=FusionReport)
    verification: dict | None = None  # output name -> {max_abs, max_rel, cosine} of the self-check, None if skipped
    unverified: str | None = None  # why the self-check could not run (it was asked for)

    def summary(self) -> dict:
        out = self.placement.summary()
        out["fused_ops"] = self.fusions.applied
        out["verified"] = self.verification is not None
        out["unverified_reason"] = self.unverified
        out["verify_max_rel"] = max((r["max_rel"] for r in self.verification.values()), default=0.0) if self.verification else None
        out["output"] = str(self.path) if self.path else None
        out["side_file"] = str(self.side_file) if self.side_file else None
        return out


def _value_spec(value: ir.Value) -> dict:
    shape = None if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
    return {"name": value.name, "dtype": value.dtype.name if value.dtype is not None else None, "shape": shape}


def _numel(value: ir.Value, dims: Mapping[str, int]) -> int:
    """Elements of ``value`` at ``dims`` (symbolic dims nobody named count as 1; unknown rank as a scalar)."""
    n = value_numel(value, {ANY_DIM: 1, **dims})
    return 1 if n is None else n


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


def _is_blocked_dequantize(node: ir.Node) -> bool:
    attr = node.attributes.get("block_size")
    return node.op_type == "DequantizeLinear" and attr is not None and attr.value > 0


def _power_of_two_exponents(tensor) -> np.ndarray | None:
    """Biased E8M0 exponents of an FP32 tensor holding only normal powers of two (MX scales), else None."""
    if tensor.dtype != ir.DataType.FLOAT:
        return None
    bits = np.ascontiguousarray(tensor.numpy(), dtype=np.float32).view(np.uint32)
    exponent = (bits >> 23) & 0xFF
    if np.any(bits & 0x807FFFFF) or np.any(exponent == 0) or np.any(exponent == 0xFF):
        return None  # sign/mantissa bits set, zero/subnormal, or inf/nan: not an E8M0 value
    return exponent.astype(np.uint8)


def weight_format(value: ir.Value) -> str:
    """How a weight is stored in the program: its ONNX type's device format, MX roles, or the pass's tag."""
    tensor = value.const_value
    tagged = value.metadata_props.get("maia.format") or tensor.metadata_props.get("maia.format")
    base = DEVICE_FORMAT.get(tensor.dtype.name, tensor.dtype.name.lower())
    if tagged:
        return f"{tagged}-fake-quant-{base}"  # mx9/mx6 weights are stored dequantized, tagged by QuantizeMxPass
    for consumer, index in value.uses():
        if _is_blocked_dequantize(consumer):
            if index == 0:
                return f"mx-elements-{base}"
            if index == 1 and _power_of_two_exponents(tensor) is not None:
                return "e8m0"  # MX shared scales: one biased-exponent byte each on the device
    return base


def _write_weight(f: BinaryIO, value: ir.Value, fmt: str) -> int:
    """Write one weight in its device format; memory-mapped external weights are streamed, then unmapped."""
    tensor = value.const_value
    if fmt == "e8m0":  # FLOAT8E8M0 scales are exponent bytes already; float32 powers of two are converted
        data = tensor.tobytes() if tensor.dtype.bitwidth == 8 else _power_of_two_exponents(tensor).tobytes()
    elif isinstance(tensor, ir.ExternalTensor) and tensor.dtype.itemsize >= 1 and tensor.dtype.bitwidth >= 8:
        data = memoryview(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8))
    else:
        data = tensor.tobytes()
    f.write(data)
    length = len(data) if isinstance(data, bytes) else data.nbytes
    del data
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()  # drop the mapping so a multi-GB model never stays resident as a whole
    return length


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
        spec["format"] = weight_format(value)
        length = tensor.size if spec["format"] == "e8m0" else int(tensor.nbytes)
        spec["offset"] = offset
        spec["length"] = int(length)
        weight_specs.append(spec)
        offset += int(length) + _pad(int(length))
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
    for value, spec in zip(weights, weight_specs):
        length = _write_weight(f, value, spec["format"])
        f.write(b"\0" * _pad(length))
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


# ONNX Runtime's com.microsoft::EPContext schema types its inputs/outputs as 8-64-bit ints, float16/32/64 and
# bfloat16: a narrow partition boundary (an FP8 KV cache) crosses it widened, exactly, and narrowed again.
_WIDE_IO = {
    ir.DataType.FLOAT8E4M3FN: ir.DataType.FLOAT16, ir.DataType.FLOAT8E5M2: ir.DataType.FLOAT16,
    ir.DataType.FLOAT8E4M3FNUZ: ir.DataType.FLOAT16, ir.DataType.FLOAT8E5M2FNUZ: ir.DataType.FLOAT16,
    ir.DataType.INT4: ir.DataType.INT8, ir.DataType.UINT4: ir.DataType.UINT8,
}
for _name, _wide in (("FLOAT4E2M1", "FLOAT16"), ("FLOAT8E8M0", "FLOAT")):
    if hasattr(ir.DataType, _name):
        _WIDE_IO[getattr(ir.DataType, _name)] = getattr(ir.DataType, _wide)


def _cast(value: ir.Value, dtype: ir.DataType, name: str) -> ir.Node:
    node = ir.Node("", "Cast", [value], [ir.AttrInt64("to", int(dtype))], name=name)
    out = node.outputs[0]
    out.name, out.type, out.shape = name, ir.TensorType(dtype), value.shape
    return node


def _widen_narrow_io(graph: ir.Graph, members: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value],
                     weights: list[ir.Value], k: int) -> tuple[list[ir.Value], list[ir.Value], list[ir.Value]]:
    """Cross each narrow (FP8/4-bit) partition input/output as its exact wide type: host Cast <-> device Cast.

    Every FP8 and 4-bit value is exactly representable in the wide type, so the round trip keeps the bits
    (except the sign of an FP8 NaN). ``members`` gains the device-side casts; the graph gains the host-side ones.
    """
    member_ids = {id(n) for n in members}
    new_inputs = []
    for v in inputs:
        wide = _WIDE_IO.get(v.dtype)
        if wide is None:
            new_inputs.append(v)
            continue
        host = _cast(v, wide, f"{v.name}__maia{k}_wide")
        device = _cast(host.outputs[0], v.dtype, f"{v.name}__maia{k}_narrow")
        for consumer, index in list(v.uses()):
            if id(consumer) in member_ids:
                consumer.replace_input_with(index, device.outputs[0])
        graph.insert_before(members[0], [host, device])
        members.insert(0, device)
        new_inputs.append(host.outputs[0])
    new_outputs = []
    for v in outputs:
        wide = _WIDE_IO.get(v.dtype)
        if wide is None:
            new_outputs.append(v)
            continue
        name = v.name
        v.name = f"{name}__maia{k}_device"
        device = _cast(v, wide, f"{name}__maia{k}_wide")
        host = _cast(device.outputs[0], v.dtype, name)
        outside = [(c, i) for c, i in v.uses() if id(c) not in member_ids and c is not device]
        for consumer, index in outside:
            consumer.replace_input_with(index, host.outputs[0])
        for i, out in enumerate(graph.outputs):
            if out is v:
                graph.outputs[i] = host.outputs[0]
        graph.insert_after(members[-1], [device, host])
        members.append(device)
        new_outputs.append(device.outputs[0])
    return new_inputs, new_outputs, weights


def _silence_utf8_warnings():
    quiet_binary_attribute_warnings()


def compile_model(
    model: ir.Model | str | os.PathLike,
    output: str | os.PathLike | None = None,
    device: str = "maia100",
    embed: bool = True,
    excluded_ops: Iterable[str] = (),
    dims: Mapping[str, int] | None = None,
    external_data: bool | None = None,
    progress: bool = False,
    optimize: bool = True,
    verify: bool = True,
    fusion_rules: Iterable[FusionRule] | None = None,
    engine: str = "python",
) -> CompileResult:
    """Compile ``model`` for ``device``: partitions -> EPContext nodes. With ``output`` the result is saved atomically.

    ``embed=False`` writes the programs to ``<output stem>_maia.bin`` beside the output (needs ``output``).
    An in-memory model is modified in place (pass a copy to keep it); a path is loaded and never modified.
    ``optimize`` folds host index arithmetic and fuses kernels inside device partitions (``fusion_rules``, default
    runtime/fusions_rules.default_rules()); ``verify`` runs the compiled model in the emulator against the input
    model in ONNX Runtime on synthesized inputs and raises ValidationError (nothing written) beyond VERIFY_TOLERANCE.
    ``engine="ort"`` has ONNX Runtime's ModelCompiler write the model through the Maia plugin EP instead
    (runtime/ort_compile.py: same program format, no fusions).
    """
    if engine == "ort":
        from maia_onnx.runtime.ort_compile import compile_with_ort  # it builds on this module: imported on use
        return compile_with_ort(model, output, device=device, embed=embed, excluded_ops=excluded_ops, dims=dims,
                                external_data=external_data, verify=verify)
    if engine != "python":
        raise InvalidOptionError(f"unknown compile engine {engine!r}: use python (the default) or ort")

    _silence_utf8_warnings()
    source_name = None
    source = model
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
    reference = _reference_run(source, model, dims) if verify else None
    fusions = FusionReport()
    if optimize:
        fusions.folded_nodes = fold_host_arithmetic(model)
    placement = get_capability(model, device, excluded_ops=excluded_ops, dims=dims)
    if optimize:
        fused = fuse_device_partitions(model, placement, None if fusion_rules is None else list(fusion_rules))
        fused.folded_nodes = fusions.folded_nodes
        fusions = fused
        if fusions.applied:
            placement = get_capability(model, device, excluded_ops=excluded_ops, dims=dims)
    if output is None:
        result = _lower(model, placement, None, device, embed, dims, source_name, external_data, progress)
        result.fusions = fusions
        _check(result, result.model, device, reference)
        return result
    output = Path(output)
    parent = output.parent if str(output.parent) else Path(".")
    # Written into a staging directory beside the output, verified there, then moved into place: a compile that
    # fails its check leaves nothing behind (and an older output at the same path untouched).
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".compile", dir=parent))
    try:
        result = _lower(model, placement, staging / output.name, device, embed, dims, source_name, external_data, progress)
        result.fusions = fusions
        _check(result, result.path, device, reference)
        data = result.path.with_name(f"{output.name}.data")
        if data.exists():
            os.replace(data, parent / data.name)
        elif (parent / data.name).exists():
            (parent / data.name).unlink()  # stale weights of an earlier external-data save at this path
        if result.side_file is not None:
            os.replace(result.side_file, parent / result.side_file.name)
        os.replace(result.path, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.path = output
    result.side_file = parent / result.side_file.name if result.side_file is not None else None
    return result


def _reference_run(source, model: ir.Model, dims: Mapping[str, int]) -> tuple[dict | None, dict | str]:
    """(feeds, outputs) of the input model in ONNX Runtime on synthesized inputs, before compile touches it;
    (None, why) when no synthesized input runs (string inputs, shape tensors no generator can guess)."""
    target = source if isinstance(source, (str, os.PathLike)) else model
    feeds = make_inputs(model, seed=0, dims=dims)
    try:
        return feeds, run_model(target, feeds)
    except Exception as exc:  # noqa: BLE001 - an index input no table bounds (a Gather on activations) went out of range
        feeds = make_inputs(model, seed=0, dims=dims, int_high=1)
        try:
            return feeds, run_model(target, feeds)
        except Exception:  # noqa: BLE001 - the model rejects every input we can synthesize: unverifiable, said so
            return None, f"the input model fails in ONNX Runtime on synthesized inputs ({type(exc).__name__})"


def _check(result: CompileResult, compiled, device: str, reference) -> None:
    if reference is None:
        return
    feeds, outputs = reference
    if feeds is None:
        result.unverified = outputs
    else:
        result.verification = verify_compiled(compiled, device, feeds, outputs)


def verify_compiled(compiled, device: str, feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                    what: str = "compiled model",
                    hint: str = "--no-optimize compiles without fusions, --no-verify skips this check") -> dict:
    """Run the compiled model (emulated Maia) on ``feeds``; raise ValidationError when it disagrees with ``reference``.

    Per output: compare() figures plus ``bit_identical``; NaN where both have NaN counts as equal."""
    from maia_onnx.runtime.session import EmulatorSession  # session imports this module: a top-level import would cycle

    session = EmulatorSession(str(compiled) if isinstance(compiled, Path) else compiled, device=device)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, feeds)))
    report = {}
    for name, ref in reference.items():
        actual = got.get(name)
        if actual is None or np.shape(actual) != np.shape(ref):
            raise ValidationError(f"{what} output {name!r} is missing or has shape {np.shape(actual)} instead of "
                                  f"{np.shape(ref)}: the compile is wrong (nothing written)")
        ref64, act64 = np.asarray(ref, dtype=np.float64), np.asarray(actual, dtype=np.float64)
        both_nan = np.isnan(ref64) & np.isnan(act64)
        report[name] = compare(np.where(both_nan, 0, ref64), np.where(both_nan, 0, act64))
        report[name]["bit_identical"] = bool(np.array_equal(np.ascontiguousarray(ref).view(np.uint8),
                                                            np.ascontiguousarray(actual).view(np.uint8)))
    worst = max(report, key=lambda n: report[n]["max_rel"] if report[n]["max_rel"] == report[n]["max_rel"] else np.inf, default=None)
    if worst is not None and not report[worst]["max_rel"] <= VERIFY_TOLERANCE:
        raise ValidationError(
            f"{what} disagrees with the input model on synthesized inputs: output {worst!r} relative error "
            f"{report[worst]['max_rel']:.3e} > {VERIFY_TOLERANCE:g} (nothing written; {hint})")
    return report


def _lower(model: ir.Model, placement: Placement, output: Path | None, device: str, embed: bool, dims: Mapping[str, int],
           source_name: str | None, external_data: bool | None, progress: bool) -> CompileResult:
    """Replace every device partition of ``placement`` with an EPContext node; save to ``output`` when given."""
    graph = model.graph
    nodes = list(graph)
    partitions = [(p, [nodes[i] for i in p.node_indices]) for p in placement.partitions]

    side_path = None
    if not embed:
        output = Path(output)
        side_path = output.with_name(f"{output.stem}_maia.bin")

    programs: dict[str, bytes] = {}
    io_of = {}
    for k, (info, members) in enumerate(partitions):  # in order: widening rewires later partitions' inputs
        io_of[info.name] = _widen_narrow_io(graph, members, *_partition_io(graph, members), k)
    if embed and output is not None and sum(v.const_value.nbytes for _, _, ws in io_of.values() for v in ws) > EMBED_LIMIT_BYTES:
        raise UserError(
            f"device weights exceed {EMBED_LIMIT_BYTES >> 20} MiB, too big to embed in the ONNX file "
            "(protobuf limit 2 GiB): compile with --no-embed to write the programs to a side file")
    iterator = partitions
    if progress:
        from tqdm import tqdm

        iterator = tqdm(partitions, desc="compile", unit="partition")
    # Every program is serialised before the graph is rewritten (the subgraphs reference the original values).
    # A side file is streamed straight into its atomic temp file, one weight in memory at a time.
    with contextlib.ExitStack() as stack:
        side = stack.enter_context(atomic_write(side_path)) if side_path is not None else None
        side_index: dict[str, list[int]] = {}
        if side is not None:
            side.write(CONTAINER_MAGIC + b"\0" * (ALIGN - len(CONTAINER_MAGIC)))
        offset = ALIGN
        for info, members in iterator:
            inputs, outputs, weights = io_of[info.name]
            estimate = {"flops": info.flops, "bytes": info.bytes, "est_time_s": info.est_time_s}
            if side is None:
                buf = io.BytesIO()
                write_program(buf, model, members, inputs, outputs, weights, info.name, placement.device, estimate, dims)
                programs[info.name] = buf.getvalue()
            else:
                length = write_program(side, model, members, inputs, outputs, weights, info.name, placement.device, estimate, dims)
                side_index[info.name] = [offset, length]
                offset += length
        if side is not None:
            footer = json.dumps(side_index, sort_keys=True, separators=(",", ":")).encode()
            side.write(footer + struct.pack("<Q", len(footer)) + CONTAINER_MAGIC)

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
    if partitions:
        model.opset_imports.setdefault("com.microsoft", 1)
    used = {id(v) for node in graph for v in node.inputs if v is not None} | {id(v) for v in graph.outputs}
    for name in [n for n, v in graph.initializers.items() if id(v) not in used and v not in graph.inputs]:
        del graph.initializers[name]

    result = CompileResult(model=model, placement=placement, programs=programs)
    if output is None:
        return result
    output = Path(output)
    try:
        save_model(model, output, external_data=external_data)
    except BaseException:
        if side_path is not None:
            side_path.unlink(missing_ok=True)  # no partial outputs: the side file goes with the failed model
        raise
    result.path = output
    result.side_file = side_path
    return result


def read_container_index(data) -> dict[str, list[int]]:
    """partition -> [offset, length] of a MAIACTX1 side file (bytes or mmap): the JSON index sits in the footer.

    Layout: ``MAIACTX1`` padded to 64 | programs (each 64-aligned) | index JSON | u64 index length | ``MAIACTX1``.
    """
    size = len(data)
    if size < 2 * ALIGN or bytes(data[:8]) != CONTAINER_MAGIC or bytes(data[size - 8 :]) != CONTAINER_MAGIC:
        raise ModelLoadError("Maia context side file is not a complete MAIACTX1 container (truncated?): recompile the model")
    (length,) = struct.unpack("<Q", bytes(data[size - 16 : size - 8]))
    return json.loads(bytes(data[size - 16 - length : size - 16]))
