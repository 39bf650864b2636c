"""Building blocks of the SnapGen U-Net: ResBlocks, transformer blocks, resampling, timestep embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, rotary_tables_2d


def timestep_sinusoids(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of ``scale * t`` (t in [0, 1] is the flow time), cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = scale * t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1: the paper's replacement for a full 3x3 convolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels),
            nn.Conv2d(in_channels, out_channels, 1),
        )


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between.

    ``separable=False`` is SDXL's block (two full 3x3 convolutions). ``separable=True`` uses
    depthwise + pointwise convolutions; with ``expansion > 1`` the first pointwise layer widens
    the hidden channels by that factor and the second narrows them back ("expanded separable
    convolution"), which recovers the quality lost to plain separable convolutions.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_dim: int,
        separable: bool = True,
        expansion: int = 2,
        groups: int = 32,
    ):
        super().__init__()
        hidden = out_channels * expansion if separable else out_channels
        self.norm1 = nn.GroupNorm(min(groups, in_channels), in_channels)
        self.conv1 = (
            SeparableConv2d(in_channels, hidden) if separable else nn.Conv2d(in_channels, hidden, 3, padding=1)
        )
        self.time_proj = nn.Linear(temb_dim, hidden)
        self.norm2 = nn.GroupNorm(min(groups, hidden), hidden)
        self.conv2 = (
            SeparableConv2d(hidden, out_channels) if separable else nn.Conv2d(hidden, out_channels, 3, padding=1)
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class FeedForward(nn.Module):
    """``dim -> mult * dim -> dim`` with GELU (tanh) or GEGLU (SDXL's choice)."""

    def __init__(self, dim: int, mult: float, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "geglu"):
            raise ValueError(f"ffn activation must be 'gelu' or 'geglu', got {activation!r}")
        inner = int(dim * mult)
        self.geglu = activation == "geglu"
        self.proj_in = nn.Linear(dim, inner * 2 if self.geglu else inner)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.geglu:
            x, gate = self.proj_in(x).chunk(2, dim=-1)
            return self.proj_out(x * F.gelu(gate))
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    """Pre-norm [self-attention] -> cross-attention -> FFN, each with a residual.

    Without self-attention this is the paper's "CA + FFN" block that replaces the first stage's
    plain ResBlock and that the high-resolution stages keep once self-attention is removed.
    """

    def __init__(
        self,
        dim: int,
        head_dim: int,
        num_kv_heads: int | None,
        context_dim: int,
        self_attention: bool,
        qk_norm: bool,
        ffn_mult: float,
        ffn_activation: str,
    ):
        super().__init__()
        heads = max(1, dim // head_dim)
        kv_heads = min(num_kv_heads, heads) if num_kv_heads else heads
        attn_kwargs = dict(num_heads=heads, head_dim=head_dim, num_kv_heads=kv_heads, qk_norm=qk_norm)
        self.self_attention = self_attention
        if self_attention:
            self.norm1 = nn.LayerNorm(dim)
            self.attn1 = Attention(dim, **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim=context_dim, **attn_kwargs)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ffn_mult, ffn_activation)

    def forward(self, x, context, context_bias=None, rotary=None):
        if self.self_attention:
            x = x + self.attn1(self.norm1(x), rotary=rotary)
        x = x + self.attn2(self.norm2(x), context, attention_bias=context_bias)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs ``depth`` transformer blocks over the (H*W) tokens of a feature map, with a residual."""

    def __init__(
        self,
        channels: int,
        depth: int,
        head_dim: int,
        num_kv_heads: int | None,
        context_dim: int,
        self_attention: bool,
        qk_norm: bool,
        rope: bool,
        rope_theta: float,
        ffn_mult: float,
        ffn_activation: str,
        groups: int = 32,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rope = rope and self_attention
        self.rope_theta = rope_theta
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                channels, head_dim, num_kv_heads, context_dim, self_attention, qk_norm, ffn_mult, ffn_activation
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor | None = None):
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)
        h = self.proj_in(h)
        rotary = rotary_tables_2d(height, width, self.head_dim, self.rope_theta, x.device) if self.rope else None
        for block in self.blocks:
            h = block(h, context, context_bias, rotary)
        h = self.proj_out(h).transpose(1, 2).reshape(batch, channels, height, width)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
