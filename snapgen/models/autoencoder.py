"""A small autoencoder for small domains, and one loader for every latent decoder/encoder.

``SmallAutoencoder`` is for experiments where SD3's 84 M-parameter VAE is overkill (e.g.
128x128 images -> 16x16x4 latents, ~0.7 M params): plain full 3x3 convs and ResBlocks in
the encoder and decoder, deterministic latents (no KL term: the diffusion model only needs a
fixed, smooth latent space; the scale is fixed afterwards through ``scaling_factor``).

``load_decoder`` / ``load_encoder`` read a saved model directory (diffusers layout:
``config.json`` + ``diffusion_pytorch_model.safetensors``), dispatch on ``_class_name`` and
wrap the model so the pipeline and the training code treat every autoencoder alike:
``.decode(z_raw) -> images in [-1, 1]``, ``.encode(images) -> z_raw``, and plain float
``.scaling_factor`` / ``.shift_factor`` (diffusion latents are ``(z_raw - shift) * scale``).
"""

from __future__ import annotations

import json
import math
import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from snapgen.models.tiny_decoder import TinyDecoder


class ResBlock(nn.Module):
    """Pre-norm residual block with two full 3x3 convs (the classic VAE block, no attention)."""

    def __init__(self, channels: int, norm_num_groups: int):
        super().__init__()
        groups = math.gcd(norm_num_groups, channels)
        self.block = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _head(channels: int, out_channels: int, norm_num_groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.GroupNorm(math.gcd(norm_num_groups, channels), channels),
        nn.SiLU(),
        nn.Conv2d(channels, out_channels, 3, padding=1),
    )


class SmallEncoder(nn.Module):
    """Image -> raw latent: per resolution ResBlocks, then a stride-2 conv to the next width."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, ch in enumerate(block_out_channels):
            layers += [ResBlock(ch, norm_num_groups) for _ in range(layers_per_block)]
            if i + 1 < len(block_out_channels):
                layers.append(nn.Conv2d(ch, block_out_channels[i + 1], 3, stride=2, padding=1))
        self.blocks = nn.Sequential(*layers)
        self.head = _head(block_out_channels[-1], latent_channels, norm_num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.conv_in(x)))


class SmallDecoder(nn.Module):
    """Raw latent -> image: mirror of the encoder, nearest upsampling + 3x3 conv between widths."""

    def __init__(self, out_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups):
        super().__init__()
        widths = tuple(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, ch in enumerate(widths):
            layers += [ResBlock(ch, norm_num_groups) for _ in range(layers_per_block)]
            if i + 1 < len(widths):
                layers += [nn.Upsample(scale_factor=2.0), nn.Conv2d(ch, widths[i + 1], 3, padding=1)]
        self.blocks = nn.Sequential(*layers)
        self.head = _head(widths[-1], out_channels, norm_num_groups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.conv_in(z)))


class SmallAutoencoder(ModelMixin, ConfigMixin):
    r"""Deterministic convolutional autoencoder, default 128x128x3 -> 16x16x4 (~0.7 M params).

    Args:
        in_channels: image channels.
        latent_channels: latent channels.
        block_out_channels: widths per resolution, highest resolution first; the spatial
            factor is ``2 ** (len(block_out_channels) - 1)``.
        encoder_layers_per_block / decoder_layers_per_block: ResBlocks per resolution; the
            decoder gets more, as in diffusers' VAEs, since reconstruction is the harder half.
        norm_num_groups: GroupNorm groups (reduced to a divisor of each width).
        scaling_factor, shift_factor: latent normalisation, ``z = (z_raw - shift) * scale``.
            Set them after training from the latent statistics (``scale = 1 / std``).
        downsample_factor: optional check; always derived from ``block_out_channels``.

    ``decode`` returns images clamped to [-1, 1] in eval mode and unclamped in training mode
    (so the reconstruction loss has a gradient everywhere).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (32, 48, 64, 80),
        encoder_layers_per_block: int = 1,
        decoder_layers_per_block: int = 1,
        norm_num_groups: int = 16,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        downsample_factor: int | None = None,
    ):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        # Derived from the widths; stored so consumers (sampler, data code) can read it.
        factor = 2 ** (len(block_out_channels) - 1)
        if downsample_factor is not None and downsample_factor != factor:
            raise ValueError(
                f"downsample_factor={downsample_factor} does not match block_out_channels={block_out_channels}"
                f" (factor {factor}: one 2x step between consecutive widths)"
            )
        self.register_to_config(block_out_channels=block_out_channels, downsample_factor=factor)
        self.encoder = SmallEncoder(
            in_channels, latent_channels, block_out_channels, encoder_layers_per_block, norm_num_groups
        )
        self.decoder = SmallDecoder(
            in_channels, latent_channels, block_out_channels, decoder_layers_per_block, norm_num_groups
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> raw latents ``(B, latent_channels, H / f, W / f)``."""
        return self.encoder(x)

    def decode(self, z_raw: torch.Tensor) -> torch.Tensor:
        """Raw latents -> images (in [-1, 1] in eval mode)."""
        x = self.decoder(z_raw)
        return x if self.training else x.clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# --------------------------------------------------------------------------------------------
# One loader for every autoencoder
# --------------------------------------------------------------------------------------------

DECODER_CLASSES = ("TinyDecoder", "SmallAutoencoder", "AutoencoderKL", "AutoencoderTiny")
ENCODER_CLASSES = ("SmallAutoencoder", "AutoencoderKL", "AutoencoderTiny")
# diffusers' autoencoders are imported only when a directory names one: importing them pulls in most
# of diffusers' model zoo (seconds), which a tiny decoder or small autoencoder never needs.
DIFFUSERS_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def _model_class(class_name: str) -> type:
    if class_name == "TinyDecoder":
        return TinyDecoder
    if class_name == "SmallAutoencoder":
        return SmallAutoencoder
    if class_name == "AutoencoderKL":
        from diffusers import AutoencoderKL

        return AutoencoderKL
    if class_name == "AutoencoderTiny":
        from diffusers import AutoencoderTiny

        return AutoencoderTiny
    raise ValueError(f"unknown latent model class {class_name!r}; known: {', '.join(DECODER_CLASSES)}")


class _LatentCodec(nn.Module):
    """Shared part of the adapters: the wrapped model, its class name and latent normalisation."""

    def __init__(self, model: nn.Module, class_name: str, scaling_factor, shift_factor):
        super().__init__()
        self.model = model
        self.class_name = class_name
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else 1.0)
        # SDXL-style AutoencoderKL configs have shift_factor None: no shift.
        self.shift_factor = float(shift_factor if shift_factor is not None else 0.0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_diffusion(self, z_raw: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the normalised latents the diffusion model works in."""
        return (z_raw - self.shift_factor) * self.scaling_factor

    def from_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised diffusion latents -> raw latents for ``decode``."""
        return z / self.scaling_factor + self.shift_factor


class LatentDecoder(_LatentCodec):
    """Uniform decoder: ``decode(z_raw) -> Tensor`` in [-1, 1], whatever the wrapped class."""

    def decode(self, z_raw: torch.Tensor) -> torch.Tensor:
        if self.class_name in DIFFUSERS_CLASSES:
            x = self.model.decode(z_raw, return_dict=False)[0]
        else:  # TinyDecoder.decode, or the decoder half of a SmallAutoencoder
            x = self.model(z_raw)
        return x.clamp(-1.0, 1.0)

    def forward(self, z_raw: torch.Tensor) -> torch.Tensor:
        return self.decode(z_raw)


class LatentEncoder(_LatentCodec):
    """Uniform encoder: ``encode(images in [-1, 1]) -> z_raw``.

    For an ``AutoencoderKL`` the posterior mode is returned unless ``sample=True``.
    """

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        if self.class_name == "AutoencoderKL":
            dist = self.model.encode(x, return_dict=False)[0]
            return dist.sample(generator) if sample else dist.mode()
        if self.class_name == "AutoencoderTiny":
            return self.model.encode(x, return_dict=False)[0]
        return self.model.encode(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


def _read_class_name(path: str | os.PathLike, subfolder: str | None) -> tuple[str, str]:
    folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No config.json in {folder!r}: not a saved autoencoder directory")
    with open(config_file, encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name")
    return folder, class_name


def _load(path, subfolder, torch_dtype, allowed: tuple[str, ...], role: str):
    folder, class_name = _read_class_name(path, subfolder)
    if class_name not in allowed:
        raise ValueError(
            f"Cannot load {class_name!r} from {folder!r} as a latent {role}; allowed: {', '.join(allowed)}"
        )
    # Local directory + safetensors only: never a network call, never a pickle.
    model = _model_class(class_name).from_pretrained(folder, torch_dtype=torch_dtype, use_safetensors=True)
    return model.eval().requires_grad_(False), class_name


def latent_class_name(path: str | os.PathLike) -> str:
    """The ``_class_name`` a saved autoencoder or decoder directory names."""
    return _read_class_name(path, None)[1]


def load_latent_model(path: str | os.PathLike, allowed: tuple[str, ...] = DECODER_CLASSES, role: str = "decoder"):
    """The directory's own ModelMixin, unwrapped (what ``save_model`` copies into a model directory)."""
    return _load(path, None, None, allowed, role)[0]


def load_decoder(
    path: str | os.PathLike, torch_dtype: torch.dtype | None = None, subfolder: str | None = None
) -> LatentDecoder:
    """Load any supported decoder from a local directory, frozen and in eval mode.

    Supports ``TinyDecoder``, ``SmallAutoencoder`` (only its decoder half is kept),
    ``AutoencoderKL`` and ``AutoencoderTiny``.
    """
    model, class_name = _load(path, subfolder, torch_dtype, DECODER_CLASSES, "decoder")
    cfg = model.config
    if class_name == "SmallAutoencoder":
        model = model.decoder  # drop the encoder: half the memory, nothing the sampler needs
    return LatentDecoder(model, class_name, cfg.scaling_factor, getattr(cfg, "shift_factor", None)).eval()


def load_encoder(
    path: str | os.PathLike, torch_dtype: torch.dtype | None = None, subfolder: str | None = None
) -> LatentEncoder:
    """Load any supported encoder (``SmallAutoencoder``, ``AutoencoderKL``, ``AutoencoderTiny``)."""
    model, class_name = _load(path, subfolder, torch_dtype, ENCODER_CLASSES, "encoder")
    cfg = model.config
    if class_name == "SmallAutoencoder":
        model.decoder = None  # keep the encode() method, drop the decoder's weights
    return LatentEncoder(model, class_name, cfg.scaling_factor, getattr(cfg, "shift_factor", None)).eval()
