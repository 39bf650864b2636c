"""Exponential moving average of a model's weights: the weights a diffusion model ships with."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import EMAConfig


class EMA:
    """``shadow = d * shadow + (1 - d) * weights`` after every step.

    With ``warmup`` the decay ramps as ``min(decay, (1 + step) / (10 + step))``: early on the
    shadow follows the weights closely instead of averaging in the random initialisation for
    ~1 / (1 - decay) steps, which would dominate a short run.
    The shadow is a frozen copy (``.module``) that checkpoints save like any module; buffers
    (e.g. norm statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, config: EMAConfig):
        self.config = config
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        if not self.config.warmup:
            return self.config.decay
        return min(self.config.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        for s, p in zip(self.module.parameters(), model.parameters()):
            s.lerp_(p.detach().to(s.dtype), 1.0 - decay)
        for s, b in zip(self.module.buffers(), model.buffers()):
            s.copy_(b)
