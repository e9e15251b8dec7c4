"""The one dim binder and the one shape inference entry, both on onnx_ir and both weight-free.

``bind_input_shapes`` turns every symbolic graph-input dim into an int: a ``--dim NAME=N`` override first,
then (when batch/seq/past are given) the role its name or position says (batch, seq, past, past+seq),
then ``default``; a dim none of these sizes is a one-line error asking for ``--dim``.

``infer_shapes`` runs ONNX Runtime's symbolic shape inference (it follows Shape->Concat->Reshape and
Range chains) and ONNX's own inference (it knows model-local functions), keeping the more concrete answer
per value. It works on a copy of the graph without weights: every initializer that is external or large
becomes a typed graph input, so no weight byte is read. com.microsoft collectives are replaced in that
copy by shape-equivalent standard ops (AllReduce -> Identity, AllGather -> Concat of ``group_size`` copies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import onnx
import onnx_ir as ir

from maia_onnx.errors import InvalidOptionError
from maia_onnx.io import initializer_proto, proto_without_initializers

# Initializers up to this many elements stay in the inference copy: shape inference reads small constants
# (Reshape targets, axes), never weights.
SMALL_CONSTANT_ELEMENTS = 4096

_ALIASES = {
    "batch": {"batch", "batch_size", "batchsize", "b", "n", "bs", "num_batches"},
    "seq": {"seq", "seq_len", "seqlen", "sequence", "sequence_length", "seq_length", "tokens", "num_tokens",
            "decoder_sequence_length", "encoder_sequence_length"},
    "past": {"past", "past_seq", "past_len", "past_seq_len", "past_sequence_length", "past_length",
             "cache_len", "cache_length", "past_decoder_sequence_length"},
    "total": {"total", "total_seq", "total_sequence_length", "total_length", "past+seq", "seq+past",
              "past_sequence_length+1", "attention_mask_len"},
}
_INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32)
# Value.meta key (in memory only) keeping a graph input's shape as the file declared it, so a model can be
# re-bound for another phase after infer_shapes gave its inputs numbers
_DECLARED = "maia.declared_shape"


@dataclass
class DimBinding:
    """Concrete shapes of the graph inputs and the value each symbolic dim got."""

    shapes: dict[str, list[int]] = field(default_factory=dict)  # graph input name -> concrete shape
    symbols: dict[str, int] = field(default_factory=dict)  # symbolic dim name -> size used


def dim_role(symbol: str) -> str | None:
    """"batch" / "seq" / "past" / "total" when a dim's name says which it is."""
    key = re.sub(r"\s+", "", symbol.lower())
    for role, names in _ALIASES.items():
        if key in names:
            return role
    if "+" in key:
        terms = set(key.split("+"))
        if terms & _ALIASES["past"] and terms & _ALIASES["seq"]:
            return "total"
    return None


def _structural_roles(value: ir.Value, rank: int) -> list[str | None]:
    """What each dim of a graph input most likely means, from its name, dtype and rank."""
    lname = value.name.lower()
    roles: list[str | None] = [None] * rank
    if rank == 0:
        return roles
    roles[0] = "batch"
    if ("past" in lname or "cache" in lname) and rank >= 3:
        roles[2 if rank == 4 else 1] = "past"
    elif "mask" in lname and rank >= 2:
        roles[-1] = "total"
        if rank == 4:
            roles[2] = "seq"
    elif rank >= 2 and value.dtype in _INT_TYPES:
        roles[1] = "seq"
    elif rank == 3:  # [batch, seq, hidden] activations (e.g. a later pipeline stage)
        roles[1] = "seq"
    return roles


def declared_shape(value: ir.Value) -> ir.Shape | None:
    """The shape a graph input had before any binding (symbolic dims included)."""
    return value.meta.get(_DECLARED, value.shape)


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are fed at run time (not initializers listed as inputs)."""
    inits = set(model.graph.initializers)
    return [v for v in model.graph.inputs if v.name not in inits]


def bind_input_shapes(
    model: ir.Model,
    *,
    batch: int | None = None,
    seq: int | None = None,
    past: int | None = None,
    overrides: Mapping[str, int] | None = None,
    default: int | None = None,
) -> DimBinding:
    """Concrete shapes for every graph input; see the module docstring for the order of the rules."""
    roles_given = batch is not None and seq is not None
    role_value = {"batch": batch, "seq": seq, "past": past or 0, "total": (past or 0) + (seq or 0)}
    symbols: dict[str, int] = {k: int(v) for k, v in (overrides or {}).items()}
    binding = DimBinding()
    inputs = graph_inputs(model)
    if roles_given:  # names we recognise first, so a name seen later at an odd position still gets its role
        for value in inputs:
            for d in declared_shape(value) or ():
                name = getattr(d, "value", None)
                if not isinstance(d, int) and name and name not in symbols:
                    role = dim_role(name)
                    if role:
                        symbols[name] = role_value[role]
    for value in inputs:
        declared = declared_shape(value)
        if declared is None:
            continue
        roles = _structural_roles(value, len(declared)) if roles_given else [None] * len(declared)
        shape = []
        for i, d in enumerate(declared):
            if isinstance(d, int) and d > 0:
                shape.append(d)
                continue
            symbol = getattr(d, "value", None) or f"{value.name}[{i}]"
            if symbol not in symbols:
                if roles[i] is not None:
                    symbols[symbol] = role_value[roles[i]]
                elif default is not None:
                    symbols[symbol] = int(default)
                else:
                    raise InvalidOptionError(
                        f"cannot tell what dim {i} ({symbol!r}) of input {value.name!r} means: pass --dim {symbol}=N")
            binding.symbols[symbol] = symbols[symbol]
            shape.append(symbols[symbol])
        binding.shapes[value.name] = shape
    return binding


# ---------------------------------------------------------------------------------------------- inference


def _is_weight(value: ir.Value) -> bool:
    tensor = value.const_value
    return tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.size > SMALL_CONSTANT_ELEMENTS


def _shape_only_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto without its weights: external or large initializers become typed graph inputs."""
    proto = proto_without_initializers(model)
    listed = {i.name for i in proto.graph.input}
    for value in model.graph.initializers.values():
        if not _is_weight(value):
            proto.graph.initializer.append(initializer_proto(value))
        elif value.name not in listed:
            tensor = value.const_value
            dtype = (value.dtype or tensor.dtype).value
            shape = list(tensor.shape.numpy()) if tensor is not None else [d if isinstance(d, int) else None for d in value.shape or ()]
            if len(shape) == 1 and ir.DataType(dtype).is_integer() and (shape[0] or 0) > SMALL_CONSTANT_ELEMENTS:
                # ONNX's data propagation treats a 1-D integer tensor as a shape and makes one symbolic dim per
                # element: a packed 4-bit weight (millions of bytes) would exhaust memory.  Its length is never
                # needed: the decode reshapes it to a constant shape.
                shape = [None]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(value.name, dtype, shape))
    _stand_in_collectives(proto.graph)
    return proto


def _stand_in_collectives(graph: onnx.GraphProto) -> None:
    """Replace collectives by shape-equivalent standard ops so shape inference can see through them."""
    for node in graph.node:
        if node.op_type not in ("AllReduce", "AllGather") or node.domain != "com.microsoft":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        del node.attribute[:]
        node.domain = ""
        if node.op_type == "AllGather":
            inputs = [node.input[0]] * max(int(attrs.get("group_size", 1)), 1)
            del node.input[:]
            node.input.extend(inputs)
            node.op_type = "Concat"
            node.attribute.append(onnx.helper.make_attribute("axis", int(attrs.get("axis", 0))))
        else:
            del node.input[1:]
            node.op_type = "Identity"


def _collect(proto: onnx.ModelProto | None) -> dict[str, onnx.ValueInfoProto]:
    if proto is None:
        return {}
    return {vi.name: vi for vi in list(proto.graph.value_info) + list(proto.graph.output)}


def _concreteness(vi: onnx.ValueInfoProto | None) -> int:
    """2: every dim an int, 1: rank known, 0: nothing useful."""
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return 0
    dims = vi.type.tensor_type.shape.dim
    return 2 if all(d.HasField("dim_value") for d in dims) else 1


def _run_inference(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    ort_result = onnx_result = None
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        ort_result = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)
    except Exception:  # noqa: BLE001 - ORT's inference raises on ops it does not know; ONNX's answers below
        ort_result = None
    ort = _collect(ort_result)
    if ort and all(_concreteness(ort.get(o)) == 2 for n in proto.graph.node for o in n.output if o):
        return ort
    try:
        onnx_result = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - an op ONNX cannot check: keep what ORT found
        onnx_result = None
    merged = dict(ort)
    for name, vi in _collect(onnx_result).items():
        if _concreteness(vi) > _concreteness(merged.get(name)):
            merged[name] = vi
    return merged


def infer_shapes(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Infer the type and shape of every value of ``model`` in place, reading no weights.

    With ``input_shapes`` the graph inputs get those shapes and every other shape is re-inferred from
    them (the exporter's symbolic shapes are replaced by numbers). Without, only values that lack a type
    or shape are filled in and existing ones are kept.
    """
    graph = model.graph
    rebind = input_shapes is not None
    if rebind:
        for value in graph.inputs:
            if value.name in input_shapes:
                value.meta.setdefault(_DECLARED, value.shape)
                value.shape = ir.Shape([int(d) for d in input_shapes[value.name]])
        for node in graph:
            for out in node.outputs:
                out.shape = None
    inferred = _run_inference(_shape_only_proto(model))
    for node in graph:
        for value in node.outputs:
            vi = inferred.get(value.name)
            if vi is None or (not rebind and value.type is not None and value.shape is not None):
                continue
            new = ir.serde.deserialize_value_info_proto(vi, None)
            if value.type is None:
                value.type = new.type
            if value.shape is None or rebind:
                value.shape = new.shape
