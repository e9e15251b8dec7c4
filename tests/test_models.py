"""Built-in reference models in PyTorch: registry, shapes, seeded determinism and KV-cache consistency."""

from __future__ import annotations

import pytest
import torch

from maia_onnx.errors import UserError
from maia_onnx.models import llama, registry


def test_registry_lists_the_three_families():
    assert registry.names() == ["llama-tiny", "unet-tiny", "yolo-tiny"]


@pytest.mark.parametrize("name", ["llama-tiny", "unet-tiny", "yolo-tiny"])
def test_build_runs_and_names_every_output(name):
    spec = registry.build(name)
    assert list(spec.example_inputs) == spec.input_names
    with torch.no_grad():
        out = spec.module(*spec.args)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(spec.output_names)
    assert all(torch.isfinite(t).all() for t in out)
    assert spec.config["family"] in name


def test_llama_tiny_default_config_matches_contract():
    spec = registry.build("llama-tiny")
    cfg = spec.config
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_layers"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"],
            cfg["intermediate_size"], cfg["tie_word_embeddings"]) == (256, 64, 2, 4, 2, 16, 128, False)
    assert spec.input_names[1:3] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert spec.output_names[:3] == ["logits", "present.0.key", "present.0.value"]
    logits, k0 = spec.module(*spec.args)[:2]
    assert tuple(logits.shape) == (2, 5, 256)
    assert tuple(k0.shape) == (2, 2, 3 + 5, 16)  # [batch, kv_heads, past+seq, head_dim]


def test_seeded_weights_are_deterministic_and_seed_dependent():
    a = registry.build("yolo-tiny", seed=3).module.stem.conv.weight
    b = registry.build("yolo-tiny", seed=3).module.stem.conv.weight
    c = registry.build("yolo-tiny", seed=4).module.stem.conv.weight
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _empty_past(cfg, batch=1):
    return [torch.zeros(batch, cfg.num_kv_heads, 0, cfg.head_dim) for _ in range(2 * cfg.num_layers)]


@pytest.mark.parametrize("tied", [False, True])
def test_llama_incremental_decode_matches_full_sequence(tied):
    cfg = llama.LlamaConfig(tie_word_embeddings=tied)
    model = llama.LlamaForCausalLM(cfg).eval()
    llama.init_weights(model, seed=1)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, *_empty_past(cfg))[0]
        out = model(ids[:, :5], *_empty_past(cfg))
        steps = [out[0]]
        past = list(out[1:])
        for t in (5, 6):
            out = model(ids[:, t : t + 1], *past)
            steps.append(out[0])
            past = list(out[1:])
    incremental = torch.cat(steps, dim=1)
    assert past[0].shape[2] == 7
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


def test_llama_attention_is_causal():
    cfg = llama.LlamaConfig()
    model = llama.LlamaForCausalLM(cfg).eval()
    llama.init_weights(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a = model(ids, *_empty_past(cfg))[0]
        b = model(changed, *_empty_past(cfg))[0]
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # earlier positions cannot see the last token
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_large_size_is_multi_gb_without_allocating():
    cfg = llama.SIZES["large"]
    with torch.device("meta"):
        model = llama.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n * 4 >= 3e9


def test_unknown_name_and_size_are_user_errors():
    with pytest.raises(UserError, match="unknown built-in model 'resnet'.*llama-tiny"):
        registry.build("resnet")
    with pytest.raises(UserError, match="unknown size 'huge'"):
        registry.build("llama-tiny", size="huge")


def test_yolo_boxes_are_well_formed_pixels():
    spec = registry.build("yolo-tiny")
    with torch.no_grad():
        boxes, scores = spec.module(*spec.args)
    assert tuple(boxes.shape) == (2, 8 * 8 + 4 * 4, 4)
    assert tuple(scores.shape) == (2, 80, 8)
    assert bool((boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all())
    assert bool(((scores > 0) & (scores < 1)).all())


def test_unet_output_matches_sample_shape_and_depends_on_timestep_and_context():
    spec = registry.build("unet-tiny")
    inputs = dict(spec.example_inputs)
    with torch.no_grad():
        base = spec.module(*inputs.values())
        t2 = spec.module(inputs["sample"], inputs["timestep"] + 100.0, inputs["encoder_hidden_states"])
        c2 = spec.module(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"] * 2.0)
    assert base.shape == inputs["sample"].shape
    assert not torch.allclose(base, t2)
    assert not torch.allclose(base, c2)
