"""Quantization scales by layer name: find weight layers in an ONNX graph, import / export vLLM & ModelOpt scale files.

Checkpoint naming (vLLM / NVIDIA ModelOpt FP8 checkpoints): for a linear layer ``<layer>`` (e.g.
``model.layers.0.self_attn.q_proj``) the scales are ``<layer>.weight_scale`` (per-tensor scalar or
per-output-channel vector), ``<layer>.input_scale`` (per-tensor activation scale) and, on the attention
module, ``<layer>.k_scale`` / ``<layer>.v_scale`` (KV-cache scales; vLLM also accepts them on
``<attn>.k_proj.k_scale`` / ``.attn.k_scale``).  Scales are the dequantisation multipliers
(``real = fp8 * scale``), float32.

ONNX side: the torch dynamo exporter names a folded weight ``val_N`` but records its source in the
initializer metadata ``pkg.onnxscript.optimizer.folded_from`` (``['layers.0.q_proj.weight']``) and the
module path of every node in ``pkg.torch.onnx.name_scopes``; we use those, then the initializer name,
then the node name, to give every MatMul/Gemm/Conv weight its checkpoint layer name.

API used by the quantize front end:
- ``load_scales(path) -> dict[str, np.ndarray]`` (JSON or .safetensors by extension)
- ``map_scales(model, scales) -> (ScaleMap, unmatched_names)``: per-node weight / input scales and per-layer
  k/v scales (``ScaleMap.kv``: decoder layer index -> {"k": scale, "v": scale})
- ``emit_scales(quantized_model) -> dict`` (same naming) and ``write_scales(path, dict)``
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx_ir as ir

from maia_onnx.errors import UserError
from maia_onnx.io import atomic_write

WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
SCALE_SUFFIXES = ("weight_scale", "input_scale", "k_scale", "v_scale")


@dataclass
class WeightTarget:
    """A weight-bearing node: the weight input index, its reduction axis, and its checkpoint layer name."""

    node: ir.Node
    input_index: int
    weight: ir.Value
    reduction_axis: int  # the axis summed over (MX blocks run along it)
    output_axis: int | None  # the per-output-channel axis (per-channel weight scales run along it)
    layer: str

    def excluded_by(self, patterns) -> bool:
        """Whether an fnmatch pattern (``--exclude``) names its layer, node or weight."""
        names = [n for n in (self.layer, self.node.name, self.weight.name) if n]
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)

    def linear_input(self) -> ir.Value | None:
        """The activation a 2-D linear (MatMul, or Gemm without transA) multiplies its ``[in, out]`` /
        ``[out, in]`` weight with, when that is a named value computed at run time (GPTQ's Hessians and the
        Hadamard rotation are about it); None for anything else."""
        node = self.node
        if len(self.weight.shape) != 2 or node.op_type not in ("MatMul", "Gemm"):
            return None
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return None
        x = node.inputs[0]
        return x if x is not None and x.const_value is None and x.name else None


def _literal_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _strip_param(name: str) -> str:
    """``x.q_proj.weight`` / ``x.q_proj.weight_fp8`` / ``x.q_proj.bias`` -> ``x.q_proj``."""
    return re.sub(r"\.(weight|bias)([_:].*)?$", "", name)


def layer_name(node: ir.Node, weight: ir.Value | None = None) -> str:
    """Checkpoint layer name (``model.layers.0.mlp.up_proj``-style) of a weight-bearing node."""
    if weight is not None:
        sources = _literal_list(weight.metadata_props.get("pkg.onnxscript.optimizer.folded_from"))
        params = [s for s in sources if s.endswith(".weight")]
        if params:
            return _strip_param(params[0])
        if weight.name and not re.match(r"_?val_\d+", weight.name) and ".weight" in weight.name:
            return _strip_param(weight.name)
    # name_scopes = module path entries, then the op's own fx name ("linear_3"): drop that last one
    scopes = _literal_list(node.metadata_props.get("pkg.torch.onnx.name_scopes"))[:-1]
    modules = [s for s in scopes if s]
    if modules:
        return modules[-1]
    if weight is not None and weight.name:
        return _strip_param(weight.name)
    return node.name or ""


NOT_A_WEIGHT_KEY = "maia.not_a_weight"  # metadata on constants a pass added that are no layer's weight (rotations)


def _const_float(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.is_initializer()
        and value.const_value is not None
        and value.dtype in FLOAT_TYPES
        and not value.is_graph_input()
        and NOT_A_WEIGHT_KEY not in value.metadata_props
    )


def weight_targets(graph: ir.Graph, op_types=WEIGHT_OPS) -> Iterator[WeightTarget]:
    """Every MatMul/Gemm/Conv (top-level graph) whose weight is a float initializer."""
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
            continue
        if node.op_type == "MatMul":
            w = node.inputs[1] if len(node.inputs) > 1 else None
            if not _const_float(w) or len(w.shape) < 2:
                continue
            rank = len(w.shape)
            yield WeightTarget(node, 1, w, rank - 2, rank - 1, layer_name(node, w))
        elif node.op_type == "Gemm":
            w = node.inputs[1] if len(node.inputs) > 1 else None
            if not _const_float(w) or len(w.shape) != 2:
                continue
            trans_b = node.attributes.get_int("transB", 0)
            yield WeightTarget(node, 1, w, 1 if trans_b else 0, 0 if trans_b else 1, layer_name(node, w))
        elif node.op_type == "Conv":
            w = node.inputs[1] if len(node.inputs) > 1 else None
            if not _const_float(w) or len(w.shape) < 3:
                continue
            yield WeightTarget(node, 1, w, 1, 0, layer_name(node, w))


# --------------------------------------------------------------------------------------------------
# Scale files
# --------------------------------------------------------------------------------------------------
def as_scale_array(name: str, value, source: Path) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise UserError(f"scale {name!r} in {source} is not a number or list of numbers: fix the file") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise UserError(f"scale {name!r} in {source} must be finite and > 0 (got {arr.ravel()[:4].tolist()}): fix the file")
    return arr


def _is_scale_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in SCALE_SUFFIXES or name.endswith(".kv_scale")


def load_scales(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``<layer>.{weight,input,k,v}_scale`` entries from a JSON or safetensors file (float32 arrays).

    JSON: a flat object ``{"model.layers.0.self_attn.q_proj.weight_scale": 0.0123, ...}`` (lists for
    per-channel scales) or the same under a top-level ``"scales"`` key.  Safetensors: every tensor whose
    name ends in a scale suffix; other tensors (an FP8 checkpoint's weights) are never read.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scales file not found: {path} (pass an existing .json or .safetensors file to --scales)")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"scales file {path} is not valid JSON ({exc}): fix or regenerate it") from None
        if isinstance(data, dict) and isinstance(data.get("scales"), dict):
            data = data["scales"]
        if not isinstance(data, dict):
            raise UserError(f"scales file {path} must hold a JSON object of name -> scale")
        out = {str(k): as_scale_array(str(k), v, path) for k, v in data.items() if _is_scale_name(str(k))}
    elif suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        out = {}
        try:
            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    if _is_scale_name(key):
                        out[key] = as_scale_array(key, f.get_tensor(key).astype(np.float32), path)
        except SafetensorError as exc:
            raise UserError(f"cannot read {path} as safetensors ({exc}): is it truncated?") from None
        except TypeError:
            # float8 / bf16 tensors numpy cannot represent: fall back to torch, scales only
            import torch
            from safetensors.torch import safe_open as torch_open

            out = {}
            with torch_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if _is_scale_name(key):
                        out[key] = as_scale_array(key, f.get_tensor(key).to(torch.float32).numpy(), path)
    else:
        raise UserError(f"scales file {path} must end in .json or .safetensors")
    if not out:
        raise UserError(
            f"no scales found in {path}: expected names ending in .weight_scale, .input_scale, .k_scale or .v_scale"
        )
    return out


def write_scales(path: str | Path, scales: Mapping[str, np.ndarray | float]) -> Path:
    """Write scales atomically as JSON (numbers / lists) or safetensors (float32 tensors) by extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    arrays = {k: np.array(v, dtype=np.float32, order="C") for k, v in sorted(scales.items())}  # keeps 0-d scalars 0-d
    if suffix == ".json":
        text = json.dumps({k: (float(a) if a.ndim == 0 else a.tolist()) for k, a in arrays.items()}, indent=1, sort_keys=True)
        with atomic_write(path, "w") as f:
            f.write(text + "\n")
    elif suffix == ".safetensors":
        from safetensors.numpy import save

        blob = save(arrays, metadata={"format": "pt", "producer": "maia-onnx"})
        with atomic_write(path, "wb") as f:
            f.write(blob)
    else:
        raise UserError(f"--emit-scales file {path} must end in .json or .safetensors")
    return path


# --------------------------------------------------------------------------------------------------
# Mapping checkpoint names onto the graph
# --------------------------------------------------------------------------------------------------
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def decoder_layer_index(name: str) -> int | None:
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


@dataclass
class ScaleMap:
    """Scales placed onto the graph, in the shapes the quantization passes take.

    ``weight_scales``: weight initializer name -> scale (scalar, or 1-D per output channel);
    ``activation_scales``: activation value name -> per-tensor scale (max over layers sharing the input);
    ``input_scales``: consuming node name -> its own checkpoint input_scale (before the max above);
    ``kv``: decoder layer index -> {"k": scale, "v": scale} (scalar or per-KV-head vector);
    ``matched``: checkpoint name -> ONNX name it landed on.
    """

    weight_scales: dict[str, np.ndarray] = field(default_factory=dict)
    activation_scales: dict[str, float] = field(default_factory=dict)
    input_scales: dict[str, float] = field(default_factory=dict)
    kv: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    matched: dict[str, str] = field(default_factory=dict)


def _resolve(layer: str, known: Mapping[str, WeightTarget]) -> WeightTarget | None:
    """Exact layer name, else the unique graph layer that one is a dotted suffix of the other."""
    if layer in known:
        return known[layer]
    hits = [t for name, t in known.items() if name.endswith("." + layer) or layer.endswith("." + name)]
    return hits[0] if len(hits) == 1 else None


def map_scales(model: ir.Model, scales: Mapping[str, np.ndarray]) -> tuple[ScaleMap, list[str]]:
    """Place checkpoint scales onto graph weights, activations and KV-cache layers; return (map, unmatched names)."""
    known: dict[str, WeightTarget] = {}
    for t in weight_targets(model.graph):
        known.setdefault(t.layer, t)
    kv_inputs = {v.name for v in model.graph.inputs if v.name.startswith("past_key_values.")}
    result = ScaleMap()
    unmatched: list[str] = []
    for name, value in sorted(scales.items()):
        arr = np.asarray(value, dtype=np.float32)
        layer, _, kind = name.rpartition(".")
        if kind in ("k_scale", "v_scale", "kv_scale"):
            idx = decoder_layer_index(name)
            key_input = f"past_key_values.{idx}.key"
            if idx is None or key_input not in kv_inputs:
                unmatched.append(name)
                continue
            slots = ("k", "v") if kind == "kv_scale" else (kind[0],)
            for slot in slots:
                result.kv.setdefault(idx, {})[slot] = arr.reshape(-1) if arr.size > 1 else arr.reshape(())
            result.matched[name] = f"past_key_values.{idx}" if kind == "kv_scale" else f"past_key_values.{idx}.{'key' if kind == 'k_scale' else 'value'}"
            continue
        target = _resolve(layer, known)
        if target is None:
            unmatched.append(name)
            continue
        if kind == "weight_scale":
            result.weight_scales[target.weight.name] = arr.reshape(-1) if arr.size > 1 else arr.reshape(())
            result.matched[name] = target.weight.name
        else:  # input_scale: per-tensor
            x = target.node.inputs[0]
            if x is None or not x.name:
                unmatched.append(name)
                continue
            s = float(arr.max())
            result.activation_scales[x.name] = max(s, result.activation_scales.get(x.name, 0.0))
            if target.node.name:
                result.input_scales[target.node.name] = s
            result.matched[name] = x.name
    return result, unmatched


# --------------------------------------------------------------------------------------------------
# Emitting scales from a quantized model
# --------------------------------------------------------------------------------------------------
def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        if value is not None and value.producer() is not None and value.producer().op_type == "Constant":
            attr = value.producer().attributes.get("value")
            return None if attr is None else np.asarray(attr.as_tensor().numpy())
        return None
    return np.asarray(value.const_value.numpy())


def _scale_float(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float32)  # E8M0 (ml_dtypes float8_e8m0fnu) converts to its power of two


# elementwise clamps QuantizeFp8Pass places between an activation's DequantizeLinear and the layer
# (Q -> DQ -> Relu/Clip -> MatMul: stock ORT's ReluQuantFusion would otherwise drop the Relu)
CLAMP_OPS = ("Relu", "Clip")


def _dq_of(value: ir.Value | None, through: tuple[str, ...] = ()) -> ir.Node | None:
    """The DequantizeLinear producing ``value``, looking through one node of ``through`` (on its first input)."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type in through and node.domain in ("", "ai.onnx") and node.inputs:
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def emit_scales(model: ir.Model) -> dict[str, np.ndarray]:
    """Scales of a quantized model under checkpoint names (the inverse of :func:`map_scales`).

    Weights read through ``DequantizeLinear(const, const_scale)`` give ``<layer>.weight_scale``
    (per-tensor scalar or per-output-channel vector; blocked scales in torch ``[out, in/block]``
    layout); activations through a static ``QuantizeLinear -> DequantizeLinear`` (optionally followed by one
    Relu/Clip) give ``<layer>.input_scale``; an FP8 KV cache (``past_key_values.{i}.key/value`` read by
    DequantizeLinear) gives ``<attn>.k_scale`` / ``<attn>.v_scale``.
    """
    graph = model.graph
    out: dict[str, np.ndarray] = {}
    attn_of_layer: dict[int, str] = {}
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        dq = _dq_of(node.inputs[1])
        if dq is None or dq.inputs[0] is None or dq.inputs[0].const_value is None:
            continue
        scale = _const_array(dq.inputs[1])
        if scale is None:
            continue
        layer = layer_name(node, dq.inputs[0])
        scale = _scale_float(scale)
        block = dq.attributes.get_int("block_size", 0)
        if block and node.op_type == "MatMul" and scale.ndim == 2:
            scale = scale.T  # ONNX [in/block, out] -> torch [out, in/block]
        out[f"{layer}.weight_scale"] = scale
        idx = decoder_layer_index(layer)
        if idx is not None and layer.endswith(("k_proj", "v_proj", "q_proj")):
            attn_of_layer.setdefault(idx, layer.rsplit(".", 1)[0])
        act_dq = _dq_of(node.inputs[0], through=CLAMP_OPS)
        q = act_dq.inputs[0].producer() if act_dq is not None and act_dq.inputs[0] is not None else None
        if q is not None and q.op_type == "QuantizeLinear":
            s = _const_array(q.inputs[1])
            if s is not None and s.size == 1:
                out[f"{layer}.input_scale"] = _scale_float(s).reshape(())
    for value in graph.inputs:
        m = re.fullmatch(r"past_key_values\.(\d+)\.(key|value)", value.name or "")
        if not m:
            continue
        for use in value.uses():
            if use.node.op_type == "DequantizeLinear" and use.idx == 0:
                s = _const_array(use.node.inputs[1])
                if s is None:
                    continue
                idx = int(m.group(1))
                attn = attn_of_layer.get(idx, f"model.layers.{idx}.self_attn")
                out[f"{attn}.{'k' if m.group(2) == 'key' else 'v'}_scale"] = _scale_float(s).reshape(-1) if s.size > 1 else _scale_float(s).reshape(())
                break
    return out
