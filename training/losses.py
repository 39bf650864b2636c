"""The losses of the recipe's own stages, each stated once.

Knowledge distillation (output/feature KD, timestep-aware scaling) lives in
``training/distillation.py``; the flow math itself (paths, targets, timestep densities) in
``snapgen/flow.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snapgen.flow import velocity_target

from .config import ConfigError


def flow_matching_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample rectified-flow loss ``|v - (eps - x0)|^2`` (mean over all but the batch), shape (B,)."""
    target = velocity_target(x0.float(), noise.float())
    return (prediction.float() - target).pow(2).flatten(1).mean(dim=1)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake logits below -1."""
    return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: raise the discriminator's logits on generated samples."""
    return -fake_logits.float().mean()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean per-image PSNR in dB; images in [-1, 1] have ``data_range`` 2."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return (10.0 * torch.log10(data_range**2 / mse)).mean()


class RandomFeaturePerceptual(nn.Module):
    """A perceptual distance from a fixed, randomly initialised conv net (no weights to download).

    LPIPS needs pretrained VGG/AlexNet weights, which are not available offline here. Features of
    a random ReLU conv net still respond to local structure (edges, texture, blur) at several
    scales, which is what the pixel MSE misses (it rewards blurry averages); see Ulyanov et al.
    (Deep Image Prior) and He, Wang & Hopcroft 2016 on random-weight networks as image priors.
    As in LPIPS, each level's features are unit-normalised across channels before comparing, so
    every level counts alike whatever its activation scale. The weights come from a fixed seed
    and are never trained, so the loss is the same function in every run.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        levels, channels = [], 3
        for i, width in enumerate(widths):
            conv1 = nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1)
            conv2 = nn.Conv2d(width, width, 3, padding=1)
            for conv in (conv1, conv2):
                fan_in = conv.in_channels * 9
                with torch.no_grad():
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                    conv.bias.zero_()
            levels.append(nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU()))
            channels = width
        self.levels = nn.ModuleList(levels)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros((), dtype=torch.float32)
        fx, fy = x, y
        for level in self.levels:
            fx, fy = level(fx), level(fy)
            diff = F.normalize(fx.float(), dim=1) - F.normalize(fy.float(), dim=1)
            loss = loss + diff.pow(2).sum(dim=1).mean()
        return loss / len(self.levels)


class LPIPSPerceptual(nn.Module):
    """LPIPS (Zhang et al. 2018) through the ``lpips`` package, when it and its weights are installed."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        try:
            import lpips
        except ImportError:
            raise ConfigError(
                "perceptual: lpips needs the `lpips` package and its pretrained weights available locally; "
                "they are not installed here, use perceptual: random"
            ) from None
        try:
            self.model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
        except Exception as e:  # its backbone weights are fetched on first use
            raise ConfigError(f"perceptual: lpips could not load its {net} weights offline ({e}); use random") from None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x.float(), y.float()).mean()


def build_perceptual(kind: str) -> nn.Module:
    if kind == "lpips":
        return LPIPSPerceptual()
    if kind == "random":
        return RandomFeaturePerceptual()
    raise ConfigError(f"unknown perceptual loss {kind!r}; choose random or lpips")
