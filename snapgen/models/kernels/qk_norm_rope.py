"""Queries and keys from their projection to what SDPA reads, in one pass: split heads, RMSNorm, 2-D RoPE.

PyTorch's path (``Attention.query_key_heads``) is a transpose view, then RMSNorm as six elementwise and
reduction ops (fp32 cast, square, mean, rsqrt, multiply, cast back, weight) and RoPE as four more (the
rotate-half split and concat, two products, a sum), each reading and writing the whole query tensor; the
grouped-query reshape after it then copies once more, because the transposed result is not contiguous. Here
each program loads a block of token rows of one head once (plus the rotate-half partner columns, from the
same cache lines), and writes them normalised and rotated, already in the (B, heads, N, d) contiguous layout.

Rotate-half per axis, as in ``attention.apply_rotary``: with ``q = d / 4`` the partner of column ``j`` is
``j + q`` (taken negated) in the first and third quarter, ``j - q`` in the second and fourth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt


@triton.jit
def _qk_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, N, HN, D, sxb, sxn, sxf, eps,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Rows r = head * N + token of one sample: the output (B, heads, N, d) is contiguous in r, and each row
    # is normed and rotated on its own.
    b = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = r % N
    j = tl.arange(0, BLOCK_D)
    jmask = j < D
    mask = (r < HN)[:, None] & jmask[None, :]
    row = x_ptr + b * sxb + (n * sxn + (r // N) * D * sxf)[:, None]
    y = tl.load(row + j[None, :] * sxf, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / D + eps)
        y = y * rstd[:, None] * tl.load(w_ptr + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    if HAS_ROPE:
        quarter = D // 4
        first = ((j // quarter) % 2) == 0
        partner = tl.where(first, j + quarter, j - quarter)
        yp = tl.load(row + partner[None, :] * sxf, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            yp = yp * rstd[:, None] * tl.load(w_ptr + partner, mask=jmask, other=0.0).to(tl.float32)[None, :]
        yp = tl.where(first[None, :], -yp, yp)
        table = n[:, None] * D + j[None, :]
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0)
        y = y * cos + yp * sin
    out = y_ptr + (b * HN + r[:, None]) * D + j[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)


def qk_norm_rope(
    x: torch.Tensor,
    heads: int,
    head_dim: int,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, N, heads * head_dim) -> contiguous (B, heads, N, head_dim), RMS-normed by ``weight`` (None: not
    normed) and rotated by the (N, head_dim) fp32 tables of ``attention.rotary_tables_2d`` (None: not rotated)."""
    rt.check_device(x)
    batch, tokens, features = x.shape
    if features != heads * head_dim:
        raise ValueError(f"expected {heads} heads of {head_dim} features, got {features} features")
    if rotary is not None and head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    y = torch.empty(batch, heads, tokens, head_dim, device=x.device, dtype=x.dtype)
    cos, sin = (t.float().contiguous() for t in rotary) if rotary is not None else (y, y)
    block_d = rt.pow2(head_dim)
    block_r = max(1, min(rt.pow2(heads * tokens), rt.TILE // block_d))
    rt.launch(
        _qk_norm_rope_kernel,
        (batch, rt.cdiv(heads * tokens, block_r)),
        (x, weight if weight is not None else y, cos, sin, y, tokens, heads * tokens, head_dim, *x.stride(), eps),
        HAS_NORM=weight is not None, HAS_ROPE=rotary is not None, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return y
