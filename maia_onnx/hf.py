"""Local Hugging Face checkpoints (hf:DIR): what the directory holds, and decoder LMs (dense or MoE) / text or image encoders -> ModelSpec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

from maia_onnx.errors import UnsupportedModelError, UserError
from maia_onnx.extras import require
from maia_onnx.models.registry import ModelSpec

# encoder-only families: exported without a KV cache
_ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "xlm-roberta", "deberta", "deberta-v2", "camembert", "mpnet"}


# what an hf:DIR holds, as detect_kind() reports it
DECODER, ENCODER, VISION, SEQ2SEQ, DIFFUSERS_PIPELINE, DIFFUSERS_COMPONENT = (
    "decoder", "encoder", "vision-encoder", "encoder-decoder", "diffusers-pipeline", "diffusers-component")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a JSON object: hf:DIR needs a saved checkpoint's config")
    return data


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise UserError(f"Hugging Face directory {path} does not exist: pass hf:DIR with a local checkpoint directory")
    if not path.is_dir():
        raise UserError(f"hf:{path} is not a directory: pass the checkpoint directory (config.json + weights)")


def _read_config(path: Path) -> dict:
    _check_dir(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"no config.json in {path}: hf:DIR must be a saved Hugging Face checkpoint (save_pretrained)")
    return _read_json(cfg_file)


def detect_kind(directory: str | Path) -> tuple[str, dict]:
    """(kind, config dict) of a local checkpoint directory, from its files alone (nothing is imported or loaded).

    model_index.json -> a diffusers pipeline; a config.json with ``_class_name`` -> one diffusers component; an
    ``is_encoder_decoder`` config -> encoder-decoder (T5, BART, Whisper); a causal-LM architecture -> decoder; a config
    with image geometry and no vocabulary -> image encoder (pixel_values); anything else -> text encoder.
    """
    path = Path(directory).expanduser()
    _check_dir(path)
    if (path / "model_index.json").is_file():
        return DIFFUSERS_PIPELINE, _read_json(path / "model_index.json")
    raw = _read_config(path)
    if "_class_name" in raw:
        return DIFFUSERS_COMPONENT, raw
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type", "")
    if raw.get("is_encoder_decoder") and model_type not in _ENCODER_TYPES:
        return SEQ2SEQ, raw
    if model_type not in _ENCODER_TYPES and (
        any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) or (not archs and raw.get("is_decoder"))
    ):
        return DECODER, raw
    if "vocab_size" not in raw and "image_size" in raw and "num_channels" in raw:
        return VISION, raw
    return ENCODER, raw


def load_pretrained(path: Path, auto_class: str, model_type: str = "?", **kwargs):
    """transformers ``Auto*.from_pretrained`` offline in FP32 with eager attention; MoE experts on the batched-matmul path.

    transformers 5 runs MoE experts through a grouped-matmul custom op the ONNX exporter cannot translate;
    "batched_mm" is plain bmm/index ops ("eager" loops over experts with data-dependent guards torch.export refuses).
    """
    import torch

    transformers = require("transformers", "export", "loading Hugging Face checkpoints")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    options = dict(local_files_only=True, dtype=torch.float32, attn_implementation="eager",
                   experts_implementation="batched_mm", **kwargs)
    try:
        model = getattr(transformers, auto_class).from_pretrained(path, **options)
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot load {model_type} checkpoint {path} with transformers ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    return model.eval()


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.safetensors.index.json"))


def _make_decoder_wrapper(model, num_layers: int):
    import torch
    from transformers import DynamicCache

    import inspect

    # transformers 5.x renamed past_key_values -> cache; use whichever this version's forward takes
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"

    class FlatKVCausalLM(torch.nn.Module):
        """Flat past/present tensors around an HF causal LM so ONNX I/O matches llama-tiny's names and layout."""

        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, *past):
            seq = input_ids.shape[1]
            past_len = past[0].shape[2]
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
            positions = torch.arange(seq, device=input_ids.device) + past_len
            attention_mask = torch.ones(input_ids.shape[0], past_len + seq, dtype=torch.long, device=input_ids.device)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions[None, :].expand(input_ids.shape[0], seq),
                use_cache=True,
                return_dict=True,
                **{cache_kwarg: cache},
            )
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return FlatKVCausalLM(model)


def _kv_geometry(config) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) from an HF config of a decoder."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        raise UnsupportedModelError(f"cannot read layer/head geometry from the {config.model_type} config: export it with a module:factory")
    return int(layers), int(kv_heads), int(head_dim)


def build_hf_spec(directory: str, seed: int = 0, dims: Mapping[str, int] | None = None, progress: Callable[[str], None] | None = None):
    """Load a local HF decoder, text encoder or image encoder offline and wrap it for export (one ONNX graph)."""
    import torch

    path = Path(directory).expanduser()
    kind, raw = detect_kind(path)
    if kind not in (DECODER, ENCODER, VISION):
        raise UnsupportedModelError(f"hf:{path} holds a {kind} model, which exports to several graphs: use export_model (maia-onnx export -o DIR)")
    if not _has_weights(path):
        raise UserError(f"no weights (*.safetensors or *.bin) in {path}: save the model with save_pretrained")
    model_type = raw.get("model_type", "?")
    archs = raw.get("architectures") or []
    dims = dict(dims or {})
    batch, seq, past = dims.get("batch", 2), dims.get("seq", 5), dims.get("past", 3)
    gen = torch.Generator().manual_seed(seed + 1)
    if progress:
        progress(f"loading Hugging Face {model_type} ({kind}) from {path} (offline)")
    model = load_pretrained(path, "AutoModelForCausalLM" if kind == DECODER else "AutoModel", model_type)
    meta = {"model": f"hf:{path.name}", "family": model_type, "hf_architectures": archs, "hf_kind": kind}
    from torch.export import Dim

    if kind == DECODER:
        num_layers, kv_heads, head_dim = _kv_geometry(model.config)
        text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        vocab = int(getattr(text, "vocab_size"))
        wrapper = _make_decoder_wrapper(model, num_layers).eval()
        inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen)}
        input_names, output_names = ["input_ids"], ["logits"]
        for i in range(num_layers):
            for kv in ("key", "value"):
                inputs[f"past_key_values.{i}.{kv}"] = torch.randn(batch, kv_heads, past, head_dim, generator=gen)
                input_names.append(f"past_key_values.{i}.{kv}")
                output_names.append(f"present.{i}.{kv}")
        d_batch, d_seq, d_past = Dim("batch"), Dim("seq"), Dim("past")
        dyn = ({0: d_batch, 1: d_seq}, tuple({0: d_batch, 2: d_past} for _ in range(2 * num_layers)))
        experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
        meta.update(
            num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
            num_heads=int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0)),
            hidden_size=int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0)),
            kv_cache_layout="batch,kv_heads,past,head_dim",
        )
        if experts:
            meta.update(num_experts=int(experts), experts_per_token=int(getattr(text, "num_experts_per_tok", 0) or 0))
        return ModelSpec(name=f"hf:{path}", module=wrapper, example_inputs=inputs, input_names=input_names,
                         output_names=output_names, dynamic_shapes=dyn, config=meta, param_prefix="model.")
    cfg = model.config
    if kind == VISION:
        # image encoder: pixel_values [batch, channels, image_size, image_size]; the image size is fixed by the
        # position embeddings, so only the batch is dynamic
        size = int(cfg.image_size if not isinstance(cfg.image_size, (list, tuple)) else cfg.image_size[0])
        names = ["pixel_values"]
        tensors = [torch.randn(batch, int(cfg.num_channels), size, size, generator=gen)]
        d_batch = Dim("batch")
        dyn = (({0: d_batch},),)
        meta.update(image_size=size, num_channels=int(cfg.num_channels))
    else:
        # text encoder: input_ids, attention_mask (+ token_type_ids when the model has them)
        vocab = int(getattr(cfg, "vocab_size"))
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, -1] = 0  # a padded position, so the exported mask path is exercised
        names = ["input_ids", "attention_mask"]
        tensors = [ids, mask]
        if getattr(cfg, "type_vocab_size", 0):
            names.append("token_type_ids")
            tensors.append(torch.zeros(batch, seq, dtype=torch.long))
        d_batch, d_seq = Dim("batch"), Dim("seq")
        dyn = (tuple({0: d_batch, 1: d_seq} for _ in names),)  # forward(*args): one nested entry
        meta.update(vocab_size=vocab)
    wrapper = make_encoder_wrapper(model, names).eval()
    try:
        with torch.no_grad():
            outs = wrapper(*tensors)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{model_type} checkpoint {path} is not an encoder taking {', '.join(names)} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); export it with a module:factory"
        ) from exc
    output_names = ["last_hidden_state", "pooler_output"][: len(outs)]
    meta.update(num_layers=int(getattr(cfg, "num_hidden_layers", 0)), hidden_size=int(getattr(cfg, "hidden_size", 0)),
                num_heads=int(getattr(cfg, "num_attention_heads", 0)))
    return ModelSpec(name=f"hf:{path}", module=wrapper, example_inputs=dict(zip(names, tensors)), input_names=names,
                     output_names=output_names, dynamic_shapes=dyn, config=meta, param_prefix="model.")


def make_encoder_wrapper(model, names: list[str]):
    import torch

    class EncoderOutputs(torch.nn.Module):
        """Positional inputs -> (last_hidden_state[, pooler_output]) tuple for a clean export signature."""

        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, *args):
            out = self.model(**dict(zip(names, args)), return_dict=True)
            result = [out.last_hidden_state]
            if getattr(out, "pooler_output", None) is not None:
                result.append(out.pooler_output)
            return tuple(result)

    return EncoderOutputs(model)
