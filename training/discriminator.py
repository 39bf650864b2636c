"""LADD's discriminator: small trainable heads on a frozen teacher's features, conditioned on noise.

Latent adversarial diffusion distillation (SD3-Turbo) never decodes to pixels. Real latents and
the student's few-step outputs are re-noised to the same flow time ``t'``; the frozen teacher
reads both, and a head on each of several of its blocks turns that block's map into real/fake
logits, one per location. The teacher's features at ``t'`` carry the text (through its
attention) and the noise level; each head additionally gets ``t'`` by FiLM, since what "real"
looks like changes with the noise level. The logits of all heads are concatenated and trained
with the hinge loss (``training/losses.py``).

By default the teacher is not a submodule here: its parameters belong to no optimizer and no
checkpoint, only the heads train, and the stage runs the teacher and hands the maps over. Frozen
features of a diffusion model may barely tell real latents from a good student's (measured in
docs/results.md); with a ``backbone`` (a trainable copy of the teacher) the features train with
the heads, in the discriminator's optimizer and checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from snapgen.models.blocks import timestep_sinusoids


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class DiscriminatorHead(nn.Module):
    """(B, C, h, w) teacher map + t-embedding -> (B, h*w) logits: conv3x3 - GN - FiLM - SiLU - conv1x1."""

    def __init__(self, channels: int, hidden: int, t_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(_groups(hidden), hidden, affine=False)
        self.film = nn.Linear(t_dim, 2 * hidden)
        self.out = nn.Conv2d(hidden, 1, 1)
        # Start as the unconditioned head: scale 1, shift 0.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, features: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(features.float()))
        scale, shift = self.film(t_emb)[:, :, None, None].chunk(2, dim=1)
        return self.out(torch.nn.functional.silu(h * (1 + scale) + shift)).flatten(1)


class LADDDiscriminator(nn.Module):
    """One head per chosen teacher layer; ``forward(layers, t) -> [(B, h_i * w_i)]``, one per head."""

    def __init__(
        self, layer_channels: Mapping[int, int], hidden: int = 64, t_dim: int = 128, backbone: nn.Module | None = None
    ):
        super().__init__()
        self.backbone = backbone  # trained with the heads when given; the stage calls it
        if not layer_channels:
            raise ValueError("LADD needs at least one teacher layer to put a head on")
        self.layers = [int(i) for i in layer_channels]
        self.t_dim = t_dim
        self.t_embed = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.heads = nn.ModuleDict(
            {str(i): DiscriminatorHead(c, hidden, t_dim) for i, c in layer_channels.items()}
        )

    def forward(self, layers: Mapping[int, torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        t_emb = self.t_embed(timestep_sinusoids(t, self.t_dim))
        return [self.heads[str(i)](layers[i], t_emb) for i in self.layers]
