"""QuantizeMxPass: block-scaled weights (and activations) for MatMul/Gemm/Conv in OCP MX, 4-bit or Maia mx9/mx6 numerics.

Formats (NumPy references: ``maia_onnx.formats.mx``, ``formats.fp4``, ``formats.smx``):

- OCP MX ``mxfp8-e4m3``, ``mxfp8-e5m2``, ``mxint8`` (weights + activations): blocks of ``block_size`` (32)
  along the reduction axis, power-of-two shared scales, 1-byte elements read through a blocked
  ``DequantizeLinear``.  Two ONNX forms give bit-identical dequantised weights:

  * ``form="ort"`` (default, opset >= 21): float32 scales that are exact powers of two (mxint8's
    implicit 2^-6 folded in).  ORT's CPU provider runs it.
  * ``form="standard"`` (opset >= 24): real FLOAT8E8M0 scales (``DequantizeLinear(output_dtype=FLOAT)``);
    mxint8 keeps INT8 elements with the 2^-6 folded into the E8M0 code (code - 6).  ORT rejects E8M0
    scales today; ``onnx.reference`` runs this form.

- 4-bit weights, weight-only: ``mxfp4`` (E2M1, E8M0 scales per 32) and ``fp4-e4m3`` (E2M1, FP8 E4M3 scales
  per 16 times one FP32 tensor scale, NVFP4's layout), stored packed two elements per byte
  (``passes.packed_weights``: FLOAT4E2M1 + ``DequantizeLinear`` in the standard form, UINT8 bytes decoded by
  table lookups in the ORT form, whose CPU provider has no FP4 kernel).  ``encoded`` takes weights rounded
  elsewhere (GPTQ, ``passes.gptq``) and stores them as given.

  Activations (mxfp8/mxint8, the MatMul/Gemm data input when its last axis is a multiple of the
  block size): dynamic MX quantise-dequantise inserted in the graph: per block of the last axis,
  ``X = 2^(floor(log2 amax) - emax)`` (floor(log2) computed exactly from float ops), then a blocked
  ``QuantizeLinear(output_dtype=element type)`` -> ``DequantizeLinear`` pair, so the compiler can see
  the MX activation quantisation.  ONNX QuantizeLinear to INT8 saturates to [-128, 127]; the weight
  reference clamps mxint8 symmetrically to +-127 (they differ only for a block value that rounds to
  exactly -2.0 * X).  Shared activations (q/k/v reading one input) are quantised once.

- Maia 100 ``mx9`` / ``mx6`` (shared micro-exponents, block 16, sub-blocks of 2).  Weights are stored as their
  fields (sign-magnitude elements, micro-exponent bits, shared-exponent bytes; ``formats.smx``) and decoded in
  the graph by table lookups, bit-exact to ``fake_quant_mx9/mx6``.  Activations (on by default;
  ``activations=False`` / ``--weights-only`` turns it off): each quantised MatMul/Gemm/Conv's data input goes
  through ``maia.MxFakeQuant`` (``passes.smx_function``), a model-local ONNX function of standard ops (ORT
  inlines it) that is bit-exact to ``fake_quant_smx`` -- blocks along the reduction axis (MatMul: last, Gemm: 0
  with transA, Conv: channels, per group).

``QuantizeMxPass(fmt, form="ort"|"standard", block_size=None (32 for MX, 16 for mx9/mx6/fp4-e4m3), exclude=(...),
activations=None (True where the format supports it: not the 4-bit ones), encoded=None)``; ``exclude`` takes
fnmatch patterns matched against checkpoint layer names (``model.layers.0.mlp.*``), node names and weight names.
``call`` returns an ``MxPassResult`` whose ``layers`` holds one ``MxLayerRecord`` per quantised weight (layer
name, shape, axis, SQNR in dB, bytes before/after, whether its activations are quantised too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.errors import InvalidOptionError
from maia_onnx.formats import mx as mxf
from maia_onnx.formats.fp4 import FP4_KINDS, Fp4Weight, quantize_fp4
from maia_onnx.formats.registry import MX_FORMS, FormatSpec, formats_of, get_format
from maia_onnx.formats.smx import SMX_MANTISSA_BITS, smx_encode
from maia_onnx.io import release_mapping
from maia_onnx.passes.packed_weights import Namer, WeightDecoder
from maia_onnx.passes.smx_function import SMX_FUNCTION_DOMAIN, SMX_FUNCTION_NAME, smx_fake_quant_function  # noqa: F401
from maia_onnx.scales import WeightTarget, weight_targets

FORMS = MX_FORMS
MX_FAMILIES = ("mx", "maia-mx", "fp4")
SMX_MIN_OPSET = 18  # ReduceMax / ReduceProd take their axes as an input
ORT_OPSET = 21  # blocked DequantizeLinear / QuantizeLinear with output_dtype
STANDARD_OPSET = 24  # FLOAT8E8M0 scales
_ELEMENT_IR = {
    "mxfp8-e4m3": ir.DataType.FLOAT8E4M3FN,
    "mxfp8-e5m2": ir.DataType.FLOAT8E5M2,
    "mxint8": ir.DataType.INT8,
    "mxfp4": ir.DataType.FLOAT4E2M1,
}


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _chunks(shape: tuple[int, ...], block_axis: int, max_elements: int = 1 << 23) -> list[tuple[slice, ...]]:
    """Slices of at most ~max_elements along the largest axis other than the block axis (blocks stay whole)."""
    full = [slice(None)] * len(shape)
    size = int(np.prod(shape)) if shape else 1
    others = [a for a in range(len(shape)) if a != block_axis and shape[a] > 1]
    if size <= max_elements or not others:
        return [tuple(full)]
    split = max(others, key=lambda a: shape[a])
    step = max(1, max_elements // (size // shape[split]))
    out = []
    for start in range(0, shape[split], step):
        sl = list(full)
        sl[split] = slice(start, min(start + step, shape[split]))
        out.append(tuple(sl))
    return out


def require_opset(model: ir.Model, version: int) -> None:
    """Raise the default-domain opset to ``version`` (ops we may meet from 18 on only gained types since)."""
    current = model.opset_imports.get("", 0)
    if current < version:
        model.opset_imports[""] = version
    import onnx.helper

    min_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", model.opset_imports[""])])
    # FLOAT4E2M1 / FLOAT8E8M0 tensors need IR 11
    min_ir = max(min_ir, 11 if version >= STANDARD_OPSET else min_ir)
    model.ir_version = max(model.ir_version, min_ir)


@dataclass
class MxLayerRecord:
    """What the pass did to one weight (one row of the report's ``mx_layers``)."""

    layer: str
    node: str
    weight: str
    shape: list[int]
    axis: int
    format: str
    bytes_before: int
    bytes_after: int = 0
    sqnr_db: float = math.nan
    form: str = ""
    activations: bool = False  # its node's data input is MX-quantised too

    def as_dict(self) -> dict[str, Any]:
        row = {k: v for k, v in vars(self).items() if k != "activations"}
        if self.activations:
            row["activations"] = True
        return row


@dataclass
class MxPassResult(onnx_ir.passes.PassResult):
    """``QuantizeMxPass``'s result: the model plus one record per quantised weight."""

    layers: list[MxLayerRecord] = field(default_factory=list)


class QuantizeMxPass(onnx_ir.passes.InPlacePass):
    """Quantise MatMul/Gemm/Conv weights (and MatMul/Gemm activations) to an MX or mx9/mx6 format."""

    def __init__(
        self,
        fmt: str = "mxfp8-e4m3",
        form: str = "ort",
        block_size: int | None = None,
        exclude: Iterable[str] = (),
        activations: bool | None = None,
        encoded: Mapping[str, Fp4Weight] | None = None,
    ):
        super().__init__()
        spec = _mx_spec(fmt)
        if form not in FORMS:
            raise InvalidOptionError(f"unknown --mx-form {form!r}: choose one of {', '.join(FORMS)}")
        self.fmt = spec.name
        self.smx = spec.family == "maia-mx"
        self.form = form
        self.block_size = int(block_size or spec.block_size)
        if self.block_size <= 0 or (self.smx and self.block_size % mxf.SMX_SUB_BLOCK):
            raise InvalidOptionError(f"block size {self.block_size} is invalid for {fmt}: use a positive (even for mx9/mx6) size")
        if activations and not spec.activations:
            activation_formats = [n for n in formats_of(*MX_FAMILIES) if get_format(n).activations]
            raise InvalidOptionError(
                f"{fmt} is weight-only here: drop activations=True (activation MX needs one of {', '.join(activation_formats)})"
            )
        self.activations = spec.activations if activations is None else bool(activations)
        self.exclude = tuple(exclude)
        # weight name -> 4-bit weight rounded elsewhere (GPTQ), stored as given; a mapping that reads each weight
        # back from disk when asked (passes.gptq) is kept as it is, never loaded whole
        self.encoded = encoded if encoded is not None else {}

    # ------------------------------------------------------------------ weights
    def _quantize_weight(self, graph: ir.Graph, target: WeightTarget, namer: Namer, front: list[ir.Node],
                         layers: list[MxLayerRecord], decoder: WeightDecoder) -> ir.Value:
        w = target.weight
        axis = target.reduction_axis
        source = w.const_value
        shape = tuple(source.shape)
        lazy_source = isinstance(source, ir.ExternalTensor)
        row = MxLayerRecord(target.layer, target.node.name, w.name, list(shape), axis, self.fmt, int(source.nbytes))
        signal = noise = 0.0

        def measure(ref: np.ndarray, approx: np.ndarray) -> None:
            nonlocal signal, noise
            r = ref.reshape(-1)
            d = (ref - approx).reshape(-1)
            signal += float(np.dot(r, r))
            noise += float(np.dot(d, d))

        if self.smx or self.fmt in FP4_KINDS:
            # packed storage (a quarter of the FP32 bytes or less) is built now; the FP32 source is released after
            data = np.asarray(source.numpy(), np.float32)
            if self.fmt in FP4_KINDS:
                packed = self.encoded.get(w.name) or quantize_fp4(data, self.fmt, axis, self.block_size)
                out = decoder.fp4(packed, w.name, self.form)
                row.form = self.form
                # chunk by chunk: a whole-tensor dequantize() would add two FP32-sized temporaries
                signal, noise = packed.signal_noise(data)
            else:
                packed = smx_encode(data, SMX_MANTISSA_BITS[self.fmt], axis, self.block_size)
                out = decoder.smx(packed, w.name, self.fmt)
                row.form = "packed"
                measure(data, packed.dequantize())
            del data
            if lazy_source:
                release_mapping(source)
            row.sqnr_db, row.bytes_after = _db(signal, noise), int(packed.nbytes)
            layers.append(row)
            return out

        # 1-byte elements + one scale per block are held in memory (a quarter of the FP32 bytes); the FP32
        # source is read chunk by chunk (memory-mapped for external data) and released afterwards.
        f = mxf.mx_format(self.fmt)
        exps_shape = list(shape)
        exps_shape[axis] = -(-shape[axis] // self.block_size)
        elems = np.empty(shape, f.element_dtype)
        exps = np.empty(exps_shape, np.uint8)
        data = source.numpy()
        for sl in _chunks(shape, axis):
            chunk = np.asarray(data[sl], np.float32)
            e, x = mxf.mx_quantize(chunk, f, axis=axis, block_size=self.block_size)
            elems[sl], exps[sl] = e, x
            measure(chunk, mxf.mx_dequantize(e, x, f, axis=axis, block_size=self.block_size))
            del chunk, e, x  # no view of the mapping may survive, or it cannot be released
        del data
        if lazy_source:
            release_mapping(source)
        row.sqnr_db = _db(signal, noise)
        if self.form == "ort":
            scale = mxf.mx_scale_float(exps, self.fmt)
            attrs = {"axis": axis, "block_size": self.block_size}
        else:
            codes = exps.astype(np.int16)
            if self.fmt == "mxint8":
                codes = np.where(codes == mxf.E8M0_NAN, codes, np.maximum(codes - 6, 0))
            scale = mxf.e8m0_to_ml_dtypes(codes.astype(np.uint8))
            attrs = {"axis": axis, "block_size": self.block_size, "output_dtype": int(ir.DataType.FLOAT)}
        q_value = ir.Value(name=namer(f"{w.name}_mx"), const_value=ir.tensor(elems))
        q_value.const_value.name = q_value.name
        s_value = ir.Value(name=namer(f"{w.name}_mx_scale"), const_value=ir.tensor(scale))
        s_value.const_value.name = s_value.name
        for v in (q_value, s_value):
            v.shape = ir.Shape(v.const_value.shape)
            v.type = ir.TensorType(v.const_value.dtype)
            graph.register_initializer(v)
        out = ir.Value(name=namer(f"{w.name}_dq"), shape=ir.Shape(list(elems.shape)), type=ir.TensorType(ir.DataType.FLOAT))
        dq = ir.node("DequantizeLinear", [q_value, s_value], attrs, outputs=[out], name=namer(f"{w.name}_DequantizeLinear"))
        front.append(dq)
        row.bytes_after = int(q_value.const_value.nbytes + s_value.const_value.nbytes)
        row.form = self.form
        layers.append(row)
        return out

    # ------------------------------------------------------------------ activations
    def _const(self, graph: ir.Graph, namer: Namer, base: str, array: np.ndarray) -> ir.Value:
        v = ir.Value(name=namer(base), const_value=ir.tensor(array))
        v.const_value.name = v.name
        v.shape = ir.Shape(v.const_value.shape)
        v.type = ir.TensorType(v.const_value.dtype)
        graph.register_initializer(v)
        return v

    def _activation_fake_quant(self, graph: ir.Graph, node: ir.Node, x: ir.Value, namer: Namer, consts: dict) -> ir.Value:
        """Dynamic MX quantise-dequantise of ``x`` in blocks of its last axis, inserted before ``node``."""
        f = mxf.mx_format(self.fmt)
        b = self.block_size
        if not consts:
            consts["flat"] = self._const(graph, namer, "mx_act_block_shape", np.array([-1, b], np.int64))
            consts["axes"] = self._const(graph, namer, "mx_act_axes", np.array([1], np.int64))
            consts["tiny"] = self._const(graph, namer, "mx_act_tiny", np.array(2.0**-126, np.float32))
            consts["ln2"] = self._const(graph, namer, "mx_act_ln2", np.array(math.log(2.0), np.float32))
            consts["two"] = self._const(graph, namer, "mx_act_two", np.array(2.0, np.float32))
            consts["emax"] = self._const(graph, namer, "mx_act_emax", np.array(f.emax, np.float32))
            consts["emin"] = self._const(graph, namer, "mx_act_emin", np.array(-mxf.E8M0_BIAS, np.float32))
            consts["implicit"] = self._const(graph, namer, "mx_act_implicit", np.array(f.implicit_scale, np.float32))
        c = consts
        nodes: list[ir.Node] = []
        base = x.name or "act"

        def op(op_type, inputs, attrs=None, dtype=ir.DataType.FLOAT):
            out = ir.Value(name=namer(f"{base}_mx_{op_type.lower()}"), type=ir.TensorType(dtype))
            nodes.append(ir.node(op_type, inputs, attrs or {}, outputs=[out], name=namer(f"{base}_mx_{op_type}")))
            return out

        shape = op("Shape", [x], dtype=ir.DataType.INT64)
        flat = op("Reshape", [x, c["flat"]])
        amax = op("ReduceMax", [op("Abs", [flat]), c["axes"]], {"keepdims": 1})
        amax = op("Max", [amax, c["tiny"]])  # all-zero block: any scale works, avoid log(0)
        e0 = op("Floor", [op("Div", [op("Log", [amax]), c["ln2"]])])
        # Log/ln2 can land one off next to a power of two: fix floor(log2) exactly with two compares.
        p = op("Pow", [c["two"], e0])
        up = op("Cast", [op("LessOrEqual", [op("Mul", [p, c["two"]]), amax], dtype=ir.DataType.BOOL)], {"to": ir.DataType.FLOAT})
        down = op("Cast", [op("Greater", [p, amax], dtype=ir.DataType.BOOL)], {"to": ir.DataType.FLOAT})
        e = op("Sub", [op("Add", [e0, up]), down])
        scale = op("Pow", [c["two"], op("Max", [op("Sub", [e, c["emax"]]), c["emin"]])])
        if f.implicit_scale != 1.0:
            scale = op("Mul", [scale, c["implicit"]])
        q = op(
            "QuantizeLinear",
            [flat, scale],
            {"axis": 1, "block_size": b, "output_dtype": int(_ELEMENT_IR[self.fmt])},
            dtype=_ELEMENT_IR[self.fmt],
        )
        dq = op("DequantizeLinear", [q, scale], {"axis": 1, "block_size": b})
        out = op("Reshape", [dq, shape])
        out.shape = x.shape
        for n in nodes:
            graph.insert_before(node, n)
        return out

    def _smx_activations(self, model: ir.Model, targets: list[WeightTarget], namer: Namer) -> set[str]:
        """Put ``maia.MxFakeQuant`` on every quantised node's data input, blocked along its reduction axis."""
        graph = model.graph
        if model.opset_imports.get("", 0) < SMX_MIN_OPSET:
            require_opset(model, SMX_MIN_OPSET)
        key = (SMX_FUNCTION_DOMAIN, SMX_FUNCTION_NAME, "")
        if key not in model.functions:
            model.functions[key] = ir.serde.deserialize_function(smx_fake_quant_function(model.opset_imports[""]))
        model.opset_imports.setdefault(SMX_FUNCTION_DOMAIN, 1)
        attrs = {"mantissa_bits": SMX_MANTISSA_BITS[self.fmt], "block_size": self.block_size}
        cache: dict[tuple, ir.Value] = {}
        quantised: set[str] = set()
        for t in targets:
            node = t.node
            x = node.inputs[0]
            if x is None or x.is_initializer() or x.const_value is not None or x.dtype not in (None, ir.DataType.FLOAT):
                continue
            groups, per_group = 1, 0
            if node.op_type == "MatMul":
                axis = -1
            elif node.op_type == "Gemm":
                axis = 0 if node.attributes.get_int("transA", 0) else -1
            else:  # Conv: channels; a grouped conv's blocks stay inside their group
                axis = 1
                groups = node.attributes.get_int("group", 1)
                per_group = t.weight.shape[1] if t.weight.shape is not None else 0
                if groups == 1 or not isinstance(per_group, int) or per_group % self.block_size == 0:
                    groups = 1
            cache_key = (id(x), axis, groups)
            if cache_key not in cache:
                first_use = min((u.node for u in x.uses()), key=lambda n: graph.index(n) if n.graph is graph else 0)
                base = x.name or "act"
                nodes: list[ir.Node] = []

                def value(stem, dtype=ir.DataType.FLOAT, base=base):
                    return ir.Value(name=namer(f"{base}_{stem}"), type=ir.TensorType(dtype))

                src, fq_axis = x, axis
                if groups > 1:  # [N, C, ...] -> [N, groups, C/groups, rest]: block axis 2
                    grouped_shape = ir.Value(name=namer(f"{base}_groups_shape"), const_value=ir.tensor(np.array([0, groups, per_group, -1], np.int64)))
                    grouped_shape.const_value.name = grouped_shape.name
                    grouped_shape.shape, grouped_shape.type = ir.Shape([4]), ir.TensorType(ir.DataType.INT64)
                    graph.register_initializer(grouped_shape)
                    src, fq_axis = value("grouped"), 2
                    nodes.append(ir.node("Reshape", [x, grouped_shape], outputs=[src], name=namer(f"{base}_group_Reshape")))
                out = value(self.fmt)
                nodes.append(
                    ir.node(SMX_FUNCTION_NAME, [src], {"axis": fq_axis, **attrs}, domain=SMX_FUNCTION_DOMAIN,
                            outputs=[out], name=namer(f"{base}_{SMX_FUNCTION_NAME}"))
                )
                if groups > 1:
                    shape = value("shape", ir.DataType.INT64)
                    restored = value(f"{self.fmt}_ungrouped")
                    nodes.append(ir.node("Shape", [x], outputs=[shape], name=namer(f"{base}_Shape")))
                    nodes.append(ir.node("Reshape", [out, shape], outputs=[restored], name=namer(f"{base}_ungroup_Reshape")))
                    out = restored
                out.shape = x.shape
                for n in nodes:
                    graph.insert_before(first_use, n)
                cache[cache_key] = out
            node.replace_input_with(0, cache[cache_key])
            quantised.add(node.name)
        return quantised

    # ------------------------------------------------------------------ driver
    def call(self, model: ir.Model) -> MxPassResult:
        graph = model.graph
        namer = Namer(graph)
        targets = [t for t in weight_targets(graph) if not t.excluded_by(self.exclude)]
        if not targets:
            return MxPassResult(model, modified=False)
        if not self.smx:
            require_opset(model, STANDARD_OPSET if self.form == "standard" else ORT_OPSET)
        layers: list[MxLayerRecord] = []
        front: list[ir.Node] = []
        decoder = WeightDecoder(graph, namer)
        done: dict[int, ir.Value] = {}
        for t in targets:
            key = id(t.weight)
            if key not in done:
                done[key] = self._quantize_weight(graph, t, namer, front, layers, decoder)
            if done[key] is not t.weight:
                t.node.replace_input_with(t.input_index, done[key])
        # Dequantised weights depend on initializers only: put their DequantizeLinear / decode nodes first.
        front += decoder.nodes
        if front:
            first = graph.node(0)
            for n in front:
                graph.insert_before(first, n)
        # Drop float originals nobody reads any more (their quantised copies replace them).
        for t in targets:
            w = t.weight
            if w.name in graph.initializers and not w.uses() and not w.is_graph_output():
                graph.initializers.pop(w.name)
        quantised: set[str] = set()
        if self.activations and self.smx:
            quantised = self._smx_activations(model, targets, namer)
        elif self.activations:
            consts: dict = {}
            cache: dict[int, ir.Value] = {}
            for t in targets:
                node = t.node
                if node.op_type not in ("MatMul", "Gemm") or (node.op_type == "Gemm" and node.attributes.get_int("transA", 0)):
                    continue
                x = node.inputs[0]
                if x is None or x.is_initializer() or x.shape is None or not isinstance(x.shape[-1], int):
                    continue
                if x.shape[-1] % self.block_size or x.dtype not in (None, ir.DataType.FLOAT):
                    continue
                if id(x) not in cache:
                    first_use = min((u.node for u in x.uses()), key=lambda n: graph.index(n) if n.graph is graph else 0)
                    cache[id(x)] = self._activation_fake_quant(graph, first_use, x, namer, consts)
                node.replace_input_with(0, cache[id(x)])
                quantised.add(node.name)
        for row in layers:
            row.activations = row.node in quantised
        return MxPassResult(model, True, layers)


def _mx_spec(fmt: str) -> FormatSpec:
    """The registry entry of an MX / mx9 / mx6 format name; one-line error for any other name."""
    names = formats_of(*MX_FAMILIES)
    if str(fmt).lower() not in names:
        raise InvalidOptionError(f"unknown MX format {fmt!r}: choose one of {', '.join(names)}")
    return get_format(fmt)
