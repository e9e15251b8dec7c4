"""UnpackWeightsPass: replace each packed weight's decode subgraph (4-bit, mx9/mx6 storage; ``maia.packed``
initializers) by one float initializer holding exactly the decoded values, so graph rewrites that slice weights
(tensor parallelism) see a plain weight.

The decode subgraphs are evaluated once, in ONNX Runtime (the ORT form is built to decode bit-exactly there) or,
where ORT has no kernel (the standard FLOAT4E2M1 form), in ``onnx.reference``.  The cost is storage: unpacked
weights take 4 bytes a value; the result records how many bytes that adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator

from maia_onnx.passes.packed_weights import PACKED_KEY


@dataclass
class UnpackResult(ir.passes.PassResult):
    """``weights``: decoded weight value names; ``packed_bytes`` -> ``unpacked_bytes`` of their storage."""

    weights: list[str] = field(default_factory=list)
    packed_bytes: int = 0
    unpacked_bytes: int = 0


def _is_packed(value: ir.Value) -> bool:
    return value.const_value is not None and PACKED_KEY in value.metadata_props


def _evaluate(nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value], opsets: dict) -> list[np.ndarray]:
    """Outputs of a constant subgraph: ORT first, onnx.reference where ORT lacks a kernel (FLOAT4E2M1)."""
    graph = ir.Graph([], [], nodes=[], initializers=[], opset_imports=opsets, name="decode")
    clones = {}
    for value in inputs:
        clone = ir.Value(name=value.name, type=value.type, shape=value.shape, const_value=value.const_value)
        graph.register_initializer(clone)
        clones[id(value)] = clone
    for node in nodes:
        copied = ir.Node(node.domain, node.op_type, [clones.get(id(v), v) if v is not None else None for v in node.inputs],
                         attributes=list(node.attributes.values()), num_outputs=len(node.outputs), name=node.name,
                         version=node.version)
        for out, new in zip(node.outputs, copied.outputs):
            new.name, new.type, new.shape = out.name, out.type, out.shape
            clones[id(out)] = new
        graph.append(copied)
    graph.outputs.extend(clones[id(v)] for v in outputs)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run([v.name for v in outputs], {})
    except Exception:  # noqa: BLE001 - a kernel ORT lacks: the reference evaluator runs every standard op
        return ReferenceEvaluator(onnx.shape_inference.infer_shapes(proto)).run(None, {})


class UnpackWeightsPass(ir.passes.InPlacePass):
    """Packed weight decode subgraphs -> float initializers with the decoded values (bit for bit)."""

    def call(self, model: ir.Model) -> UnpackResult:
        graph = model.graph
        constant: set[int] = {id(v) for v in graph.initializers.values() if v.const_value is not None}
        tainted: set[int] = {id(v) for v in graph.initializers.values() if _is_packed(v)}  # computed from packed data
        decoding: list[ir.Node] = []
        for node in graph:
            ins = [v for v in node.inputs if v is not None]
            if ins and all(id(v) in constant for v in ins):
                constant.update(id(out) for out in node.outputs)
                if any(id(v) in tainted for v in ins):
                    tainted.update(id(out) for out in node.outputs)
                    decoding.append(node)
        # the decode cone: tainted nodes plus the constant nodes they read from (e.g. scale-table lookups)
        members: dict[int, ir.Node] = {}
        stack = list(decoding)
        while stack:
            node = stack.pop()
            if id(node) in members:
                continue
            members[id(node)] = node
            stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
        cone = [n for n in graph if id(n) in members]
        if not cone:
            return UnpackResult(model, modified=False)
        in_cone = {id(n) for n in cone}
        frontier = [out for n in cone for out in n.outputs
                    if out in graph.outputs or any(id(u.node) not in in_cone for u in out.uses())]
        leaves = {id(v): v for n in cone for v in n.inputs if v is not None and v.producer() is None}
        values = _evaluate(cone, list(leaves.values()), frontier, dict(model.opset_imports))
        result = UnpackResult(model, modified=True)
        result.packed_bytes = sum(v.const_value.nbytes for v in leaves.values() if _is_packed(v))
        for value, array in zip(frontier, values):
            array = np.asarray(array)
            name = value.name
            value.name = f"{name}__packed"
            weight = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT if array.dtype == np.float32 else value.dtype),
                              shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
            graph.register_initializer(weight)
            value.replace_all_uses_with(weight)
            result.weights.append(name)
            result.unpacked_bytes += array.nbytes
        for node in reversed(cone):
            graph.remove(node, safe=True)
        for value in leaves.values():
            if not value.uses() and value.name in graph.initializers and value not in graph.inputs:
                del graph.initializers[value.name]
        return result
