"""Llama-style decoder LM (RMSNorm, RoPE, GQA, SwiGLU) written for clean ONNX export with a flat KV cache."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    def as_dict(self) -> dict:
        d = asdict(self)
        d["family"] = "llama"
        return d


# size knob: "large" is >= 3 GB of FP32 weights (~0.95 B parameters) for scale tests
SIZES = {
    "tiny": LlamaConfig(),
    "large": LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=5632,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        batch, seq, _ = x.shape
        # head counts stay literal constants in the exported Reshape so TP can rewrite them
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        present_k = torch.cat([past_k, k], dim=2)
        present_v = torch.cat([past_v, v], dim=2)
        total = present_k.shape[2]
        rep = self.num_heads // self.num_kv_heads
        # GQA: repeat each KV head for its query group (explicit, no fused op)
        k_all = present_k[:, :, None].expand(batch, self.num_kv_heads, rep, total, self.head_dim)
        k_all = k_all.reshape(batch, self.num_heads, total, self.head_dim)
        v_all = present_v[:, :, None].expand(batch, self.num_kv_heads, rep, total, self.head_dim)
        v_all = v_all.reshape(batch, self.num_heads, total, self.head_dim)
        scores = torch.matmul(q, k_all.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim))
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v_all)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out), present_k, present_v


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        attn, present_k, present_v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present_k, present_v


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids, past.0.key, past.0.value, ...) -> (logits, present.0.key, present.0.value, ...)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        cfg = self.config
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (needed after building on the meta device and to_empty())."""
        self.inv_freq = self._inv_freq()

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        cfg = self.config
        batch, seq = input_ids.shape
        past_len = past[0].shape[2]
        positions = torch.arange(seq, device=input_ids.device) + past_len
        freqs = positions[:, None].to(torch.float32) * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        key_positions = torch.arange(past_len + seq, device=input_ids.device)
        mask = key_positions[None, :] <= positions[:, None]  # [seq, past+seq], causal
        x = self.model.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, pk, pv = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [pk, pv]
        logits = self.lm_head(self.model.norm(x))
        assert len(past) == 2 * cfg.num_layers
        return (logits, *presents)


def init_weights(module: nn.Module, seed: int = 0) -> None:
    """Seeded random weights with sensible scales (normal 0.02 for matrices, ones for norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # Linear [out, in]: std 1/sqrt(fan_in) keeps activations O(1) through depth
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)


def input_names(cfg: LlamaConfig) -> list[str]:
    names = ["input_ids"]
    for i in range(cfg.num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(cfg: LlamaConfig) -> list[str]:
    names = ["logits"]
    for i in range(cfg.num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def example_inputs(cfg: LlamaConfig, batch: int = 2, seq: int = 5, past: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    # sizes >= 2 so torch.export does not specialize the dims to 0/1
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)}
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = torch.randn(batch, cfg.num_kv_heads, past, cfg.head_dim, generator=gen)
    return inputs


def dynamic_shapes(cfg: LlamaConfig) -> tuple:
    """Per positional argument: batch, seq and past length are dynamic."""
    from torch.export import Dim

    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
    kv = {0: batch, 2: past}
    return ({0: batch, 1: seq}, tuple(kv for _ in range(2 * cfg.num_layers)))
