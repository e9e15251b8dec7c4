"""Clean-up of an exported graph: [in, out] weight initializers named like torch parameters, lean metadata, config metadata."""

from __future__ import annotations

import ast
import json
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

CONFIG_METADATA_KEY = "maia_onnx.config"
SOURCE_METADATA_KEY = "maia_onnx.source"

# node metadata the exporter attaches that is only debugging noise downstream (stack traces are large)
_DROP_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")



def _name_scope_module(node: ir.Node) -> str | None:
    """The torch module path ('model.layers.0.self_attn.q_proj') a node came from, if the exporter recorded it."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    # last entry is the aten op name ('linear_3'), the one before it the owning module
    return parts[-2] if len(parts) >= 2 and parts[-2] else None


def _transposed_lazy(tensor: ir.TensorProtocol, name: str) -> ir.LazyTensor:
    """W^T computed only when serialized, so a multi-GB model never holds a second full copy of its weights."""
    shape = ir.Shape([tensor.shape[1], tensor.shape[0]])

    def compute():
        return ir.Tensor(np.ascontiguousarray(tensor.numpy().T), name=name)

    return ir.LazyTensor(compute, dtype=tensor.dtype, shape=shape, name=name, cache=False)


def fold_weight_transposes(model: ir.Model) -> int:
    """Transpose(perm=[1,0]) of a 2-D initializer feeding MatMul/Gemm -> one [in, out] initializer.

    The folded weight takes the torch parameter's name (``...q_proj.weight``) so TP and scale import can
    map names; when the original is also used elsewhere (tied embeddings) it is named after the module.
    """
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or src.name not in graph.initializers or src.const_value is None:
            continue
        perm = node.attributes.get("perm")
        if len(src.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        out = node.outputs[0]
        consumers = [use.node for use in out.uses()]
        if not consumers or any(c.op_type not in ("MatMul", "Gemm") for c in consumers):
            continue
        other_users = [use.node for use in src.uses() if use.node is not node]
        if other_users:
            module = _name_scope_module(consumers[0]) or _name_scope_module(node)
            new_name = f"{module}.weight" if module else f"{src.name}.transposed"
            if new_name == src.name:
                # a tied parameter exported under the head's name: the shared original takes its other
                # user's (the embedding's) module name, so the MatMul weight can be lm_head.weight
                other = _name_scope_module(other_users[0])
                if other and f"{other}.weight" not in graph.initializers:
                    graph.initializers.pop(src.name)
                    src.name = f"{other}.weight"
                    graph.register_initializer(src)
            if new_name in graph.initializers:
                new_name = f"{src.name}.transposed"
        else:
            new_name = src.name
        tensor = src.const_value
        new_value = ir.Value(name=new_name, shape=ir.Shape([src.shape[1], src.shape[0]]), type=src.type)
        new_value.const_value = _transposed_lazy(tensor, new_name)
        out.replace_all_uses_with(new_value)
        graph.remove(node, safe=True)
        if not other_users:
            graph.initializers.pop(src.name)
            src.const_value = None  # the lazy transpose holds the data now; nothing else should
        graph.register_initializer(new_value)
        folded += 1
    return folded


def _initializer_weighted(graph: ir.Graph, op_types: tuple[str, ...]):
    """(node, weight) for each node of ``op_types`` whose second input (the weight) is an initializer of ``graph``."""
    for node in graph:
        if node.op_type not in op_types or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or weight.name not in graph.initializers:
            continue
        yield node, weight


def untranspose_gemm_weights(model: ir.Model) -> int:
    """Gemm(transB=1) on an initializer -> Gemm(transB=0) on its [in, out] transpose: one weight layout everywhere."""
    changed = 0
    for node, weight in _initializer_weighted(model.graph, ("Gemm",)):
        trans_b = node.attributes.get("transB")
        if trans_b is None or trans_b.as_int() != 1:
            continue
        if weight.const_value is None or len(weight.shape) != 2 or len(list(weight.uses())) != 1:
            continue
        old = weight.const_value
        weight.const_value = _transposed_lazy(old, weight.name)
        weight.shape = ir.Shape([old.shape[1], old.shape[0]])
        node.attributes["transB"] = ir.AttrInt64("transB", 0)
        changed += 1
    return changed


def rename_linear_weights(model: ir.Model) -> int:
    """Give MatMul/Gemm weights the optimizer folded into anonymous constants their module's name."""
    graph = model.graph
    renamed = 0
    for node, weight in _initializer_weighted(graph, ("MatMul", "Gemm")):
        if not (weight.name.startswith("val_") or weight.name.startswith("_val")):
            continue
        module = _name_scope_module(node)
        if not module:
            continue
        new_name = f"{module}.weight"
        if new_name in graph.initializers:
            continue
        graph.initializers.pop(weight.name)
        weight.name = new_name
        graph.register_initializer(weight)
        renamed += 1
    return renamed


def strip_initializer_prefix(model: ir.Model, prefix: str) -> int:
    """'model.transformer.h.0...' -> 'transformer.h.0...': drop a wrapper module's prefix so names match the checkpoint."""
    graph = model.graph
    renamed = 0
    for name in list(graph.initializers):
        if name.startswith(prefix) and name[len(prefix):] and name[len(prefix):] not in graph.initializers:
            value = graph.initializers.pop(name)
            value.name = name[len(prefix):]
            graph.register_initializer(value)
            renamed += 1
    return renamed


def clean_exported_model(model: ir.Model, config: Mapping[str, Any] | None = None, source: str | None = None,
                         param_prefix: str = "") -> ir.Model:
    """Downstream-friendly graph: [in, out] weight initializers named like parameters, lean node metadata."""
    fold_weight_transposes(model)
    untranspose_gemm_weights(model)
    rename_linear_weights(model)
    if param_prefix:
        strip_initializer_prefix(model, param_prefix)
    normalize_symbolic_dims(model)
    for node in model.graph:
        for key in _DROP_NODE_METADATA:
            node.metadata_props.pop(key, None)
    if config is not None:
        model.metadata_props[CONFIG_METADATA_KEY] = json.dumps(dict(config), sort_keys=True, default=str)
    if source is not None:
        model.metadata_props[SOURCE_METADATA_KEY] = source
    model.producer_name = "maia-onnx"
    return model


def normalize_symbolic_dims(model: ir.Model) -> None:
    """'seq + past' and 'past + seq' are the same dim: write sums with sorted terms so outputs agree."""
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.shape is None:
            continue
        dims = []
        changed = False
        for d in value.shape:
            text = None if isinstance(d, int) else str(d)
            if text and "+" in text and all(t.strip().isidentifier() for t in text.split("+")):
                new = " + ".join(sorted(t.strip() for t in text.split("+")))
                changed |= new != text
                dims.append(new)
            else:
                dims.append(d if isinstance(d, int) else (text if text is not None else None))
        if changed:
            value.shape = ir.Shape(dims)


def read_config(model: ir.Model) -> dict:
    """The ``maia_onnx.config`` metadata (num_layers, num_heads, ...) of an exported model, or {}."""
    text = model.metadata_props.get(CONFIG_METADATA_KEY)
    return json.loads(text) if text else {}


def _symbolic_shape(value: ir.Value) -> list:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else str(d) for d in value.shape]


