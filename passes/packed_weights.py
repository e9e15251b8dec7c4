"""Packed weights in ONNX: the initializers and decode nodes that stand for a 4-bit or mx9/mx6 weight.

Used by the weight passes (``quantize_mx``, ``gptq``); not a pass itself.  Two encodings of 4-bit weights
(``formats.fp4.Fp4Weight``):

- ``standard`` (opset 24): a FLOAT4E2M1 initializer (ONNX packs it two per byte) read by a blocked
  ``DequantizeLinear``: MXFP4 with FLOAT8E8M0 scales; fp4-e4m3 with FLOAT8E4M3FN block scales that one
  ``DequantizeLinear`` multiplies by the FP32 tensor scale first.  ``onnx.reference`` and the Maia emulator run it.
- ``ort`` (ONNX Runtime's CPU provider has no FP4 kernel): the codes packed two per byte in a UINT8 initializer,
  decoded in the graph by ``Gather`` from a shared ``[256, 2]`` table, reshaped to ``[pre, blocks, block, post]``
  and multiplied by the block scales (E8M0 bytes through a 256-entry table; E4M3 scales through
  ``DequantizeLinear`` by the tensor scale), then reshaped (and sliced past the padding) to the weight's shape.

mx9/mx6 (``formats.smx.SmxWeight``) have no ONNX type: always decoded by tables -- elements (mx9 sign-magnitude
bytes; mx6 magnitude nibbles times sign bits), micro-exponent bits and shared-exponent bytes index a 512-entry
table of grid steps.  Every table entry is the float32 the NumPy reference computes and every product is exact
or the reference's own single rounding, so the decoded weights equal ``dequantize()`` bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from maia_onnx.formats.fp4 import Fp4Weight
from maia_onnx.formats.mx import e8m0_to_ml_dtypes
from maia_onnx.formats.packing import bit_table, e8m0_table, fp4_pair_table, magnitude_pair_table
from maia_onnx.formats.smx import SmxWeight, sign_magnitude_table, step_table

PACKED_KEY = "maia.packed"  # metadata on every packed initializer: "<format>.<field>"


class Namer:
    """Fresh value/node names that don't collide with anything already in the graph."""

    def __init__(self, graph: ir.Graph):
        self.used = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None and v.name}
        self.used |= set(graph.initializers) | {v.name for v in graph.inputs}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


class WeightDecoder:
    """Builds decode subgraphs for packed weights; nodes collect in ``nodes`` (put them first in the graph)."""

    def __init__(self, graph: ir.Graph, namer: Namer):
        self.graph = graph
        self.namer = namer
        self.nodes: list[ir.Node] = []
        self._tables: dict[str, ir.Value] = {}

    # ------------------------------------------------------------------ building blocks
    def initializer(self, base: str, array: np.ndarray, role: str = "") -> ir.Value:
        v = ir.Value(name=self.namer(base), const_value=ir.tensor(array))
        v.const_value.name = v.name
        v.shape = ir.Shape(v.const_value.shape)
        v.type = ir.TensorType(v.const_value.dtype)
        if role:
            v.metadata_props[PACKED_KEY] = role
        self.graph.register_initializer(v)
        return v

    def table(self, key: str, make) -> ir.Value:
        """A lookup table shared by every weight of the graph that needs it."""
        if key not in self._tables:
            self._tables[key] = self.initializer(f"maia_lut_{key}", make())
        return self._tables[key]

    def op(self, op_type: str, inputs, attrs=None, dtype=ir.DataType.FLOAT, base: str = "w", name: str = "") -> ir.Value:
        out = ir.Value(name=self.namer(name or f"{base}_{op_type.lower()}"), type=ir.TensorType(dtype))
        self.nodes.append(ir.node(op_type, list(inputs), attrs or {}, outputs=[out], name=self.namer(f"{base}_{op_type}")))
        return out

    def const(self, base: str, values, dtype=np.int64) -> ir.Value:
        return self.initializer(base, np.asarray(values, dtype=dtype))

    def lookup(self, table: ir.Value, codes: ir.Value, base: str) -> ir.Value:
        index = self.op("Cast", [codes], {"to": ir.DataType.INT32}, ir.DataType.INT32, base)
        return self.op("Gather", [table, index], {"axis": 0}, table.dtype, base)

    def unpacked(self, table: ir.Value, packed: ir.Value, count: int, shape, base: str) -> ir.Value:
        """``Gather`` each byte's values from ``table`` ([256, k]), keep the first ``count``, reshape to ``shape``."""
        values = self.lookup(table, packed, base)
        per_byte = int(table.shape[1]) if len(table.shape) > 1 else 1
        if packed.shape[0] * per_byte != count:
            flat = self.op("Reshape", [values, self.const(f"{base}_flat", [-1])], dtype=table.dtype, base=base)
            values = self.op("Slice", [flat, self.const(f"{base}_start", [0]), self.const(f"{base}_count", [count])],
                             dtype=table.dtype, base=base)
        return self.op("Reshape", [values, self.const(f"{base}_shape", shape)], dtype=table.dtype, base=base)

    def unblocked(self, blocked: ir.Value, weight, base: str) -> ir.Value:
        """``[pre, blocks, ..., post]`` decoded values -> the weight's own shape (padding sliced off)."""
        lay = weight.layout
        out = blocked
        if lay.padded != lay.length:
            flat = self.op("Reshape", [out, self.const(f"{base}_padded_shape", [lay.pre, lay.padded, lay.post])], base=base)
            out = self.op("Slice", [flat, self.const(f"{base}_start", [0]), self.const(f"{base}_length", [lay.length]),
                                    self.const(f"{base}_axis", [1])], base=base)
        out = self.op("Reshape", [out, self.const(f"{base}_shape", list(lay.shape))], base=base, name=f"{base}_dq")
        out.shape = ir.Shape(list(lay.shape))
        return out

    # ------------------------------------------------------------------ formats
    def fp4(self, weight: Fp4Weight, base: str, form: str) -> ir.Value:
        """The decoded float32 value of a 4-bit weight in ``form`` ("ort" | "standard")."""
        lay = weight.layout
        kind = weight.kind
        if form == "standard":
            elements = self.initializer(f"{base}_fp4", weight.elements(), f"{kind}.elements")
            if kind == "mxfp4":
                scale = self.initializer(f"{base}_e8m0", e8m0_to_ml_dtypes(weight.onnx_scale_codes()), f"{kind}.scales")
            else:
                codes = self.initializer(f"{base}_e4m3", weight.onnx_scale_codes().view(ml_dtypes.float8_e4m3fn),
                                         f"{kind}.scales")
                tensor = self.initializer(f"{base}_scale", np.asarray(weight.tensor_scale, np.float32), f"{kind}.tensor_scale")
                scale = self.op("DequantizeLinear", [codes, tensor], base=f"{base}_scale")
            out = self.op("DequantizeLinear", [elements, scale],
                          {"axis": lay.axis, "block_size": lay.block, "output_dtype": int(ir.DataType.FLOAT)}, base=base,
                          name=f"{base}_dq")
            out.shape = ir.Shape(list(lay.shape))
            return out
        packed = self.initializer(f"{base}_fp4x2", weight.packed(), f"{kind}.elements")
        pairs = self.table("fp4_e2m1_pairs", fp4_pair_table)
        values = self.unpacked(pairs, packed, int(np.prod(lay.blocked_shape)), list(lay.blocked_shape), f"{base}_fp4")
        if kind == "mxfp4":
            codes = self.initializer(f"{base}_e8m0", weight.scale_codes, f"{kind}.scales")
            scale = self.lookup(self.table("e8m0", e8m0_table), codes, f"{base}_scale")
        else:
            codes = self.initializer(f"{base}_e4m3", weight.scale_codes.view(ml_dtypes.float8_e4m3fn), f"{kind}.scales")
            tensor = self.initializer(f"{base}_scale", np.asarray(weight.tensor_scale, np.float32), f"{kind}.tensor_scale")
            scale = self.op("DequantizeLinear", [codes, tensor], base=f"{base}_scale")
        return self.unblocked(self.op("Mul", [values, scale], base=base), weight, base)

    def smx(self, weight: SmxWeight, base: str, fmt: str) -> ir.Value:
        """The decoded float32 value of an mx9/mx6 weight."""
        shape = list(weight.magnitudes.shape)
        count = int(np.prod(shape))
        m = weight.mantissa_bits
        if m == 7:
            elements = self.initializer(f"{base}_{fmt}", weight.packed_elements(), f"{fmt}.elements")
            values = self.unpacked(self.table("mx9_sign_magnitude", lambda: sign_magnitude_table()[:, None]),
                                   elements, count, shape, f"{base}_elements")
        else:
            mags = self.initializer(f"{base}_{fmt}_magnitudes", weight.packed_elements(), f"{fmt}.magnitudes")
            signs = self.initializer(f"{base}_{fmt}_signs", weight.packed_signs(), f"{fmt}.signs")
            values = self.op("Mul", [
                self.unpacked(self.table("magnitude_pairs", magnitude_pair_table), mags, count, shape, f"{base}_magnitudes"),
                self.unpacked(self.table("sign_bits", lambda: bit_table(1.0, -1.0)), signs, count, shape, f"{base}_signs"),
            ], base=f"{base}_elements")
        micro_shape = list(weight.micro.shape)
        micro = self.initializer(f"{base}_{fmt}_micro", weight.packed_micro(), f"{fmt}.micro_exponents")
        micro_bits = self.unpacked(self.table("bits", lambda: bit_table(0, 1, np.int32)), micro,
                                   int(np.prod(micro_shape)), micro_shape, f"{base}_micro")
        shared = self.initializer(f"{base}_{fmt}_exponents", weight.shared, f"{fmt}.shared_exponents")
        shared_i = self.op("Cast", [shared], {"to": ir.DataType.INT32}, ir.DataType.INT32, f"{base}_exponents")
        index = self.op("Add", [self.op("Mul", [shared_i, self.const(f"{base}_two", 2, np.int32)], dtype=ir.DataType.INT32,
                                        base=base), micro_bits], dtype=ir.DataType.INT32, base=f"{base}_step")
        step = self.op("Gather", [self.table(f"step_m{m}", lambda: step_table(m)), index], {"axis": 0}, base=f"{base}_step")
        return self.unblocked(self.op("Mul", [values, step], base=base), weight, base)
