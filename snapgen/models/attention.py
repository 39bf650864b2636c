"""Attention for the SnapGen U-Net: multi-query attention, QK-RMSNorm and 2-D rotary embeddings.

Everything here is written with plain tensor ops (no complex numbers, no fused kernels other
than ``scaled_dot_product_attention``) so that ``torch.jit.trace`` -> Core ML and ONNX export see
ops they can convert.

2-D RoPE: a head of dimension ``d`` is split in two halves; the first half is rotated by the
token's row index, the second by its column index. Within a half of size ``h`` the rotation
angles are ``pos * theta ** (-2i / h)`` for ``i < h/2``, applied "rotate-half" style:
``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension.

    Written out by hand rather than with ``nn.RMSNorm`` so converters see elementwise ops
    and never a fused op they might rewrite (coremltools #2821).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight


def rotary_tables_2d(
    height: int, width: int, head_dim: int, theta: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (height * width, head_dim) for row-major token order."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(0, half, 2, dtype=torch.float32, device=device) / half)
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    row_angles = torch.outer(rows, inv_freq)  # (H, half/2)
    col_angles = torch.outer(cols, inv_freq)  # (W, half/2)
    row_angles = row_angles[:, None, :].expand(height, width, -1)
    col_angles = col_angles[None, :, :].expand(height, width, -1)
    # Each frequency appears twice in its half because rotate_half pairs i with i + quarter.
    angles = torch.cat([row_angles, row_angles, col_angles, col_angles], dim=-1)
    angles = angles.reshape(height * width, head_dim)
    return angles.cos(), angles.sin()


def _rotate_half_per_axis(x: torch.Tensor) -> torch.Tensor:
    quarter = x.shape[-1] // 4
    r1, r2, c1, c2 = x.split(quarter, dim=-1)
    return torch.cat([-r2, r1, -c2, c1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (..., tokens, head_dim) by the tables from :func:`rotary_tables_2d`."""
    return x * cos.to(x.dtype) + _rotate_half_per_axis(x) * sin.to(x.dtype)


class Attention(nn.Module):
    """Self- or cross-attention with ``num_kv_heads`` shared key/value heads.

    ``num_kv_heads == num_heads`` is ordinary multi-head attention, ``1`` is multi-query
    attention (the paper's choice: less memory traffic), anything dividing ``num_heads`` is
    grouped-query attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        context_dim: int | None = None,
        qk_norm: bool = False,
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.to_k = nn.Linear(context_dim, num_kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(context_dim, num_kv_heads * head_dim, bias=False)
        self.to_out = nn.Linear(num_heads * head_dim, dim)
        self.norm_q = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(head_dim) if qk_norm else nn.Identity()

    def query_key_heads(
        self, q: torch.Tensor, k: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected queries (B, N, heads * d) and keys (B, M, kv_heads * d) -> per-head (B, heads, N, d)
        and (B, kv_heads, M, d), RMS-normed and rotated.

        A method of its own because ``snapgen.models.kernels`` swaps it for one fused pass.
        """
        q = q.view(q.shape[0], q.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(k.shape[0], -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.norm_q(q), self.norm_k(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, N, dim); context: (B, M, context_dim); attention_bias: additive, (B, 1, 1, M)."""
        batch, tokens, _ = x.shape
        context = x if context is None else context
        q, k = self.query_key_heads(self.to_q(x), self.to_k(context), rotary)
        v = self.to_v(context).view(batch, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # Grouped queries share one key/value head: fold the group into the query axis so a
        # single SDPA call attends (B, kv, group * N, d) against (B, kv, M, d) without copying
        # keys and values per head.
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, group * tokens, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        out = out.reshape(batch, self.num_heads, tokens, self.head_dim).transpose(1, 2)
        out = out.reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.to_out(out)
