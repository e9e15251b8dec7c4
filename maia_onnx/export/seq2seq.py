"""Encoder-decoder checkpoints (T5, BART-style, Whisper) -> encoder.onnx + decoder.onnx with self- and cross-attention
KV cache (the ONNX Runtime GenAI / Optimum layout), verified by greedy generation in ORT equal to PyTorch's.

encoder.onnx:  input_ids, attention_mask (text) | input_features (audio)
               -> encoder_hidden_states, present.{i}.encoder.key/value (each decoder layer's cross-attention K/V)
decoder.onnx:  decoder_input_ids, [encoder_attention_mask], past_key_values.{i}.decoder.key/value (self, grows),
               past_key_values.{i}.encoder.key/value (cross, from the encoder)
               -> logits, present.{i}.decoder.key/value
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from maia_onnx.errors import UserError, ValidationError
from maia_onnx.export.parts import export_parts
from maia_onnx.export.core import REL_TOLERANCE, ExportResult, log
from maia_onnx.hf import _has_weights, load_pretrained
from maia_onnx.models.registry import ModelSpec
from maia_onnx.ortutil import compare, make_session

GENERATE_TOKENS = 8  # greedy tokens compared between ORT and PyTorch after export


def _cache_kwarg(fn) -> str:
    # transformers 5 renames past_key_values -> cache (the old name is deprecated); pass whichever forward() takes
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def _is_audio(model) -> bool:
    return "input_features" in inspect.signature(model.get_encoder().forward).parameters


def _start_token(config) -> int:
    for key in ("decoder_start_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise UserError(f"the {config.model_type} config has no decoder_start_token_id: set it in config.json")


def _wrappers(model, num_layers: int, audio: bool):
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    decoder = model.get_decoder()
    dec_params = inspect.signature(decoder.forward).parameters
    dec_cache_kwarg = _cache_kwarg(decoder.forward)
    model_cache_kwarg = _cache_kwarg(model.forward)
    start = _start_token(model.config)

    class Seq2SeqEncoder(torch.nn.Module):
        """Encoder + every decoder layer's cross-attention K/V of its output (computed once per sequence)."""

        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, *inputs):
            if audio:
                mask = None
                hidden = self.model.get_encoder()(input_features=inputs[0], return_dict=True).last_hidden_state
            else:
                mask = inputs[1]
                hidden = self.model.get_encoder()(input_ids=inputs[0], attention_mask=mask, return_dict=True).last_hidden_state
            # one decoder step on an empty cache fills the cross-attention cache from `hidden`; everything but those
            # K/V projections is dead code the ONNX optimizer removes (this works for any HF encoder-decoder)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            kwargs = {"input_ids": torch.full((hidden.shape[0], 1), start, dtype=torch.long), "encoder_hidden_states": hidden,
                      dec_cache_kwarg: cache, "use_cache": True, "return_dict": True}
            if mask is not None and "encoder_attention_mask" in dec_params:
                kwargs["encoder_attention_mask"] = mask
            self.model.get_decoder()(**kwargs)
            cross = []
            for layer in cache.cross_attention_cache.layers:
                cross += [layer.keys, layer.values]
            return (hidden, *cross)

    class Seq2SeqDecoder(torch.nn.Module):
        """One decoder step (or a prefix) on flat self- and cross-attention KV tensors -> logits and the grown self KV."""

        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, decoder_input_ids, *rest):
            mask, past = (None, rest) if audio else (rest[0], rest[1:])
            self_kv = [(past[4 * i], past[4 * i + 1]) for i in range(num_layers)]
            cross_kv = [(past[4 * i + 2], past[4 * i + 3]) for i in range(num_layers)]
            cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=self_kv), DynamicCache(ddp_cache_data=cross_kv))
            cache.is_updated = {i: True for i in range(num_layers)}  # cross K/V are given: never recompute them
            batch, enc_len = decoder_input_ids.shape[0], cross_kv[0][0].shape[2]
            # the encoder output itself is not needed (its K/V are in the cache): a zero placeholder of its shape
            placeholder = torch.zeros(batch, enc_len, self.model.config.d_model, dtype=cross_kv[0][0].dtype)
            kwargs = {"decoder_input_ids": decoder_input_ids, "encoder_outputs": (placeholder,), model_cache_kwarg: cache,
                      "use_cache": True, "return_dict": True}
            if mask is not None:
                kwargs["attention_mask"] = mask
            out = self.model(**kwargs)
            presents = []
            for layer in cache.self_attention_cache.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return Seq2SeqEncoder(model).eval(), Seq2SeqDecoder(model).eval()


def build_specs(model, seed: int = 0, dims: Mapping[str, int] | None = None):
    """(encoder spec, decoder spec, example encoder inputs) for a loaded HF encoder-decoder."""
    import torch
    from torch.export import Dim

    dims = dict(dims or {})
    cfg = model.config
    num_layers = int(getattr(cfg, "decoder_layers", None) or getattr(cfg, "num_decoder_layers", None) or cfg.num_layers)
    audio = _is_audio(model)
    encoder, decoder = _wrappers(model, num_layers, audio)
    gen = torch.Generator().manual_seed(seed + 1)
    batch, enc_seq, dec_seq, past = dims.get("batch", 2), dims.get("seq", 6), dims.get("dec_seq", 2), dims.get("past", 3)
    d_batch = Dim("batch")
    if audio:
        frames = 2 * int(cfg.max_source_positions)  # Whisper's encoder takes exactly this many mel frames
        enc_inputs = {"input_features": torch.randn(batch, int(cfg.num_mel_bins), frames, generator=gen)}
        enc_dyn = (({0: d_batch},),)
    else:
        mask = torch.ones(batch, enc_seq, dtype=torch.long)
        mask[0, -1] = 0  # a padded source position exercises the cross-attention mask
        enc_inputs = {"input_ids": torch.randint(0, int(cfg.vocab_size), (batch, enc_seq), generator=gen), "attention_mask": mask}
        d_src = Dim("encoder_seq")
        enc_dyn = (({0: d_batch, 1: d_src}, {0: d_batch, 1: d_src}),)
    cross_names = [f"present.{i}.encoder.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    with torch.no_grad():
        enc_out = encoder(*enc_inputs.values())
    _, heads, src_len, head_dim = enc_out[1].shape
    meta = {"family": cfg.model_type, "num_layers": num_layers, "num_heads": int(heads), "head_dim": int(head_dim),
            "vocab_size": int(cfg.vocab_size), "decoder_start_token_id": _start_token(cfg),
            "kv_cache_layout": "batch,heads,past,head_dim", "hf_kind": "encoder-decoder"}
    enc_spec = ModelSpec(name=f"{cfg.model_type}-encoder", module=encoder, example_inputs=enc_inputs,
                         input_names=list(enc_inputs), output_names=["encoder_hidden_states", *cross_names],
                         dynamic_shapes=enc_dyn, config={**meta, "graph": "encoder"}, param_prefix="model.")
    dec_inputs = {"decoder_input_ids": torch.randint(0, int(cfg.vocab_size), (batch, dec_seq), generator=gen)}
    d_seq, d_past = Dim("seq"), Dim("past")
    d_src_dec = None if audio else Dim("encoder_seq")
    rest_dyn = []
    if not audio:
        dec_inputs["encoder_attention_mask"] = enc_inputs["attention_mask"]
        rest_dyn.append({0: d_batch, 1: d_src_dec})
    for i in range(num_layers):
        for kv in ("key", "value"):
            dec_inputs[f"past_key_values.{i}.decoder.{kv}"] = torch.randn(batch, heads, past, head_dim, generator=gen)
            rest_dyn.append({0: d_batch, 2: d_past})
        for kv_index, kv in enumerate(("key", "value")):
            dec_inputs[f"past_key_values.{i}.encoder.{kv}"] = enc_out[1 + 2 * i + kv_index]
            rest_dyn.append({0: d_batch} if audio else {0: d_batch, 2: d_src_dec})
    dec_spec = ModelSpec(name=f"{cfg.model_type}-decoder", module=decoder, example_inputs=dec_inputs,
                         input_names=list(dec_inputs),
                         output_names=["logits"] + [f"present.{i}.decoder.{kv}" for i in range(num_layers) for kv in ("key", "value")],
                         dynamic_shapes=({0: d_batch, 1: d_seq}, tuple(rest_dyn)), config={**meta, "graph": "decoder"},
                         param_prefix="model.")
    return enc_spec, dec_spec, enc_inputs


def greedy_check(model, encoder_path: Path, decoder_path: Path, enc_inputs: Mapping, tokens: int = GENERATE_TOKENS,
                 tolerance: float = REL_TOLERANCE) -> dict:
    """Greedy-decode ``tokens`` tokens in ORT (encoder once, then the decoder step by step on its KV cache) and in
    PyTorch (the HF model, full recompute each step); the token sequences must be equal, the logits within tolerance."""
    import torch

    enc_sess, dec_sess = make_session(encoder_path), make_session(decoder_path)
    feeds = {k: v.numpy() for k, v in enc_inputs.items()}
    enc_names = [o.name for o in enc_sess.get_outputs()]
    enc = dict(zip(enc_names, enc_sess.run(enc_names, feeds)))
    dec_in = [i.name for i in dec_sess.get_inputs()]
    dec_out = [o.name for o in dec_sess.get_outputs()]
    num_layers = sum(1 for n in dec_out if n.endswith(".decoder.key"))
    batch, heads, _, head_dim = enc["present.0.encoder.key"].shape
    past = {f"past_key_values.{i}.decoder.{kv}": np.zeros((batch, heads, 0, head_dim), np.float32)
            for i in range(num_layers) for kv in ("key", "value")}
    cross = {f"past_key_values.{i}.encoder.{kv}": enc[f"present.{i}.encoder.{kv}"] for i in range(num_layers) for kv in ("key", "value")}
    start = _start_token(model.config)
    seq = np.full((batch, 1), start, np.int64)
    step_logits = []
    for _ in range(tokens):
        feed = {"decoder_input_ids": seq[:, -1:], **past, **cross}
        if "encoder_attention_mask" in dec_in:
            feed["encoder_attention_mask"] = feeds["attention_mask"]
        out = dict(zip(dec_out, dec_sess.run(dec_out, feed)))
        step_logits.append(out["logits"][:, -1])
        past = {f"past_key_values.{i}.decoder.{kv}": out[f"present.{i}.decoder.{kv}"] for i in range(num_layers) for kv in ("key", "value")}
        seq = np.concatenate([seq, out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)], axis=1)
    ref_seq = torch.full((batch, 1), start, dtype=torch.long)
    kwargs = {k: v for k, v in enc_inputs.items()}
    with torch.no_grad():
        for _ in range(tokens):
            logits = model(**kwargs, decoder_input_ids=ref_seq, use_cache=False, return_dict=True).logits
            ref_seq = torch.cat([ref_seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    # logits of every generated position from one PyTorch pass over the ORT-generated prefix
    with torch.no_grad():
        ref_logits = model(**kwargs, decoder_input_ids=torch.from_numpy(seq[:, :-1]), use_cache=False, return_dict=True).logits
    err = compare(ref_logits.numpy(), np.stack(step_logits, axis=1))
    ort_tokens, torch_tokens = seq[:, 1:].tolist(), ref_seq[:, 1:].tolist()
    if ort_tokens != torch_tokens:
        raise ValidationError(
            f"greedy generation differs between ONNX Runtime {ort_tokens} and PyTorch {torch_tokens}: the encoder/decoder "
            "export is wrong"
        )
    if not err["max_rel"] <= tolerance:
        raise ValidationError(f"decoder logits over {tokens} cached steps differ from PyTorch by rel {err['max_rel']:.3e} > {tolerance:g}")
    return {"greedy_tokens": tokens, "tokens_equal": True, "tokens": ort_tokens, "step_logits": err}


def export_seq2seq(path: Path, out_dir, raw: dict, seed: int = 0, dims: Mapping[str, int] | None = None,
                   progress: Callable[[str], None] | None = None, **options) -> ExportResult:
    """hf:DIR of an encoder-decoder -> out_dir/encoder.onnx + out_dir/decoder.onnx, verified by greedy generation."""
    if not _has_weights(path):
        raise UserError(f"no weights (*.safetensors or *.bin) in {path}: save the model with save_pretrained")
    model_type = raw.get("model_type", "?")
    log(progress, f"loading Hugging Face {model_type} (encoder-decoder) from {path} (offline)")
    audio = "num_mel_bins" in raw
    model = load_pretrained(path, "AutoModelForSpeechSeq2Seq" if audio else "AutoModelForSeq2SeqLM", model_type)
    enc_spec, dec_spec, enc_inputs = build_specs(model, seed=seed, dims=dims)
    for spec in (enc_spec, dec_spec):
        spec.config.update(model=f"hf:{path.name}", hf_architectures=raw.get("architectures") or [])

    def verify(staging: Path) -> dict:
        log(progress, f"greedy generation of {GENERATE_TOKENS} tokens in ONNX Runtime vs PyTorch")
        return greedy_check(model, staging / "encoder.onnx", staging / "decoder.onnx", enc_inputs)

    return export_parts(f"hf:{path}", [("encoder.onnx", lambda: enc_spec), ("decoder.onnx", lambda: dec_spec)], out_dir,
                        verify=verify, progress=progress, **options)
