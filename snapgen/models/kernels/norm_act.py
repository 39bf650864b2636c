"""GroupNorm fused with what follows it: an activation, a per-channel add before it, a layout change after it.

PyTorch runs ``silu(group_norm(h + t))`` as three passes over the activation (add, norm, SiLU), each reading
and writing it in full. Here the statistics pass reads it once and produces, per (sample, channel), one
``scale`` and ``shift`` with ``group_norm(h + t) == h * scale + shift``; then either the elementwise pass below
(one read, one write, the activation applied on the way) or the depthwise convolution that follows the norm
(``depthwise.py``) applies them as it loads its input, and the normalised tensor is never written at all.

Statistics: each program walks its part of one group in blocks and merges the blocks' (count, mean, M2) with
Chan's formula, so a group mean far from zero loses no precision to ``E[x^2] - mean^2``. Large groups are split
over several programs (a GPU has over a hundred SMs and a batch-1 GroupNorm only 32 groups), merged by a
second small kernel; a group that fits one program is finished by that program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from . import _runtime as rt
from ._runtime import ACT_SILU

# Elements of a group one statistics program covers before the group is split over more programs.
_CHUNK = 1 << 15


@triton.jit
def _pixel_offset(p, W, stride_h, stride_w, FLAT: tl.constexpr):
    # Flat: one multiply instead of an integer division and a modulo per element.
    if FLAT:
        return p * stride_w
    return (p // W) * stride_h + (p % W) * stride_w


@triton.jit
def _write_scale_shift(
    bg, gmask, mean, var, weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, C, G, cpg, eps,
    HAS_ADD: tl.constexpr, BLOCK_CPG: tl.constexpr,
):  # fmt: skip
    # bg, gmask, mean, var: one entry per (sample, group) of the program's block of groups.
    rstd = (1.0 / tl.sqrt(var + eps))[:, None]
    c = tl.arange(0, BLOCK_CPG)
    mask = gmask[:, None] & (c < cpg)[None, :]
    ch = ((bg % G) * cpg)[:, None] + c[None, :]
    at = (bg // G)[:, None] * C + ch
    scale = rstd * tl.load(weight_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(bias_ptr + ch, mask=mask, other=0.0).to(tl.float32) - mean[:, None] * scale
    if HAS_ADD:
        # norm(h + t) = h * scale + (t * scale + shift): the add folds into the shift.
        shift += tl.load(add_ptr + at, mask=mask, other=0.0).to(tl.float32) * scale
    tl.store(scale_ptr + at, scale, mask=mask)
    tl.store(shift_ptr + at, shift, mask=mask)


@triton.jit
def _group_stats_kernel(
    x_ptr, add_ptr, weight_ptr, bias_ptr, part_ptr, scale_ptr, shift_ptr,
    C, G, NG, W, HW, cpg, group_numel, chunk, stride_b, stride_c, stride_h, stride_w, eps,
    HAS_ADD: tl.constexpr, CHANNELS_INNER: tl.constexpr, FLAT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, BLOCK_CPG: tl.constexpr,
):  # fmt: skip
    # A program covers part `part` of BLOCK_G (sample, group) pairs: one pair on a GPU, many in the
    # interpreter, where each program costs the same Python overhead however little it does.
    bg = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = bg < NG
    part = tl.program_id(1)
    group_base = (bg // G) * stride_b + ((bg % G) * cpg) * stride_c
    add_base = (bg // G) * C + (bg % G) * cpg
    start = part * chunk
    end = tl.minimum(start + chunk, group_numel)
    count = tl.zeros([BLOCK_G], dtype=tl.float32)
    mean = tl.zeros([BLOCK_G], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
    for offset in range(start, end, BLOCK):
        e = offset + tl.arange(0, BLOCK)
        emask = e < end
        # Walk the group in memory order: channels innermost for channels-last tensors, pixels otherwise.
        if CHANNELS_INNER:
            c = e % cpg
            p = e // cpg
        else:
            c = e // HW
            p = e % HW
        mask = gmask[:, None] & emask[None, :]
        inner = c * stride_c + _pixel_offset(p, W, stride_h, stride_w, FLAT)
        x = tl.load(x_ptr + group_base[:, None] + inner[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            x += tl.load(add_ptr + add_base[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        n = tl.sum(emask.to(tl.float32), axis=0)
        block_mean = tl.sum(tl.where(mask, x, 0.0), axis=1) / n
        d = tl.where(mask, x - block_mean[:, None], 0.0)
        total = count + n
        delta = block_mean - mean
        mean += delta * (n / total)
        m2 += tl.sum(d * d, axis=1) + delta * delta * (count * n / total)
        count = total
    if SPLIT == 1:
        _write_scale_shift(
            bg, gmask, mean, m2 / count, weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, C, G, cpg, eps,
            HAS_ADD, BLOCK_CPG,
        )  # fmt: skip
    else:
        base = part_ptr + (bg * SPLIT + part) * 3
        tl.store(base, count, mask=gmask)
        tl.store(base + 1, mean, mask=gmask)
        tl.store(base + 2, m2, mask=gmask)


@triton.jit
def _group_merge_kernel(
    part_ptr, add_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, C, G, NG, cpg, eps,
    HAS_ADD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr,
):  # fmt: skip
    bg = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = bg < NG
    base = part_ptr + (bg[:, None] * SPLIT + tl.arange(0, SPLIT)[None, :]) * 3
    counts = tl.load(base, mask=gmask[:, None], other=1.0)
    means = tl.load(base + 1, mask=gmask[:, None], other=0.0)
    total = tl.sum(counts, axis=1)
    mean = tl.sum(counts * means, axis=1) / total
    d = means - mean[:, None]
    m2 = tl.sum(tl.load(base + 2, mask=gmask[:, None], other=0.0) + counts * d * d, axis=1)
    _write_scale_shift(
        bg, gmask, mean, m2 / total, weight_ptr, bias_ptr, add_ptr, scale_ptr, shift_ptr, C, G, cpg, eps,
        HAS_ADD, BLOCK_CPG,
    )  # fmt: skip


@triton.jit
def _scale_shift_act_kernel(
    x_ptr, scale_ptr, shift_ptr, y_ptr, C, W, HW,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    ACT: tl.constexpr, FLAT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (p < HW)[:, None] & cmask[None, :]
    x_pixels = _pixel_offset(p, W, sxh, sxw, FLAT)[:, None]
    x = tl.load(x_ptr + b * sxb + c[None, :] * sxc + x_pixels, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * C + c, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0)
    y = x * scale[None, :] + shift[None, :]
    if ACT == ACT_SILU:
        y = y * tl.sigmoid(y)
    y_pixels = _pixel_offset(p, W, syh, syw, FLAT)[:, None]
    tl.store(y_ptr + b * syb + c[None, :] * syc + y_pixels, y.to(y_ptr.dtype.element_ty), mask=mask)


def _flat_pixels(*tensors: torch.Tensor) -> bool:
    """Whether rows and columns of every tensor merge into one pixel axis (both standard layouts do)."""
    return all(t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in tensors)


def group_norm_scale_shift(
    x: torch.Tensor, norm: nn.GroupNorm, add: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(scale, shift)`` of shape (B, C) with ``norm(x + add[:, :, None, None]) == x * scale + shift``.

    x: (B, C, H, W) in any memory layout; add: (B, C) or None.
    """
    rt.check_device(x)
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    cpg = channels // groups
    group_numel = cpg * height * width
    weight = norm.weight if norm.affine else torch.ones(channels, device=x.device, dtype=x.dtype)
    bias = norm.bias if norm.affine else torch.zeros(channels, device=x.device, dtype=x.dtype)
    add = add.expand(batch, channels).contiguous() if add is not None else None
    scale = torch.empty(batch, channels, device=x.device, dtype=torch.float32)
    shift = torch.empty_like(scale)
    split = min(64, rt.pow2(rt.cdiv(group_numel, _CHUNK)))
    chunk = rt.cdiv(group_numel, split)
    parts = torch.empty(batch * groups * split * 3 if split > 1 else 1, device=x.device, dtype=torch.float32)
    block = min(rt.TILE, rt.pow2(chunk))
    block_g = min(rt.pow2(batch * groups), rt.TILE // block) if rt.INTERPRETED else 1
    add_or_any = add if add is not None else scale  # a pointer the kernel never reads without HAS_ADD
    meta = dict(HAS_ADD=add is not None, SPLIT=split, BLOCK_G=block_g, BLOCK_CPG=rt.pow2(cpg))
    rt.launch(
        _group_stats_kernel,
        (rt.cdiv(batch * groups, block_g), split),
        (x, add_or_any, weight, bias, parts, scale, shift, channels, groups, batch * groups, width,
         height * width, cpg, group_numel, chunk, *x.stride(), norm.eps),
        CHANNELS_INNER=rt.channels_inner(x), FLAT=_flat_pixels(x), BLOCK=block, **meta,
    )  # fmt: skip
    if split > 1:
        rt.launch(
            _group_merge_kernel,
            (rt.cdiv(batch * groups, block_g),),
            (parts, add_or_any, weight, bias, scale, shift, channels, groups, batch * groups, cpg, norm.eps),
            **meta,
        )
    return scale, shift


def scale_shift_act(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: str | None, channels_last: bool = False
) -> torch.Tensor:
    """``act(x * scale + shift)`` per (sample, channel); the output is channels-last if asked, else like ``x``."""
    batch, channels, height, width = x.shape
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    y = torch.empty_like(x, memory_format=memory_format)
    block_p, block_c = rt.pixel_channel_tile(x)
    grid = (batch, rt.cdiv(height * width, block_p), rt.cdiv(channels, block_c))
    rt.launch(
        _scale_shift_act_kernel,
        grid,
        (x, scale, shift, y, channels, width, height * width, *x.stride(), *y.stride()),
        ACT=rt.activation(act), FLAT=_flat_pixels(x, y), BLOCK_P=block_p, BLOCK_C=block_c,
    )  # fmt: skip
    return y


def group_norm_act(
    x: torch.Tensor,
    norm: nn.GroupNorm,
    act: str | None = "silu",
    add: torch.Tensor | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """``act(norm(x + add[:, :, None, None]))`` in two passes over ``x`` (statistics, then one write).

    ``channels_last=True`` writes the result channels-last whatever the input's layout: the transformer's
    ``flatten(2).transpose(1, 2)`` of it is then already contiguous, so its first Linear copies nothing.
    """
    scale, shift = group_norm_scale_shift(x, norm, add)
    return scale_shift_act(x, scale, shift, act, channels_last)
