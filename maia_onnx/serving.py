"""Serving checkpoints from FP8 ONNX models: a Hugging Face directory in the compressed-tensors FP8 format that
vLLM and SGLang load (``--emit-checkpoint DIR``), and the scales of such a checkpoint read back (``--scales``).

The quantized ONNX model keeps Hugging Face parameter names (``<name>_quantized`` FP8 weights with
``<name>_scale``), so each linear maps back to its module: ``weight`` (FP8, ``[out, in]``), ``weight_scale``
(``[out, 1]`` per channel or ``[1]`` per tensor), ``input_scale`` (the static FP8 scale of the activation feeding
it) and, with an FP8 KV cache, ``k_scale`` / ``v_scale`` on each attention module.  Everything else is copied from
the ONNX model (oriented like the source checkpoint) or, where the export folded it away, from the source
checkpoint itself.  One tensor is in memory at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx_ir as ir

from maia_onnx.data import checkpoint_dir
from maia_onnx.errors import UnsupportedModelError, UserError
from maia_onnx.io import atomic_dir
from maia_onnx.partition.checkpoint import read_safetensors, read_safetensors_header, write_safetensors

_FP8 = {ir.DataType.FLOAT8E4M3FN: "e4m3", ir.DataType.FLOAT8E5M2: "e5m2"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt", "tokenizer.model", "generation_config.json", "added_tokens.json")


@dataclass
class LinearScales:
    """One quantized linear: its FP8 weight, per-channel/per-tensor scale and the static input scale, if any."""

    weight: ir.Value
    scale: np.ndarray
    input_scale: float | None


@dataclass
class FoundScales:
    linears: dict[str, LinearScales] = field(default_factory=dict)  # module name -> scales
    kv: dict[int, tuple[float, float]] = field(default_factory=dict)  # layer -> (k_scale, v_scale)
    fp8: str = "e4m3"


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _input_scale(matmul: ir.Node, weight_out: ir.Value) -> float | None:
    """The static scale of the FP8 activation a MatMul reads (its other input's DequantizeLinear), or None."""
    other = next((v for v in matmul.inputs if v is not None and v is not weight_out), None)
    dq = other.producer() if other is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    scale = _const(dq.inputs[1])
    return float(scale.reshape(-1)[0]) if scale is not None and scale.size == 1 else None


def find_scales(model: ir.Model) -> FoundScales:
    """Every FP8 linear weight (``X.weight_quantized`` -> module ``X``) and FP8 KV-cache scale in ``model``."""
    found = FoundScales()
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None or node.inputs[0].dtype not in _FP8:
            continue
        source = node.inputs[0]
        name = source.name or ""
        if source.const_value is None or not name.endswith(".weight_quantized"):
            continue
        if "block_size" in node.attributes:
            raise UnsupportedModelError(f"weight {name} is block-quantized: compressed-tensors FP8 checkpoints take "
                                        "per-channel or per-tensor weights (re-quantize with --weight-granularity channel)")
        found.fp8 = _FP8[source.dtype]
        consumers = [u.node for u in node.outputs[0].uses()]
        matmul = next((c for c in consumers if c.op_type in ("MatMul", "Gemm")), None)
        found.linears[name[: -len(".weight_quantized")]] = LinearScales(
            source, _const(node.inputs[1]).astype(np.float32),
            _input_scale(matmul, node.outputs[0]) if matmul is not None else None)
    for value in model.graph.outputs:
        match = re.fullmatch(r"present\.(\d+)\.(key|value)", value.name or "")
        producer = value.producer()
        if match and producer is not None and producer.op_type == "QuantizeLinear":
            layer, kind = int(match.group(1)), match.group(2)
            k, v = found.kv.get(layer, (1.0, 1.0))
            s = float(_const(producer.inputs[1]).reshape(-1)[0])
            found.kv[layer] = (s, v) if kind == "key" else (k, s)
    return found


def source_directory(model: ir.Model, explicit: str | os.PathLike | None = None) -> Path:
    path = checkpoint_dir(model, explicit, "--emit-checkpoint", "--tokenizer")  # the checkpoint holds the tokenizer too
    if not (path / "config.json").is_file():
        raise UserError(f"source checkpoint {path} has no config.json: pass the Hugging Face directory the model came from")
    return path


def _source_tensors(directory: Path) -> dict[str, tuple[Path, dict]]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"source checkpoint {directory} has no .safetensors files: re-save it with save_pretrained()")
    entries = {}
    for f in files:
        header, _, _ = read_safetensors_header(f)
        for name, entry in header.items():
            entries[name] = (f, entry)
    return entries


def _attention_module(names: list[str], layer: int) -> str | None:
    pattern = re.compile(rf"^(.*\.{layer}\.(?:self_attn|attention|attn))\.")
    return next((m.group(1) for n in names if (m := pattern.match(n))), None)


def _matmul_weight(value: ir.Value) -> bool:
    """True when ``value`` (directly or through its DequantizeLinear) is the right operand of a MatMul:
    stored ``[in, out]``, the transpose of a ``torch.nn.Linear`` weight."""
    for use in value.uses():
        node = use.node
        if node.op_type == "MatMul" and use.idx == 1:
            return True
        if node.op_type == "DequantizeLinear" and use.idx == 0 and _matmul_weight(node.outputs[0]):
            return True
    return False


def _oriented(value: ir.Value, shape: list[int]) -> np.ndarray:
    """The ONNX initializer in the source checkpoint's orientation (decided by how the graph uses it, not by shape)."""
    array = value.const_value.numpy()
    if array.ndim == 2 and _matmul_weight(value):
        array = np.ascontiguousarray(array.T)
    if list(array.shape) != list(shape):
        raise UnsupportedModelError(f"ONNX initializer {value.name} has shape {list(array.shape)} where the source "
                                    f"checkpoint has {shape}: emit from a model exported from that checkpoint")
    return array


def _scheme(strategy: str, fp8: str, dynamic: bool = False) -> dict:
    scheme = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": dynamic,
              "group_size": None, "block_structure": None, "observer": None if dynamic else "minmax"}
    if fp8 != "e4m3":
        raise UnsupportedModelError("compressed-tensors FP8 checkpoints hold E4M3 weights: quantize with --format fp8-e4m3")
    return scheme


def quantization_config(found: FoundScales, all_linears: list[str], activation_scheme: str) -> dict:
    strategies = {"channel" if s.scale.size > 1 else "tensor" for s in found.linears.values()}
    if len(strategies) > 1:
        raise UnsupportedModelError("the model mixes per-channel and per-tensor weights: use one --weight-granularity")
    static = [s.input_scale for s in found.linears.values()]
    if activation_scheme == "static" and any(s is None for s in static):
        missing = sorted(n for n, s in found.linears.items() if s.input_scale is None)
        raise UnsupportedModelError(f"{len(missing)} linears have no static input scale (e.g. {missing[0]}): "
                                    "quantize with activations, or emit with --activation-scheme dynamic|none")
    group = {"targets": ["Linear"], "weights": _scheme(strategies.pop(), found.fp8), "output_activations": None,
             "format": "float-quantized"}
    if activation_scheme == "static":
        group["input_activations"] = _scheme("tensor", found.fp8)
    elif activation_scheme == "dynamic":
        group["input_activations"] = _scheme("token", found.fp8, dynamic=True)
    else:
        group["input_activations"] = None
    config = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": sorted(set(all_linears) - set(found.linears)),
        "kv_cache_scheme": None,
    }
    if found.kv:
        config["kv_cache_scheme"] = {**_scheme("tensor", found.fp8), "observer": "minmax"}
    return config


def emit_checkpoint(model: ir.Model, out_dir: str | os.PathLike, source: str | os.PathLike | None = None,
                    activation_scheme: str = "static") -> dict:
    """Write ``out_dir`` (atomically): config.json with quantization_config, tokenizer files, model.safetensors."""
    if activation_scheme not in ("static", "dynamic", "none"):
        raise UserError(f"--activation-scheme {activation_scheme!r}: choose static, dynamic or none")
    found = find_scales(model)
    if not found.linears:
        raise UnsupportedModelError("the model has no FP8 linear weights: quantize it with --format fp8-e4m3 first")
    src = source_directory(model, source)
    entries = _source_tensors(src)
    source_arrays = {}
    for f in {f for f, _ in entries.values()}:
        source_arrays.update(read_safetensors(f))
    onnx_inits = model.graph.initializers
    linears = sorted(n[: -len(".weight")] for n, (_, e) in entries.items() if n.endswith(".weight") and len(e["shape"]) == 2
                     and not any(k in n for k in ("embed", "wte", "wpe", "norm")))
    config = quantization_config(found, linears, activation_scheme)

    def tensors() -> Iterator[tuple[str, ir.TensorProtocol]]:
        for name, (_, entry) in entries.items():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in found.linears:
                lin = found.linears[module]
                fp8 = _oriented(lin.weight, entry["shape"])
                yield name, ir.tensor(fp8, dtype=ir.DataType.FLOAT8E4M3FN, name=name)
                scale = lin.scale.reshape(-1, 1) if lin.scale.size > 1 else lin.scale.reshape(1)
                yield f"{module}.weight_scale", ir.tensor(scale.astype(np.float32), name=f"{module}.weight_scale")
                if activation_scheme == "static":
                    yield f"{module}.input_scale", ir.tensor(np.array([lin.input_scale], np.float32), name=f"{module}.input_scale")
                continue
            if name in onnx_inits and onnx_inits[name].const_value is not None:
                array = _oriented(onnx_inits[name], entry["shape"])
                yield name, ir.tensor(array, name=name)
            else:
                yield name, source_arrays[name]
        names = list(entries)
        for layer, (k, v) in sorted(found.kv.items()):
            attn = _attention_module(names, layer)
            if attn is None:
                raise UnsupportedModelError(f"cannot find the attention module of layer {layer} for its KV-cache scales")
            yield f"{attn}.k_scale", ir.tensor(np.array(k, np.float32), name=f"{attn}.k_scale")
            yield f"{attn}.v_scale", ir.tensor(np.array(v, np.float32), name=f"{attn}.v_scale")

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors(), metadata={"format": "pt"})
        hf_config = json.loads((src / "config.json").read_text())
        hf_config["quantization_config"] = config
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for f in _TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
    return {"path": str(out_dir), "linears": len(found.linears), "ignored": config["ignore"],
            "kv_cache_layers": len(found.kv), "activation_scheme": activation_scheme,
            "weight_strategy": config["config_groups"]["group_0"]["weights"]["strategy"]}


def read_checkpoint_scales(directory: str | os.PathLike) -> dict[str, float | np.ndarray]:
    """``weight_scale`` / ``input_scale`` / ``k_scale`` / ``v_scale`` tensors of a compressed-tensors checkpoint."""
    directory = Path(directory)
    scales: dict[str, float | np.ndarray] = {}
    for f in sorted(directory.glob("*.safetensors")):
        for name, tensor in read_safetensors(f).items():
            if name.endswith(("weight_scale", "input_scale", "k_scale", "v_scale")):
                arr = np.asarray(tensor.numpy(), dtype=np.float32)
                scales[name] = float(arr.reshape(-1)[0]) if arr.size == 1 else arr.reshape(-1)
    if not scales:
        raise UserError(f"{directory} holds no compressed-tensors scales (weight_scale / input_scale / k_scale)")
    return scales

