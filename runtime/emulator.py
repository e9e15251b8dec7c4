"""Numerics-faithful Maia emulator: load a Maia program and run its partition in an ONNX Runtime session.

The program's weights are used in the device's formats: FP8 weights feeding a DequantizeLinear are dequantized
once at load with ``maia_onnx.formats.fp8.dequantize_fp8`` (the one NumPy reference, which equals the device's
exact FP8 -> FP32 widening times the scale); activation QuantizeLinear runs round-to-nearest-even with saturation
like the device; MatMul/Conv accumulate in FP32. FP32 subgraphs run the very ORT CPU kernels a plain session
runs, with the same optimization level, so FP32 paths are bit-exact with plain ONNX Runtime.
Weights are handed to ORT as OrtValues over the program's memory (``add_external_initializers``): no copies.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from maia_onnx.errors import ModelLoadError
from maia_onnx.ortutil import ort_run

PROGRAM_MAGIC = b"MAIAPRG1"
_ALIGN = 64


def _np_dtype(onnx_dtype_name: str):
    import onnx_ir as ir

    return ir.DataType[onnx_dtype_name].numpy()


@dataclass
class MaiaProgram:
    """A parsed Maia program; ``buffer`` (bytes or mmap slice) backs the weights without copies."""

    header: dict
    buffer: memoryview
    base: int
    # (directory, file name, offset of this program in the file) when the program lives in a side file
    file_location: tuple[str, str, int] | None = None

    @classmethod
    def from_buffer(cls, data, file_location: tuple[str, str, int] | None = None) -> "MaiaProgram":
        view = memoryview(data)
        if bytes(view[:8]) != PROGRAM_MAGIC:
            raise ModelLoadError("EPContext blob is not a Maia program (MAIAPRG1): recompile with maia-onnx compile")
        (length,) = struct.unpack("<Q", bytes(view[8:16]))
        header = json.loads(bytes(view[16 : 16 + length]))
        if header.get("format_version") != 1:
            raise ModelLoadError(f"Maia program format {header.get('format_version')} unsupported: upgrade maia-onnx")
        base = 16 + length
        base += (-base) % _ALIGN
        return cls(header, view, base, file_location)

    @property
    def name(self) -> str:
        return self.header["partition_name"]

    def graph_bytes(self) -> bytes:
        g = self.header["graph"]
        return bytes(self.buffer[self.base + g["offset"] : self.base + g["offset"] + g["length"]])

    def weight(self, spec: Mapping) -> np.ndarray:
        """A read-only array over the program bytes in the stored (device) format."""
        start = self.base + spec["offset"]
        dtype = _np_dtype(spec["dtype"])
        raw = self.buffer[start : start + spec["length"]]
        count = int(np.prod(spec["shape"], dtype=np.int64))
        if spec["format"] == "e8m0":
            from maia_onnx.formats.mx import e8m0_to_float  # MX shared scales: one biased exponent per block

            return e8m0_to_float(np.frombuffer(raw, dtype=np.uint8, count=count)).reshape(spec["shape"])
        if spec["dtype"] in PACKED_4BIT:
            return np.frombuffer(raw, dtype=np.uint8)  # two elements per byte (ONNX packing), handed to ORT as is
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(spec["shape"])

    def weights(self) -> dict[str, np.ndarray]:
        return {spec["name"]: self.weight(spec) for spec in self.header["weights"]}


_FP8 = {"FLOAT8E4M3FN", "FLOAT8E5M2"}
PACKED_4BIT = {"FLOAT4E2M1", "INT4", "UINT4"}
INLINE_BYTES = 4096


def _fold_weight_dequantize(proto, specs: dict, arrays: dict[str, np.ndarray]) -> None:
    """Replace DequantizeLinear(FP8 weight, scale[, zero]) by its FP32 value, computed by the formats reference."""
    from maia_onnx.runtime.kernels import select

    dequantize_fp8 = select("dequantize_fp8")  # the Triton kernel on a CUDA device, else the NumPy reference

    keep = []
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and len(node.input) >= 2:
            x, scale = node.input[0], node.input[1]
            zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
            attrs = {a.name: a for a in node.attribute}
            block = attrs["block_size"].i if "block_size" in attrs else 0
            out_dtype = attrs["output_dtype"].i if "output_dtype" in attrs else 0
            if (x in specs and specs[x]["dtype"] in _FP8 and scale in specs and out_dtype in (0, 1)
                    and specs[scale]["dtype"] == "FLOAT"
                    and (zero is None or (zero in specs and not np.any(arrays[zero].view(np.uint8))))):
                axis = attrs["axis"].i if "axis" in attrs else 1
                scale_arr = arrays[scale]
                per_tensor = scale_arr.size == 1 and not block
                arrays[node.output[0]] = dequantize_fp8(
                    arrays[x], scale_arr.reshape(()) if per_tensor else scale_arr,
                    axis=None if per_tensor else axis, block_size=block or None)
                continue
            if (x in specs and specs[x]["dtype"] == "FLOAT4E2M1" and scale in arrays and zero is None
                    and out_dtype in (0, 1) and arrays[scale].dtype == np.float32 and (block or arrays[scale].size == 1)):
                # FP4 weights (ORT's CPU provider has no FP4 kernel): E2M1 x scale from the formats reference; the
                # scale is a stored weight (E8M0 bytes read as float32) or an already folded one (E4M3 x tensor scale)
                from maia_onnx.formats.fp4 import dequantize_onnx_fp4

                arrays[node.output[0]] = dequantize_onnx_fp4(arrays[x], specs[x]["shape"], arrays[scale],
                                                             attrs["axis"].i if "axis" in attrs else 1, block)
                continue
        keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


class EmulatedPartition:
    """One device partition running in the emulator (an ORT session over the program's subgraph)."""

    def __init__(self, program: MaiaProgram, sess_options=None, fold_weights: bool = True):
        import onnx
        import onnxruntime as ort

        from maia_onnx.ortutil import session_options

        self.program = program
        self.name = program.name
        self.input_names = [v["name"] for v in program.header["inputs"]]
        self.output_names = [v["name"] for v in program.header["outputs"]]
        proto = onnx.load_from_string(program.graph_bytes())
        specs = {s["name"]: s for s in program.header["weights"]}
        arrays = program.weights()
        before = set(arrays)
        if fold_weights:
            _fold_weight_dequantize(proto, specs, arrays)
        folded = set(arrays) - before
        self.op_types = [node.op_type for node in proto.graph.node]  # what the emulator runs per call
        used = {name for node in proto.graph.node for name in node.input} | set(self.output_names)
        names, values = [], []
        self._keepalive = []
        # Folded weights are fed as inputs on every run (no copy: ORT reads the arrays in place), never made
        # initializers: in the plain model they are DequantizeLinear outputs, i.e. not constant, so kernels take
        # their non-constant path (no MatMul weight prepacking) and the results stay bit-identical.
        self._weight_feeds = {name: np.ascontiguousarray(arrays[name]) for name in sorted(folded) if name in used}
        for name, arr in self._weight_feeds.items():
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(arr.shape)))
        for name in sorted(arrays):
            if name not in used or name in folded:
                continue  # a weight consumed only by a folded DequantizeLinear, or a folded (fed) one
            arr = arrays[name]
            spec = specs.get(name)
            if (spec is not None and spec["dtype"] in PACKED_4BIT) or arr.nbytes < INLINE_BYTES:
                # Small tensors go inline: ORT reads shape-like constants (Reshape targets) at load time, and wants
                # 4-bit initializers packed with their logical shape.
                tensor = onnx.TensorProto(name=name, data_type=_onnx_type(arr, spec), raw_data=arr.tobytes())
                tensor.dims.extend(spec["shape"] if spec is not None else arr.shape)
                proto.graph.initializer.append(tensor)
                continue
            tensor = onnx.TensorProto(name=name, data_type=_onnx_type(arr, spec))
            tensor.dims.extend(arr.shape)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            stored = spec is not None and spec["format"] != "e8m0" and name not in folded
            if stored and program.file_location is not None:
                # Side file: ORT reads the weight from the file itself and owns it, so after prepacking MatMul
                # weights it frees the plain copy, exactly as for a plain model with external data.
                directory, file_name, program_offset = program.file_location
                location = (file_name, str(program_offset + program.base + spec["offset"]), str(arr.nbytes))
            else:
                location = ("__maia_program__", "0", str(arr.nbytes))
                names.append(name)
                values.append(_ortvalue(arr, tensor.data_type))
                self._keepalive.append(arr)
            for key, val in zip(("location", "offset", "length"), location):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, val
            proto.graph.initializer.append(tensor)
        so = sess_options or session_options()
        if program.file_location is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", program.file_location[0])
        if names:
            so.add_external_initializers(names, values)
        self._ortvalues = values
        self.session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def run(self, feeds: Mapping[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        inputs = {n: feeds[n] for n in self.input_names}
        inputs.update(self._weight_feeds)
        return ort_run(self.session, self.output_names, inputs, run_options)

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        feeds = dict(zip(self.input_names, inputs))
        feeds.update(self._weight_feeds)
        return ort_run(self.session, self.output_names, feeds)


def _onnx_type(arr: np.ndarray, spec: Mapping | None) -> int:
    import onnx_ir as ir

    if spec is not None and (spec["dtype"] in PACKED_4BIT or arr.dtype == _np_dtype(spec["dtype"])):
        return int(ir.DataType[spec["dtype"]])
    return int(ir.DataType.from_numpy(arr.dtype))


def _ortvalue(arr: np.ndarray, onnx_type: int):
    import onnxruntime as ort

    if arr.dtype.kind == "V" or arr.dtype.name.startswith(("float8", "float4", "int4", "uint4", "bfloat16")):
        # ml_dtypes arrays: hand ORT the raw bytes with the ONNX element type
        arr = np.ascontiguousarray(arr)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint8 if arr.dtype.itemsize == 1 else np.uint16), onnx_type)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))


def emulate_program(blob: bytes, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one serialized Maia program on ``feeds`` (a convenience for tests and debugging)."""
    part = EmulatedPartition(MaiaProgram.from_buffer(blob))
    return dict(zip(part.output_names, part.run(feeds)))


def device_quantize_reference(x: np.ndarray, scale: np.ndarray | float, fmt: str = "e4m3fn", axis: int | None = None) -> np.ndarray:
    """The device's activation rounding (RNE, saturate to +-max) from the formats reference, for checks."""
    from maia_onnx.formats.fp8 import quantize_fp8

    return quantize_fp8(x, scale, fmt=fmt, axis=axis)


def output_arrays(names: Sequence[str], values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip(names, values))
