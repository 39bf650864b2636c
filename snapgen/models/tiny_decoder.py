"""SnapGen's tiny latent decoder.

The paper replaces the SD3/SDXL VAE decoder (~50 M params, full 3x3 convs, attention, a
GroupNorm before every conv) with a ~1.4 M-parameter decoder that is 36-54x faster at
competitive PSNR: no attention, minimal GroupNorm, thin channels, separable convolutions.
The exact layout is not published; this is our reading of those four rules:

* Almost all parameters sit at the latent resolution, where a pixel is cheap; the widths
  then shrink fast (320 -> 128 -> 32 -> 16 for factor 8), so the full-resolution stage (the
  one that dominates TAESD's cost: 64 channels of full 3x3 convs at 512x512) is a 16-channel
  map and one 3x3 output conv.
* Residual blocks are the SnapGen U-Net's separable block: depthwise 3x3 -> pointwise
  (x2 expansion) -> SiLU -> depthwise 3x3 -> pointwise. No normalisation inside them.
* A single GroupNorm right after the input conv, at the lowest resolution where it costs
  nothing, keeps activations well scaled whatever the latent statistics.
* Widths are reduced by a 1x1 conv *before* each nearest-neighbour upsampling, so the
  channel-mixing work happens on 4x fewer pixels.

The decoder takes raw autoencoder latents ``z_raw`` (what ``AutoencoderKL.decode`` takes).
Diffusion latents follow the SD3 convention ``z = (z_raw - shift_factor) * scaling_factor``;
the decoder applies that normalisation itself to its input (so its first conv sees
unit-variance inputs) and stores both numbers in its config, so a pipeline can read
``decoder.config.scaling_factor`` / ``decoder.config.shift_factor``.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# SD3's VAE latent statistics: the default decoder is a drop-in for SD3-style 16-ch latents.
SD3_SCALING_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609


# Widths per resolution, lowest first. Nearly all parameters (and so FLOPs) go to the latent
# resolution; above it the widths shrink faster than the pixel count grows, because on CPUs
# and phones the high-resolution stages are bound by memory traffic (channels x pixels),
# not by FLOPs. Measured at 64x64 -> 512 px on CPU, one 16-ch block at full resolution was
# ~20 % of the whole decoder's time, so the full-resolution stage has none.
_DEFAULT_WIDTHS = (320, 128, 32, 16)


def default_block_out_channels(upsample_factor: int) -> tuple[int, ...]:
    """(320, 128, 32, 16) for factor 8; shorter for smaller factors, 16 wide beyond."""
    num_ups = _num_upsamples(upsample_factor)
    widths = _DEFAULT_WIDTHS + (_DEFAULT_WIDTHS[-1],) * num_ups
    return widths[: num_ups + 1]


def default_layers_per_block(upsample_factor: int) -> tuple[int, ...]:
    """Three blocks at latent resolution, one per intermediate resolution, none at full resolution."""
    num_ups = _num_upsamples(upsample_factor)
    if num_ups == 0:
        return (3,)
    return (3,) + (1,) * (num_ups - 1) + (0,)


def _num_upsamples(upsample_factor: int) -> int:
    if upsample_factor < 1 or upsample_factor & (upsample_factor - 1):
        raise ValueError(f"upsample_factor must be a power of 2, got {upsample_factor}")
    return int(math.log2(upsample_factor))


class SeparableResBlock(nn.Module):
    """x + PW(DW(SiLU(PW_x2(DW(x))))): the SnapGen separable ResBlock, without its norm."""

    def __init__(self, channels: int, expansion: int = 2):
        super().__init__()
        hidden = channels * expansion
        self.dw1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pw1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.SiLU()
        self.dw2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.pw2 = nn.Conv2d(hidden, channels, 1)
        # Zero-init the last projection: every block starts as the identity, which keeps a
        # norm-free residual stack stable at initialisation.
        nn.init.zeros_(self.pw2.weight)
        nn.init.zeros_(self.pw2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.dw2(self.act(self.pw1(self.dw1(x)))))


class TinyDecoder(ModelMixin, ConfigMixin):
    r"""Latent -> RGB decoder, ~1.4 M params for 16-ch latents with factor 8 (the default).

    Args:
        latent_channels: channels of the latent it decodes.
        upsample_factor: spatial factor latent -> image, a power of 2.
        block_out_channels: width per resolution, lowest first (``log2(upsample_factor) + 1``
            entries). ``None``: 320/128/32/16 for factor 8.
        layers_per_block: separable ResBlocks per resolution, lowest first (0 allowed).
            ``None``: 3/1/1/0 for factor 8.
        norm_num_groups: groups of the single GroupNorm (after the input conv).
        scaling_factor, shift_factor: latent normalisation of the autoencoder this decoder
            was trained against (diffusion latents are ``(z_raw - shift) * scale``).

    ``decode``/``forward`` take raw latents and return images in [-1, 1]. In training mode the
    output is not clamped, so reconstruction losses keep a gradient everywhere.
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        upsample_factor: int = 8,
        block_out_channels: tuple[int, ...] | None = None,
        layers_per_block: tuple[int, ...] | None = None,
        norm_num_groups: int = 32,
        out_channels: int = 3,
        scaling_factor: float = SD3_SCALING_FACTOR,
        shift_factor: float = SD3_SHIFT_FACTOR,
    ):
        super().__init__()
        num_ups = _num_upsamples(upsample_factor)
        if block_out_channels is None:
            block_out_channels = default_block_out_channels(upsample_factor)
        if layers_per_block is None:
            layers_per_block = default_layers_per_block(upsample_factor)
        block_out_channels, layers_per_block = tuple(block_out_channels), tuple(layers_per_block)
        if len(block_out_channels) != num_ups + 1 or len(layers_per_block) != num_ups + 1:
            raise ValueError(
                f"upsample_factor={upsample_factor} needs {num_ups + 1} entries in block_out_channels "
                f"and layers_per_block, got {block_out_channels} and {layers_per_block}"
            )
        # Store the resolved layout, so a saved config rebuilds exactly this network.
        self.register_to_config(block_out_channels=block_out_channels, layers_per_block=layers_per_block)

        width = block_out_channels[0]
        # A full 3x3 conv here is cheap (lowest resolution, few input channels) and mixes
        # neighbouring latents before the separable stack.
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.norm_in = nn.GroupNorm(math.gcd(norm_num_groups, width), width)
        self.act = nn.SiLU()

        self.stages = nn.ModuleList()
        for i, (ch, n) in enumerate(zip(block_out_channels, layers_per_block, strict=True)):
            layers: list[nn.Module] = []
            if i > 0:
                # Narrow first (1x1 conv on the small map), then upsample: 4x cheaper than the
                # other way round. Nearest upsampling has no parameters and no checkerboard.
                layers += [nn.Conv2d(block_out_channels[i - 1], ch, 1), nn.Upsample(scale_factor=2.0)]
            layers += [SeparableResBlock(ch) for _ in range(n)]
            self.stages.append(nn.Sequential(*layers))

        self.conv_out = nn.Conv2d(block_out_channels[-1], out_channels, 3, padding=1)

    @classmethod
    def for_latents(cls, latent_channels: int = 4, upsample_factor: int = 8, **kwargs) -> TinyDecoder:
        """A small-domain decoder, e.g. 16x16x4 -> 128 px, for a ``SmallAutoencoder``'s latents.

        Widths 128 halved per upsampling (floor 16), two blocks at the latent resolution and
        one at every other (at 128 px a full-resolution block is affordable); unit latent
        normalisation unless given. ``kwargs`` override any field.
        """
        num_ups = _num_upsamples(upsample_factor)
        config = {
            "block_out_channels": tuple(max(128 >> i, 16) for i in range(num_ups + 1)),
            "layers_per_block": (2,) + (1,) * num_ups,
            "norm_num_groups": 16,
            "scaling_factor": 1.0,
            "shift_factor": 0.0,
        }
        config.update(kwargs)
        return cls(latent_channels=latent_channels, upsample_factor=upsample_factor, **config)

    def decode(self, z_raw: torch.Tensor) -> torch.Tensor:
        """Raw latents ``(B, latent_channels, h, w)`` -> images ``(B, 3, h * f, w * f)`` in [-1, 1]."""
        h = (z_raw - self.config.shift_factor) * self.config.scaling_factor
        # Channels-last lets oneDNN (CPU) and cuDNN run depthwise/pointwise convs without
        # re-layouting every activation: measured ~2x faster on CPU at 512 px.
        h = h.contiguous(memory_format=torch.channels_last)
        h = self.act(self.norm_in(self.conv_in(h)))
        for stage in self.stages:
            h = stage(h)
        x = self.conv_out(h).contiguous()
        return x if self.training else x.clamp(-1.0, 1.0)

    def forward(self, z_raw: torch.Tensor) -> torch.Tensor:
        return self.decode(z_raw)
