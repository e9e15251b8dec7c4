"""FP8 post-training quantization pass: standard QDQ ONNX with 1-byte FLOAT8 weights and static activation scales.

Weights of MatMul / Gemm / Conv / ConvTranspose become real FLOAT8E4M3FN (or E5M2) initializers feeding a
``DequantizeLinear`` (per-output-channel ``axis``, per-tensor, or blocked ``block_size`` along the reduction
axis).  Activations entering those ops -- and both operands of the attention matmuls (Q.K^T, P.V), which
have no constant input -- get a ``QuantizeLinear -> DequantizeLinear`` pair with a per-tensor scale from
calibration.  Norms, softmax, residual adds and everything else stay in the original precision.  Nothing is
removed: FP8 has no zero-point clipping, so a ReLU before a QDQ pair still matters.

An activation made by ``Relu`` or ``Clip`` is quantized at that op's *input* and the op is re-applied after the
``DequantizeLinear`` (``x -> Q -> DQ -> Relu -> MatMul``), so no ``Relu``/``Clip`` ever feeds a ``QuantizeLinear``.
Stock ONNX Runtime's default (Level 2) rewrites ``ReluQuantFusion`` / ``ClipQuantFusion`` match exactly that
adjacency and assume an integer zero point: the first deletes the Relu (wrong answers for FP8, which does not
clip at zero), the second aborts session creation on an FP8 zero point.  The reordering is exact, not an
approximation: saturating round-to-nearest-even Q is monotone and maps 0 to 0, so
``relu(DQ(Q(x))) == DQ(Q(relu(x)))``, and ``clip(DQ(Q(x)), DQ(Q(lo)), DQ(Q(hi))) == DQ(Q(clip(x, lo, hi)))`` --
the moved Clip's bounds are the FP8-rounded original bounds.

External (memory-mapped) weights are quantized lazily: the scale is computed now by streaming over the
tensor, the FP8 bytes are produced when the model is saved, and the mapping is released right after, so a
multi-GB model is never held twice.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.errors import InvalidOptionError, UnsupportedModelError
from maia_onnx.formats.fp8 import (
    Fp8Format,
    amax_along,
    dequantize_fp8,
    expand_scale,
    fp8_amax_scale,
    get_fp8_format,
    quantize_fp8,
)
from maia_onnx.scales import layer_name

logger = logging.getLogger(__name__)

DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Conv", "ConvTranspose")
MIN_OPSET = 21  # FP8 QDQ needs 19; blocked DequantizeLinear needs 21
GRANULARITIES = ("channel", "tensor", "block")
_FLOAT_TYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


@dataclass
class QuantTarget:
    """One node to quantize: which inputs are activations and which (if any) is a weight."""

    node: ir.Node
    activation_inputs: list[int]
    weight_input: int | None = None
    weight_channel_axis: int | None = None  # output-channel axis of the weight
    weight_block_axis: int | None = None  # reduction axis, for blocked scales

    @property
    def is_attention(self) -> bool:
        return self.weight_input is None


@dataclass
class LayerRecord:
    """What the pass did to one node (input to the accuracy report)."""

    node: str
    op_type: str
    outputs: list[str]
    activation_scales: dict[str, float] = field(default_factory=dict)
    weight: str | None = None
    weight_scale_max: float | None = None
    weight_scale_min: float | None = None
    weight_granularity: str | None = None
    weight_sqnr_db: float | None = None
    layer: str | None = None  # checkpoint layer name (model.layers.0.mlp.up_proj) when known


@dataclass
class Fp8PassResult(onnx_ir.passes.PassResult):
    """``QuantizeFp8Pass``'s result: the model plus one ``LayerRecord`` per quantized node, in graph order."""

    records: list[LayerRecord] = field(default_factory=list)


def _is_float_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.dtype in _FLOAT_TYPES


def _matches(node: ir.Node, patterns: Sequence[str]) -> bool:
    """fnmatch on the node name, its op type, or its checkpoint layer name (``model.layers.0.mlp.*``, ``*lm_head*``)."""
    if not patterns:
        return False
    weight = node.inputs[1] if len(node.inputs) > 1 and _is_float_constant(node.inputs[1]) else None
    names = [node.name or "", node.op_type, layer_name(node, weight)]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names if n)


def _dequantized(value: ir.Value | None) -> bool:
    """Produced by a DequantizeLinear: already quantized (e.g. QAT import, KV cache), leave it alone."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type in ("Relu", "Clip") and producer.inputs and producer.inputs[0] is not None:
        producer = producer.inputs[0].producer()  # DQ -> Relu/Clip: this pass's own placement after a clamp
    return producer is not None and producer.op_type == "DequantizeLinear"


def find_targets(
    model: ir.Model,
    op_types: Iterable[str] = DEFAULT_OP_TYPES,
    exclude: Sequence[str] = (),
    attention: bool = True,
) -> list[QuantTarget]:
    """Nodes of the main graph to quantize, in graph order (shared by calibration and the pass).

    Inputs that already come out of a DequantizeLinear (QAT imports, an FP8 KV cache) are skipped.
    """
    op_types = set(op_types)
    targets = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in op_types or _matches(node, exclude):
            continue
        inputs = node.inputs
        if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
            continue
        target = None
        if node.op_type == "MatMul":
            a, b = inputs[0], inputs[1]
            if _is_float_constant(b):
                rank = len(b.const_value.shape)
                channel = rank - 1 if rank >= 2 else None
                block = rank - 2 if rank >= 2 else 0
                target = QuantTarget(node, [0], 1, channel, block)
            elif _is_float_constant(a):
                target = QuantTarget(node, [1], 0, None, None)
            elif _dequantized(b) and b.producer().inputs[0] is not None and b.producer().inputs[0].const_value is not None:
                target = QuantTarget(node, [0])  # FP8 weight from a QAT import: only the activation is left
            elif attention:
                target = QuantTarget(node, [0, 1])
        elif node.op_type == "Gemm":
            if _is_float_constant(inputs[1]):
                trans_b = node.attributes.get_int("transB", 0)
                target = QuantTarget(node, [0], 1, 0 if trans_b else 1, 1 if trans_b else 0)
            elif _dequantized(inputs[1]):
                target = QuantTarget(node, [0])
            elif attention:
                target = QuantTarget(node, [0, 1])
        elif node.op_type == "Gather":
            # embedding tables: weight-only, one scale per row (token), as rows are read independently
            table = inputs[0]
            if _is_float_constant(table) and len(table.const_value.shape) == 2 and node.attributes.get_int("axis", 0) == 0:
                target = QuantTarget(node, [], 0, 0, 1)
        elif node.op_type in ("Conv", "ConvTranspose"):
            if _is_float_constant(inputs[1]):
                target = QuantTarget(node, [0], 1, 0, 1) if node.op_type == "Conv" else QuantTarget(node, [0], 1, 1, 0)
            elif _dequantized(inputs[1]):
                target = QuantTarget(node, [0])
        if target is None:
            continue
        target.activation_inputs = [i for i in target.activation_inputs if not _dequantized(inputs[i])]
        if target.activation_inputs or target.weight_input is not None:
            targets.append(target)
    return targets


def activation_values(targets: Sequence[QuantTarget]) -> list[str]:
    """Names of the activations that need a static scale, each once, in graph order."""
    names: dict[str, None] = {}
    for t in targets:
        for i in t.activation_inputs:
            v = t.node.inputs[i]
            if v is not None and v.name and v.dtype in (_FLOAT_TYPES.keys() | {None}):
                names.setdefault(v.name, None)
    return list(names)


def ensure_opset(model: ir.Model, minimum: int = MIN_OPSET) -> None:
    """FP8 QDQ needs opset >= 21 here; upgrade older models with the onnxscript version converter."""
    # FP8 tensors need IR >= 9 and opset 21 IR >= 10; legacy IR < 4 also forbids initializers outside graph inputs
    model.ir_version = max(model.ir_version or 0, 10)
    current = model.opset_imports.get("", None)
    if current is None or current >= minimum:
        if current is None:
            model.opset_imports[""] = minimum
        return
    try:
        from onnxscript import version_converter

        version_converter.convert_version(model, minimum, fallback=True)
    except Exception as exc:  # the converter raises various types for unsupported ops
        raise UnsupportedModelError(
            f"model uses opset {current}; FP8 QDQ needs opset >= {minimum} and the automatic upgrade failed "
            f"({type(exc).__name__}): re-export with --opset {minimum}"
        ) from exc
    model.opset_imports[""] = max(model.opset_imports.get("", minimum), minimum)


def _lazy_fp8(source: ir.TensorProtocol, scale: np.ndarray, fmt: Fp8Format, axis, block_size, name: str):
    """A tensor whose FP8 bytes are computed when read (at save time), releasing the source mapping after."""

    def produce():
        q = quantize_fp8(source.numpy(), scale, fmt, axis=axis, block_size=block_size)
        release = getattr(source, "release", None)
        if release is not None:
            try:
                release()  # unmap the FP32 pages now: peak memory stays one tensor, not the whole model
            except BufferError:  # a view is still alive somewhere; the mapping goes when it does
                pass
        return ir.Tensor(q, dtype=fmt.ir_dtype, name=name)

    return ir.LazyTensor(produce, dtype=fmt.ir_dtype, shape=ir.Shape(list(source.shape)), name=name)


def _sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - approx.astype(np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


class QuantizeFp8Pass(onnx_ir.passes.InPlacePass):
    """Insert FP8 QDQ around MatMul/Gemm/Conv/ConvTranspose (and attention matmuls) with 1-byte weights.

    Args:
        fmt: "e4m3fn" (default) or "e5m2".
        granularity: weight scales "channel" (per output channel, default), "tensor" or "block".
        block_size: elements per scale along the reduction axis when granularity == "block".
        activation_scales: value name -> per-tensor scale (from calibration or an imported scales file);
            activations without a scale stay unquantized (weight-only for that input).
        weight_scales: initializer name -> scale array to use instead of amax/max (imported scales).
        op_types: op types to quantize.
        exclude: fnmatch patterns on node name or op type to leave alone.
        attention: also quantize matmuls with two activation inputs (Q.K^T, P.V).
        weights_only: never quantize activations.
        embeddings: also store embedding tables (Gather on a constant 2-D table) in FP8, per-row scales.
    """

    def __init__(
        self,
        fmt: str = "e4m3fn",
        granularity: str = "channel",
        block_size: int | None = None,
        activation_scales: Mapping[str, float] | None = None,
        weight_scales: Mapping[str, np.ndarray] | None = None,
        op_types: Iterable[str] = DEFAULT_OP_TYPES,
        exclude: Sequence[str] = (),
        attention: bool = True,
        weights_only: bool = False,
        embeddings: bool = False,
    ):
        super().__init__()
        self.fmt = get_fp8_format(fmt)
        if granularity not in GRANULARITIES:
            raise InvalidOptionError(f"weight granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if granularity == "block" and not (block_size and block_size > 0):
            raise InvalidOptionError("blocked weight scales need --block-size N (e.g. 32 or 128)")
        self.granularity = granularity
        self.block_size = block_size if granularity == "block" else None
        self.activation_scales = dict(activation_scales or {})
        self.weight_scales = dict(weight_scales or {})
        self.op_types = tuple(op_types) + (("Gather",) if embeddings and "Gather" not in op_types else ())
        self.exclude = tuple(exclude)
        self.attention = attention
        self.weights_only = weights_only

    # ----------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> Fp8PassResult:
        ensure_opset(model)
        graph = model.graph
        targets = find_targets(model, self.op_types, self.exclude, self.attention)
        records: list[LayerRecord] = []
        self._zero_points: dict[ir.DataType, ir.Value] = {}
        self._activation_qdq: dict[str, ir.Value] = {}
        self._weight_dq: dict[str, tuple[ir.Value, LayerRecord]] = {}
        self._moved_clamps: list[ir.Node] = []
        modified = False
        for target in targets:
            node = target.node
            record = LayerRecord(
                node=node.name or f"{node.op_type}_{len(records)}",
                op_type=node.op_type,
                outputs=[o.name for o in node.outputs],
                layer=_layer_name(node, target),
            )
            if target.weight_input is not None:
                modified |= self._quantize_weight(graph, node, target, record)
            if not self.weights_only:
                for i in target.activation_inputs:
                    modified |= self._quantize_activation(graph, node, i, record)
            if record.weight or record.activation_scales:
                records.append(record)
        # FP32 weights whose every use now reads the FP8 copy (tied weights included) are dropped
        for name in self._weight_dq:
            value = graph.initializers.get(name)
            if value is not None and not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                graph.initializers.pop(name)
        # a Relu/Clip re-applied after its DQ is dead where every reader now takes the quantized copy
        for clamp in self._moved_clamps:
            out = clamp.outputs[0]
            if not out.uses() and not out.is_graph_output() and clamp.graph is graph:
                bounds = [v.producer() for v in clamp.inputs[1:] if v is not None and v.producer() is not None]
                graph.remove(clamp, safe=True)
                for constant in bounds:  # its Constant bounds too, when nothing else reads them
                    if constant.op_type == "Constant" and not constant.outputs[0].uses() and not constant.outputs[0].is_graph_output():
                        graph.remove(constant, safe=True)
        graph.meta.pop("maia_value_names", None)
        graph.meta.pop("maia_node_names", None)
        return Fp8PassResult(model, modified, records)

    # ----------------------------------------------------------------------------------------------
    def _zero_point(self, graph: ir.Graph) -> ir.Value:
        dtype = self.fmt.ir_dtype
        if dtype not in self._zero_points:
            name = _unique_name(graph, f"fp8_zero_{self.fmt.name}")
            tensor = ir.Tensor(np.zeros((), dtype=self.fmt.np_dtype), dtype=dtype, name=name)
            value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape([]), const_value=tensor)
            graph.register_initializer(value)
            self._zero_points[dtype] = value
        return self._zero_points[dtype]

    def _quantize_activation(self, graph: ir.Graph, node: ir.Node, index: int, record: LayerRecord) -> bool:
        value = node.inputs[index]
        if value is None or value.name not in self.activation_scales:
            return False
        if value.dtype is not None and value.dtype not in _FLOAT_TYPES:
            return False
        scale = float(self.activation_scales[value.name])
        record.activation_scales[value.name] = scale
        if value.name not in self._activation_qdq:
            if not np.isfinite(scale) or scale <= 0:
                raise InvalidOptionError(f"activation scale for {value.name!r} is {scale}: scales must be positive and finite")
            np_dtype = _FLOAT_TYPES.get(value.dtype, np.float32)
            scale_name = _unique_name(graph, f"{value.name}_scale")
            scale_value = ir.Value(
                name=scale_name,
                type=ir.TensorType(value.dtype or ir.DataType.FLOAT),
                shape=ir.Shape([]),
                const_value=ir.Tensor(np.asarray(scale, dtype=np_dtype), name=scale_name),
            )
            graph.register_initializer(scale_value)
            zero = self._zero_point(graph)
            clamp = _clamp_producer(value)
            source = clamp.inputs[0] if clamp is not None else value
            q = ir.node("QuantizeLinear", [source, scale_value, zero], name=_unique_node(graph, f"{value.name}_QuantizeLinear"))
            q.outputs[0].name = _unique_name(graph, f"{value.name}_quantized")
            q.outputs[0].type = ir.TensorType(self.fmt.ir_dtype)
            q.outputs[0].shape = value.shape
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale_value, zero], name=_unique_node(graph, f"{value.name}_DequantizeLinear"))
            dq.outputs[0].name = _unique_name(graph, f"{value.name}_dequantized" + ("_unclamped" if clamp else ""))
            dq.outputs[0].type = value.type
            dq.outputs[0].shape = value.shape
            new_nodes = [q, dq]
            if clamp is not None:  # see the module docstring: Relu/Clip after the DQ, never before the Q
                new_nodes.append(self._clamp_after(graph, clamp, dq.outputs[0], scale_value, np_dtype, value))
                self._moved_clamps.append(clamp)
            graph.insert_before(node, new_nodes)
            self._activation_qdq[value.name] = new_nodes[-1].outputs[0]
        node.replace_input_with(index, self._activation_qdq[value.name])
        return True

    def _clamp_after(self, graph: ir.Graph, clamp: ir.Node, dequantized: ir.Value, scale_value: ir.Value,
                     np_dtype, value: ir.Value) -> ir.Node:
        """The Relu/Clip ``clamp`` re-applied to ``dequantized``; a Clip's bounds rounded to the FP8 grid."""
        inputs = [dequantized]
        if clamp.op_type == "Clip":
            scale = scale_value.const_value.numpy()
            for k, default in ((1, -np.inf), (2, np.inf)):
                bound = _constant(clamp.inputs[k]) if len(clamp.inputs) > k and clamp.inputs[k] is not None else None
                bound = np.asarray(default if bound is None else bound, dtype=np_dtype)
                rounded = dequantize_fp8(quantize_fp8(bound, scale, self.fmt), scale, dtype=np_dtype).reshape(())
                name = _unique_name(graph, f"{value.name}_clip_{'min' if k == 1 else 'max'}")
                bound_value = ir.Value(name=name, type=ir.TensorType(value.dtype or ir.DataType.FLOAT), shape=ir.Shape([]),
                                       const_value=ir.Tensor(np.asarray(rounded, dtype=np_dtype), name=name))
                graph.register_initializer(bound_value)
                inputs.append(bound_value)
        moved = ir.node(clamp.op_type, inputs, name=_unique_node(graph, f"{value.name}_{clamp.op_type}_after_dq"))
        moved.outputs[0].name = _unique_name(graph, f"{value.name}_dequantized")
        moved.outputs[0].type = value.type
        moved.outputs[0].shape = value.shape
        return moved

    def _weight_scale(self, name: str, data, axis, block_size) -> np.ndarray:
        if name in self.weight_scales:
            return np.asarray(self.weight_scales[name], dtype=np.float32)
        return fp8_amax_scale(amax_along(data, axis, block_size), self.fmt)

    def _quantize_weight(self, graph: ir.Graph, node: ir.Node, target: QuantTarget, record: LayerRecord) -> bool:
        weight = node.inputs[target.weight_input]
        tensor = weight.const_value
        if weight.name in self._weight_dq:  # tied weights share one FP8 copy
            dq_out, first = self._weight_dq[weight.name]
            node.replace_input_with(target.weight_input, dq_out)
            record.weight, record.weight_scale_max = first.weight, first.weight_scale_max
            record.weight_scale_min, record.weight_granularity = first.weight_scale_min, first.weight_granularity
            return True
        shape = tuple(tensor.shape)
        granularity = self.granularity
        axis = target.weight_channel_axis if granularity == "channel" else None
        block_size = None
        if granularity == "block":
            axis = target.weight_block_axis
            block_size = self.block_size
        if axis is None and granularity != "tensor":
            granularity = "tensor"
        if weight.name in self.weight_scales:
            # an imported scale decides the granularity by its shape
            imported = np.asarray(self.weight_scales[weight.name], dtype=np.float32)
            if imported.size == 1:
                granularity, axis, block_size = "tensor", None, None
            elif imported.ndim == 1 and target.weight_channel_axis is not None and imported.shape[0] == shape[target.weight_channel_axis]:
                granularity, axis, block_size = "channel", target.weight_channel_axis, None
            else:
                raise InvalidOptionError(
                    f"imported weight scale for {weight.name!r} has shape {imported.shape}, which fits neither per-tensor "
                    f"nor per-channel (axis {target.weight_channel_axis}) of weight shape {shape}: fix the scales file"
                )
        source_dtype = tensor.dtype
        is_lazy = isinstance(tensor, ir.ExternalTensor)
        data = tensor.numpy()
        scale = self._weight_scale(weight.name, data, axis, block_size)
        if scale.ndim == 0:
            axis = None
        qname = _unique_name(graph, f"{weight.name}_quantized")
        if is_lazy:
            del data  # the lazy tensor maps the file again when saving; drop this mapping now
            tensor.release()
            q_tensor = _lazy_fp8(tensor, scale, self.fmt, axis, block_size, qname)
        else:
            q = quantize_fp8(data, scale, self.fmt, axis=axis, block_size=block_size)
            q_tensor = ir.Tensor(q, dtype=self.fmt.ir_dtype, name=qname)
            deq = q.astype(np.float32) * (scale if axis is None else expand_scale(scale, shape, axis, block_size))
            record.weight_sqnr_db = _sqnr_db(np.asarray(data, np.float32), deq)
        q_value = ir.Value(name=qname, type=ir.TensorType(self.fmt.ir_dtype), shape=ir.Shape(list(shape)), const_value=q_tensor)
        graph.register_initializer(q_value)
        scale_name = _unique_name(graph, f"{weight.name}_scale")
        scale_np = scale.astype(_FLOAT_TYPES[source_dtype])
        scale_value = ir.Value(
            name=scale_name, type=ir.TensorType(source_dtype), shape=ir.Shape(list(scale_np.shape)),
            const_value=ir.Tensor(scale_np, name=scale_name),
        )
        graph.register_initializer(scale_value)
        attributes = {}
        if axis is not None:
            attributes["axis"] = int(axis)
        if block_size:
            attributes["block_size"] = int(block_size)
        dq = ir.node("DequantizeLinear", [q_value, scale_value], attributes=attributes, name=_unique_node(graph, f"{weight.name}_DequantizeLinear"))
        dq.outputs[0].name = _unique_name(graph, f"{weight.name}_dequantized")
        dq.outputs[0].type = ir.TensorType(source_dtype)
        dq.outputs[0].shape = ir.Shape(list(shape))
        graph.insert_before(node, [dq])
        # every consumer of the FP32 weight that is a target gets the DQ; others keep the original
        node.replace_input_with(target.weight_input, dq.outputs[0])
        if not weight.uses() and not weight.is_graph_output() and not weight.is_graph_input():
            graph.initializers.pop(weight.name, None)
        record.weight = weight.name
        record.weight_scale_max = float(np.max(scale))
        record.weight_scale_min = float(np.min(scale))
        record.weight_granularity = granularity if not block_size else f"block{block_size}"
        self._weight_dq[weight.name] = (dq.outputs[0], record)
        return True


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or ``Constant`` output, else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _clamp_producer(value: ir.Value) -> ir.Node | None:
    """The Relu / Clip (constant or absent bounds) that produces ``value``, which the QDQ pair is moved across."""
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return None
    if node.inputs[0].dtype is not None and node.inputs[0].dtype not in _FLOAT_TYPES:
        return None
    if node.op_type == "Relu":
        return node
    if node.op_type == "Clip" and "min" not in node.attributes and "max" not in node.attributes:
        bounds = [node.inputs[k] if len(node.inputs) > k else None for k in (1, 2)]
        if all(b is None or (_constant(b) is not None and _constant(b).size == 1) for b in bounds):
            return node
    return None  # a Clip with run-time bounds: ORT cannot fold it into the Q either, so the plain placement is safe


def _layer_name(node: ir.Node, target: QuantTarget) -> str | None:
    weight = node.inputs[target.weight_input] if target.weight_input is not None else None
    return layer_name(node, weight)


def _claim_name(taken: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... : the first not in ``taken``, which it is then added to."""
    name, k = base, 1
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


def _unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not yet used in the graph (initializers and node outputs)."""
    taken = graph.meta.setdefault("maia_value_names", None)
    if taken is None:
        taken = {v.name for v in graph.initializers.values()}
        taken.update(v.name for v in graph.inputs)
        for n in graph:
            taken.update(o.name for o in n.outputs if o.name)
        graph.meta["maia_value_names"] = taken
    return _claim_name(taken, base)


def _unique_node(graph: ir.Graph, base: str) -> str:
    taken = graph.meta.setdefault("maia_node_names", None)
    if taken is None:
        taken = {n.name for n in graph if n.name}
        graph.meta["maia_node_names"] = taken
    return _claim_name(taken, base)
