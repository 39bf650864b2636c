"""The SnapGen U-Net: an efficient text-conditioned U-Net predicting rectified-flow velocity.

Every design step of the paper is a config switch, so the ablation ladder from an SDXL-like
U-Net to SnapGen is a sequence of configs of this one class (see ``configs.py``):

=====================  ==============================  =========================
paper step             config                           SDXL-like -> SnapGen
=====================  ==============================  =========================
widths / depths        block_out_channels,              320/640/1280, 0/2/10 ->
                       transformer_depth                256/512/896, 0/2/4
no SA at high res      self_attention                   all True -> (F, F, T)
separable ResBlocks    separable_conv, conv_expansion   False -> True, 2
FFN ratio              ffn_mult                         4 -> 3
multi-query attention  num_kv_heads                     None (MHA) -> 1
first-stage CA + FFN   transformer_depth[0]             0 -> 1 (no self-attention)
QK-RMSNorm, 2-D RoPE   qk_norm, rope                    False -> True
=====================  ==============================  =========================

Conditioning: the flow time ``t`` in [0, 1] is embedded as sinusoids of ``1000 t`` followed by
an MLP; the pooled text embedding, when the text encoders give one, goes through its own MLP
and is added to the timestep embedding (SDXL's "added conditioning"); the per-token text
embeddings are the keys/values of every cross-attention, with padding masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .blocks import Downsample, ResBlock, SpatialTransformer, Upsample, timestep_sinusoids


@dataclass
class SnapGenUNetOutput(BaseOutput):
    sample: torch.Tensor
    features: torch.Tensor | None = None


def _per_stage(value, stages: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * stages
    if len(values) != stages:
        raise ValueError(f"{name} has {len(values)} entries but there are {stages} stages")
    return values


class _Stage(nn.Module):
    """One resolution level: ResBlocks, each optionally followed by a spatial transformer."""

    def __init__(self, resnets: list[nn.Module], transformers: list[nn.Module] | None, resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.transformers = nn.ModuleList(transformers) if transformers else None
        self.resample = resample


class SnapGenUNet(ModelMixin, ConfigMixin):
    """U-Net ``(latents, t, text) -> velocity``; see the module docstring for the switches."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        block_out_channels: tuple[int, ...] = (256, 512, 896),
        layers_per_block: int | tuple[int, ...] = 2,
        transformer_depth: tuple[int, ...] = (1, 2, 4),
        self_attention: tuple[bool, ...] = (False, False, True),
        mid_transformer_depth: int = 4,
        attention_head_dim: int = 64,
        num_kv_heads: int | None = 1,
        cross_attention_dim: int = 2304,
        pooled_projection_dim: int | None = 2048,
        separable_conv: bool = True,
        conv_expansion: int = 2,
        ffn_mult: float = 3.0,
        ffn_activation: str = "gelu",
        qk_norm: bool = True,
        rope: bool = True,
        rope_theta: float = 10000.0,
        norm_num_groups: int = 32,
        timestep_scale: float = 1000.0,
    ):
        super().__init__()
        stages = len(block_out_channels)
        layers = _per_stage(layers_per_block, stages, "layers_per_block")
        depths = _per_stage(transformer_depth, stages, "transformer_depth")
        self_attn = _per_stage(self_attention, stages, "self_attention")
        base = block_out_channels[0]
        temb_dim = 4 * base
        self.gradient_checkpointing = False

        self.time_embedding = nn.Sequential(nn.Linear(base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.pooled_embedding = (
            nn.Sequential(nn.Linear(pooled_projection_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
            if pooled_projection_dim
            else None
        )

        def resblock(cin, cout):
            return ResBlock(cin, cout, temb_dim, separable_conv, conv_expansion, norm_num_groups)

        def transformer(channels, depth, with_self_attention):
            return SpatialTransformer(
                channels,
                depth,
                attention_head_dim,
                num_kv_heads,
                cross_attention_dim,
                with_self_attention,
                qk_norm,
                rope,
                rope_theta,
                ffn_mult,
                ffn_activation,
                norm_num_groups,
            )

        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)

        skip_channels = [base]
        channels = base
        self.down_stages = nn.ModuleList()
        for i, width in enumerate(block_out_channels):
            resnets, transformers = [], []
            for _ in range(layers[i]):
                resnets.append(resblock(channels, width))
                channels = width
                if depths[i]:
                    transformers.append(transformer(width, depths[i], self_attn[i]))
                skip_channels.append(width)
            last = i == stages - 1
            self.down_stages.append(_Stage(resnets, transformers, None if last else Downsample(width)))
            if not last:
                skip_channels.append(width)

        self.mid_resnets = nn.ModuleList([resblock(channels, channels), resblock(channels, channels)])
        self.mid_transformer = (
            transformer(channels, mid_transformer_depth, self_attn[-1]) if mid_transformer_depth else None
        )

        self.up_stages = nn.ModuleList()
        for i in reversed(range(stages)):
            width = block_out_channels[i]
            resnets, transformers = [], []
            for _ in range(layers[i] + 1):
                resnets.append(resblock(channels + skip_channels.pop(), width))
                channels = width
                if depths[i]:
                    transformers.append(transformer(width, depths[i], self_attn[i]))
            self.up_stages.append(_Stage(resnets, transformers, Upsample(width) if i > 0 else None))

        self.norm_out = nn.GroupNorm(min(norm_num_groups, base), base)
        self.conv_out = nn.Conv2d(base, out_channels, 3, padding=1)

    def norm_out_silu(self, h: torch.Tensor) -> torch.Tensor:
        """The output head's GroupNorm + SiLU: a method of its own so ``snapgen.models.kernels`` can fuse it."""
        return F.silu(self.norm_out(h))

    def _run(self, module: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        return_features: bool = False,
        return_dict: bool = True,
    ):
        """Predict the velocity ``eps - x_0`` at flow time ``timestep`` (in [0, 1], 1 = pure noise).

        sample: (B, C, H, W) latents; H and W divisible by 2 ** (stages - 1).
        encoder_hidden_states: (B, L, cross_attention_dim); encoder_attention_mask: (B, L), 1/True
        for real tokens. pooled_projections: (B, pooled_projection_dim) when the config has one.
        ``return_features`` also returns the last decoder feature map (B, C0, H, W), which
        feature-level knowledge distillation matches against the teacher.
        """
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):  # a tensor stays an input when the U-Net is traced
            timestep = torch.tensor(timestep)
        timestep = timestep.to(device=sample.device, dtype=torch.float32)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        temb = timestep_sinusoids(timestep, self.config.block_out_channels[0], self.config.timestep_scale)
        temb = self.time_embedding(temb.to(sample.dtype))
        if self.pooled_embedding is not None:
            if pooled_projections is None:
                raise ValueError("this U-Net is conditioned on a pooled text embedding: pass pooled_projections")
            temb = temb + self.pooled_embedding(pooled_projections.to(sample.dtype))

        context = encoder_hidden_states.to(sample.dtype)
        context_bias = None
        if encoder_attention_mask is not None:
            # Additive bias; -1e4 rather than -inf keeps fp16 finite and rows never all-masked NaN.
            keep = encoder_attention_mask.to(sample.dtype)
            context_bias = ((1.0 - keep) * -10000.0)[:, None, None, :]

        h = self.conv_in(sample)
        skips = [h]
        for stage in self.down_stages:
            for j, resnet in enumerate(stage.resnets):
                h = self._run(resnet, h, temb)
                if stage.transformers is not None:
                    h = self._run(stage.transformers[j], h, context, context_bias)
                skips.append(h)
            if stage.resample is not None:
                h = stage.resample(h)
                skips.append(h)

        h = self._run(self.mid_resnets[0], h, temb)
        if self.mid_transformer is not None:
            h = self._run(self.mid_transformer, h, context, context_bias)
        h = self._run(self.mid_resnets[1], h, temb)

        for stage in self.up_stages:
            for j, resnet in enumerate(stage.resnets):
                h = self._run(resnet, torch.cat([h, skips.pop()], dim=1), temb)
                if stage.transformers is not None:
                    h = self._run(stage.transformers[j], h, context, context_bias)
            if stage.resample is not None:
                h = stage.resample(h)

        features = h
        out = self.conv_out(self.norm_out_silu(h))
        if not return_dict:
            return (out, features) if return_features else (out,)
        return SnapGenUNetOutput(sample=out, features=features if return_features else None)
