"""Depthwise 3x3 convolution that normalises and activates its input as it loads it.

In the U-Net's separable ResBlock, PyTorch computes ``dw(silu(group_norm(h)))`` as GroupNorm (read h twice,
write it), SiLU (read, write) and the depthwise conv (read, write). Here the GroupNorm statistics come first
(``norm_act.group_norm_scale_shift``: one read), then this kernel reads ``h`` once more, applies
``silu(h * scale + shift)`` per tap in registers and writes only the convolution's output: 3 passes over the
activation instead of 7. In the tiny decoder's block the SiLU between the first pointwise and the second
depthwise conv folds in the same way (no scale/shift then).

The pointwise 1x1 convolution after it stays with cuBLAS/cuDNN: it is a GEMM over all channels of a pixel, and
fusing it needs ``tl.dot`` tiles tuned on the card, which this code has not had (see docs/kernels.md).

Zero padding applies to the normalised, activated input, as in PyTorch: out-of-image taps contribute 0, not
``silu(shift)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from . import _runtime as rt
from ._runtime import ACT_SILU


@triton.jit
def _depthwise3x3_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, y_ptr, C, H, W,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    HAS_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = p < H * W
    cmask = c < C
    h = p // W
    w = p % W
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + b * C + c, mask=cmask, other=0.0)[None, :]
        shift = tl.load(shift_ptr + b * C + c, mask=cmask, other=0.0)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    x_base = x_ptr + b * sxb + c[None, :] * sxc
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            ih = h + (dy - 1)
            iw = w + (dx - 1)
            inside = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            mask = inside[:, None] & cmask[None, :]
            v = tl.load(x_base + ih[:, None] * sxh + iw[:, None] * sxw, mask=mask, other=0.0).to(tl.float32)
            if HAS_AFFINE:
                v = v * scale + shift
            if ACT == ACT_SILU:
                v = v * tl.sigmoid(v)
            if HAS_AFFINE:
                v = tl.where(mask, v, 0.0)
            tap = tl.load(w_ptr + c * 9 + (dy * 3 + dx), mask=cmask, other=0.0).to(tl.float32)
            acc += v * tap[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + b * syb + c[None, :] * syc + h[:, None] * syh + w[:, None] * syw
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


def is_depthwise3x3(conv: nn.Module) -> bool:
    """Whether ``conv`` is what this kernel computes: 3x3, stride 1, padding 1, one filter per channel."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.groups == conv.in_channels == conv.out_channels
    )


def depthwise3x3(
    x: torch.Tensor,
    conv: nn.Conv2d,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: str | None = None,
) -> torch.Tensor:
    """``conv(act(x * scale + shift))`` with ``scale``/``shift`` fp32 (B, C) or None; output laid out like ``x``."""
    if not is_depthwise3x3(conv):
        raise ValueError(f"not a depthwise 3x3 convolution with padding 1: {conv}")
    rt.check_device(x)
    if (scale is None) != (shift is None):
        raise ValueError("give both scale and shift, or neither")
    batch, channels, height, width = x.shape
    y = torch.empty_like(x)
    weight = conv.weight.contiguous()
    block_p, block_c = rt.pixel_channel_tile(x)
    grid = (batch, rt.cdiv(height * width, block_p), rt.cdiv(channels, block_c))
    rt.launch(
        _depthwise3x3_kernel,
        grid,
        (x, weight, conv.bias if conv.bias is not None else weight,
         scale if scale is not None else weight, shift if shift is not None else weight, y,
         channels, height, width, *x.stride(), *y.stride()),
        HAS_BIAS=conv.bias is not None, HAS_AFFINE=scale is not None, ACT=rt.activation(act),
        BLOCK_P=block_p, BLOCK_C=block_c,
    )  # fmt: skip
    return y
