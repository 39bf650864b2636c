"""The forwards that call the kernels, and which module each one replaces.

Each replacement computes what the module's own forward (or hook method) computes, reading the same
parameters; ``snapgen.models.kernels.set_kernels`` binds them to the module instances, so classes, weights
and ``state_dict`` keys stay as they are. The kernels have no backward: with autograd recording, each
replacement runs the module's PyTorch code instead, so training through a model with kernels on still works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import Attention, RMSNorm
from ..blocks import FeedForward, ResBlock, SeparableConv2d, SpatialTransformer
from ..tiny_decoder import SeparableResBlock
from ..unet import SnapGenUNet
from .depthwise import depthwise3x3, is_depthwise3x3
from .geglu import geglu
from .norm_act import group_norm_act, group_norm_scale_shift
from .qk_norm_rope import qk_norm_rope


def _pytorch_path() -> bool:
    if torch.jit.is_tracing():
        # A trace would record none of the kernels' work and replay a wrong graph without a word.
        raise RuntimeError("a model with Triton kernels cannot be traced: set_kernels(model, 'torch') first")
    return torch.is_grad_enabled()


def _resblock_forward(self: ResBlock, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    if _pytorch_path():
        return ResBlock.forward(self, x, temb)
    t = self.time_proj(F.silu(temb))
    if isinstance(self.conv1, SeparableConv2d):
        # GroupNorm + SiLU become the depthwise conv's input transform; the time embedding folds into the
        # second norm's shift. The normalised activations are never written.
        scale, shift = group_norm_scale_shift(x, self.norm1)
        h = self.conv1[1](depthwise3x3(x, self.conv1[0], scale, shift, "silu"))
        scale, shift = group_norm_scale_shift(h, self.norm2, add=t)
        h = self.conv2[1](depthwise3x3(h, self.conv2[0], scale, shift, "silu"))
    else:
        h = self.conv1(group_norm_act(x, self.norm1, "silu"))
        h = self.conv2(group_norm_act(h, self.norm2, "silu", add=t))
    return self.skip(x) + h


def _feedforward_forward(self: FeedForward, x: torch.Tensor) -> torch.Tensor:
    if _pytorch_path():
        return FeedForward.forward(self, x)
    return self.proj_out(geglu(self.proj_in(x)))


def _rms(norm: nn.Module) -> tuple[torch.Tensor | None, float]:
    return (norm.weight, norm.eps) if isinstance(norm, RMSNorm) else (None, 0.0)


def _query_key_heads(self: Attention, q: torch.Tensor, k: torch.Tensor, rotary):
    if _pytorch_path() or (rotary is None and not isinstance(self.norm_q, RMSNorm)):
        return Attention.query_key_heads(self, q, k, rotary)
    q = qk_norm_rope(q, self.num_heads, self.head_dim, *_rms(self.norm_q), rotary)
    k = qk_norm_rope(k, self.num_kv_heads, self.head_dim, *_rms(self.norm_k), rotary)
    return q, k


def _token_group_norm(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    if _pytorch_path():
        return nn.GroupNorm.forward(self, x)
    # Channels-last out: the transformer's (B, H*W, C) token view of it is contiguous, so no copy follows.
    return group_norm_act(x, self, None, channels_last=True)


def _norm_out_silu(self: SnapGenUNet, h: torch.Tensor) -> torch.Tensor:
    if _pytorch_path():
        return SnapGenUNet.norm_out_silu(self, h)
    return group_norm_act(h, self.norm_out, "silu")


def _separable_block_forward(self: SeparableResBlock, x: torch.Tensor) -> torch.Tensor:
    if _pytorch_path():
        return SeparableResBlock.forward(self, x)
    return x + self.pw2(depthwise3x3(self.pw1(self.dw1(x)), self.dw2, act="silu"))


def patches(module: nn.Module) -> list[tuple[nn.Module, str, Callable]]:
    """(instance, attribute, function) for each method of ``module`` (or of a child) that a kernel replaces.

    Exact classes only: a subclass may compute something else under the same forward.
    """
    kind = type(module)
    if kind is ResBlock:
        separable = isinstance(module.conv1, SeparableConv2d)
        if not separable or (is_depthwise3x3(module.conv1[0]) and is_depthwise3x3(module.conv2[0])):
            return [(module, "forward", _resblock_forward)]
    elif kind is FeedForward and module.geglu:
        return [(module, "forward", _feedforward_forward)]
    elif kind is Attention:
        return [(module, "query_key_heads", _query_key_heads)]
    elif kind is SpatialTransformer and type(module.norm) is nn.GroupNorm:
        return [(module.norm, "forward", _token_group_norm)]
    elif kind is SnapGenUNet:
        return [(module, "norm_out_silu", _norm_out_silu)]
    elif kind is SeparableResBlock and type(module.act) is nn.SiLU and is_depthwise3x3(module.dw2):
        return [(module, "forward", _separable_block_forward)]
    return []
