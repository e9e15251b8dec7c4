"""Diffusion UNet (ResNet blocks, sinusoidal timestep embedding, cross-attention on text context, down/up path with skips)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

INPUT_NAMES = ["sample", "timestep", "encoder_hidden_states"]
OUTPUT_NAMES = ["out_sample"]


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple = (32, 64)
    time_embed_dim: int = 64
    context_dim: int = 32  # encoder_hidden_states feature size
    context_len: int = 8
    num_heads: int = 2
    norm_groups: int = 8
    sample_size: int = 16

    def as_dict(self) -> dict:
        d = asdict(self)
        d["block_channels"] = list(self.block_channels)
        d["family"] = "unet"
        return d


SIZES = {
    "tiny": UNetConfig(),
    "large": UNetConfig(block_channels=(320, 640, 1280), time_embed_dim=1280, context_dim=768, context_len=77,
                        num_heads=8, norm_groups=32, sample_size=64),
}


def timestep_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [batch] -> [batch, dim] (cos | sin), as in DDPM/Stable Diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = timestep[:, None].to(torch.float32) * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class CrossAttention(nn.Module):
    """Multi-head attention with explicit MatMul/Softmax (no fused SDPA) so passes can see Q.K^T and P.V."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context):
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(context).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(context).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class TransformerBlock(nn.Module):
    """GroupNorm -> proj_in -> (self-attn, cross-attn on context, GELU FF) -> proj_out, residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, 4 * dim)
        self.ff_out = nn.Linear(4 * dim, dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, context):
        b, c, h, w = x.shape
        residual = x
        t = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        t = self.proj_in(t)
        n1 = self.norm1(t)
        t = t + self.attn1(n1, n1)
        t = t + self.attn2(self.norm2(t), context)
        t = t + self.ff_out(F.gelu(self.ff_in(self.norm3(t))))
        t = self.proj_out(t)
        return residual + t.reshape(b, h, w, c).permute(0, 3, 1, 2)


class DownBlock(nn.Module):
    def __init__(self, cin, cout, cfg: UNetConfig, downsample: bool):
        super().__init__()
        self.resnet = ResnetBlock(cin, cout, cfg.time_embed_dim, cfg.norm_groups)
        self.attention = TransformerBlock(cout, cfg.context_dim, cfg.num_heads, cfg.norm_groups)
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if downsample else None

    def forward(self, x, temb, context):
        x = self.attention(self.resnet(x, temb), context)
        skip = x
        if self.downsample is not None:
            x = self.downsample(x)
        return x, skip


class UpBlock(nn.Module):
    def __init__(self, cin, skip_channels, cout, cfg: UNetConfig, upsample: bool):
        super().__init__()
        self.resnet = ResnetBlock(cin + skip_channels, cout, cfg.time_embed_dim, cfg.norm_groups)
        self.attention = TransformerBlock(cout, cfg.context_dim, cfg.num_heads, cfg.norm_groups)
        self.upsample = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

    def forward(self, x, skip, temb, context):
        x = self.attention(self.resnet(torch.cat([x, skip], dim=1), temb), context)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class UNet(nn.Module):
    """forward(sample [B,C,H,W], timestep [B] float, encoder_hidden_states [B,L,D]) -> out_sample [B,C,H,W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = list(cfg.block_channels)
        self.time_linear_1 = nn.Linear(ch[0], cfg.time_embed_dim)
        self.time_linear_2 = nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        cin = ch[0]
        for i, cout in enumerate(ch):
            self.down_blocks.append(DownBlock(cin, cout, cfg, downsample=i < len(ch) - 1))
            cin = cout
        self.mid_resnet_1 = ResnetBlock(ch[-1], ch[-1], cfg.time_embed_dim, cfg.norm_groups)
        self.mid_attention = TransformerBlock(ch[-1], cfg.context_dim, cfg.num_heads, cfg.norm_groups)
        self.mid_resnet_2 = ResnetBlock(ch[-1], ch[-1], cfg.time_embed_dim, cfg.norm_groups)
        self.up_blocks = nn.ModuleList()
        cin = ch[-1]
        for i, skip_ch in reversed(list(enumerate(ch))):
            cout = skip_ch
            self.up_blocks.append(UpBlock(cin, skip_ch, cout, cfg, upsample=i > 0))
            cin = cout
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states):
        temb = timestep_embedding(timestep, self.config.block_channels[0])
        temb = self.time_linear_2(F.silu(self.time_linear_1(temb)))
        x = self.conv_in(sample)
        skips = []
        for block in self.down_blocks:
            x, skip = block(x, temb, encoder_hidden_states)
            skips.append(skip)
        x = self.mid_resnet_2(self.mid_attention(self.mid_resnet_1(x, temb), encoder_hidden_states), temb)
        for block in self.up_blocks:
            x = block(x, skips.pop(), temb, encoder_hidden_states)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def init_weights(module: nn.Module, seed: int = 0) -> None:
    """Seeded weights: fan-in scaled normal for convs/linears, perturbed ones/zeros for norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in**-0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def example_inputs(cfg: UNetConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    s = cfg.sample_size
    return {
        "sample": torch.randn(batch, cfg.in_channels, s, s, generator=gen),
        "timestep": torch.rand(batch, generator=gen) * 1000.0,
        "encoder_hidden_states": torch.randn(batch, cfg.context_len, cfg.context_dim, generator=gen),
    }


def dynamic_shapes() -> tuple:
    from torch.export import Dim

    batch = Dim("batch")
    return ({0: batch}, {0: batch}, {0: batch})
