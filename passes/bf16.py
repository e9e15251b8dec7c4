"""BF16 baseline pass: float32 weights stored as real bfloat16 initializers, activations rounded to bfloat16.

ORT's CPU provider has no bfloat16 MatMul/Conv, so the compute stays float32 and bfloat16 is applied at the
boundaries: each converted weight feeds ``Cast(to=FLOAT)``, and each activation entering a MatMul / Gemm /
Conv / ConvTranspose (attention matmuls included) goes through ``Cast(to=BFLOAT16) -> Cast(to=FLOAT)``
(round-to-nearest-even).  The result runs anywhere and measures exactly the BF16 rounding error, the
non-FP8 baseline.  Scalar initializers (epsilons, constants) stay float32.

``nodes`` restricts the pass to the named nodes (mixed precision keeps its chosen layers in BF16 this way);
``call`` returns a ``Bf16PassResult`` naming the weights it converted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Iterable, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from maia_onnx.passes.quantize_fp8 import DEFAULT_OP_TYPES, _matches, _unique_name, _unique_node, find_targets


@dataclass
class Bf16PassResult(onnx_ir.passes.PassResult):
    converted_weights: list[str] = field(default_factory=list)  # float32 initializers now stored as bfloat16


def to_bfloat16(x: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """float32 -> bfloat16 with round-to-nearest-even, streamed in chunks (memory-mapped inputs stay mapped)."""
    x = np.asarray(x)
    out = np.empty(x.shape, dtype=ml_dtypes.bfloat16)
    flat_in = x.reshape(-1)
    flat_out = out.reshape(-1)
    for i in range(0, flat_in.size, chunk):
        flat_out[i : i + chunk] = np.asarray(flat_in[i : i + chunk], dtype=np.float32).astype(ml_dtypes.bfloat16)
    return out


class Bf16Pass(onnx_ir.passes.InPlacePass):
    """Store float32 weights as bfloat16 and round activations entering matmul/conv ops to bfloat16.

    Args:
        op_types: ops whose activation inputs are rounded to bfloat16.
        exclude: fnmatch patterns on node name or op type to leave in float32.
        activations: round activations too (False: weight-only bfloat16).
        nodes: node names to convert (None: every node not excluded).
    """

    def __init__(self, op_types: Iterable[str] = DEFAULT_OP_TYPES, exclude: Sequence[str] = (), activations: bool = True,
                 nodes: Collection[str] | None = None):
        super().__init__()
        self.op_types = tuple(op_types)
        self.exclude = tuple(exclude)
        self.activations = activations
        self.nodes = frozenset(nodes) if nodes is not None else None

    def call(self, model: ir.Model) -> Bf16PassResult:
        graph = model.graph
        modified = False
        converted: list[str] = []
        targets = [t for t in find_targets(model, self.op_types, self.exclude, attention=True) if self._in_scope(t.node)]
        excluded_nodes = {id(n) for n in graph if not self._in_scope(n) or _excluded(n, self.exclude)}
        # 1. weights: every float32 initializer with > 1 element used only by non-excluded nodes
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size <= 1:
                continue
            uses = value.uses()
            if not uses or value.is_graph_output() or value.is_graph_input():
                continue
            if any(id(node) in excluded_nodes or node.graph is not graph for node, _ in uses):
                continue
            self._convert_weight(graph, value, uses)
            converted.append(value.name)
            modified = True
        # 2. activations entering the target ops
        if self.activations:
            rounded: dict[str, ir.Value] = {}
            for target in targets:
                node = target.node
                for i in target.activation_inputs:
                    value = node.inputs[i]
                    if value is None or value.dtype not in (ir.DataType.FLOAT, None):
                        continue
                    if value.producer() is not None and value.producer().op_type == "Cast" and value.name.endswith("_bf16_float"):
                        continue
                    if value.name not in rounded:
                        down = ir.node("Cast", [value], attributes={"to": ir.DataType.BFLOAT16}, name=_unique_node(graph, f"{value.name}_to_bf16"))
                        down.outputs[0].name = _unique_name(graph, f"{value.name}_bf16")
                        down.outputs[0].type = ir.TensorType(ir.DataType.BFLOAT16)
                        down.outputs[0].shape = value.shape
                        up = ir.node("Cast", [down.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=_unique_node(graph, f"{value.name}_from_bf16"))
                        up.outputs[0].name = _unique_name(graph, f"{value.name}_bf16_float")
                        up.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
                        up.outputs[0].shape = value.shape
                        graph.insert_before(node, [down, up])
                        rounded[value.name] = up.outputs[0]
                    node.replace_input_with(i, rounded[value.name])
                    modified = True
        graph.meta.pop("maia_value_names", None)
        graph.meta.pop("maia_node_names", None)
        return Bf16PassResult(model, modified, converted)

    def _in_scope(self, node: ir.Node) -> bool:
        return self.nodes is None or (node.name or "") in self.nodes

    def _convert_weight(self, graph: ir.Graph, value: ir.Value, uses) -> None:
        tensor = value.const_value
        name = _unique_name(graph, f"{value.name}_bf16")
        if isinstance(tensor, ir.ExternalTensor):
            source = tensor

            def produce(source=source, name=name):
                data = to_bfloat16(source.numpy())
                try:
                    source.release()
                except BufferError:
                    pass
                return ir.Tensor(data, dtype=ir.DataType.BFLOAT16, name=name)

            bf16_tensor = ir.LazyTensor(produce, dtype=ir.DataType.BFLOAT16, shape=ir.Shape(list(tensor.shape)), name=name)
        else:
            bf16_tensor = ir.Tensor(to_bfloat16(tensor.numpy()), dtype=ir.DataType.BFLOAT16, name=name)
        bf16_value = ir.Value(name=name, type=ir.TensorType(ir.DataType.BFLOAT16), shape=ir.Shape(list(tensor.shape)), const_value=bf16_tensor)
        graph.register_initializer(bf16_value)
        cast = ir.node("Cast", [bf16_value], attributes={"to": ir.DataType.FLOAT}, name=_unique_node(graph, f"{value.name}_Cast"))
        cast.outputs[0].name = _unique_name(graph, f"{value.name}_float")
        cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        cast.outputs[0].shape = ir.Shape(list(tensor.shape))
        first_user = min((node for node, _ in uses), key=_position(graph))
        graph.insert_before(first_user, [cast])
        value.replace_all_uses_with(cast.outputs[0])
        graph.initializers.pop(value.name, None)


def _excluded(node: ir.Node, patterns: Sequence[str]) -> bool:
    return bool(patterns) and _matches(node, patterns)


def _position(graph: ir.Graph):
    order = {id(n): i for i, n in enumerate(graph)}
    return lambda node: order.get(id(node), 1 << 60)
