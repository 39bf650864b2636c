"""The generation recipe, written once: encode text -> portable noise -> timesteps -> guided Euler -> decode.

Everything that makes images calls :func:`generate`: the pipeline, the server's backends (in process,
or with the three models on a Triton server) and the trainer's sample grids. They differ only in how
the three model stages run, which they provide as :class:`GenerationStages`:

    encode_text(prompts) -> TextEmbeddings
    unet_velocity(latents, t, text) -> velocity     (every step; what a Triton backend sends away)
    decode(latents) -> pixels in [-1, 1]            (diffusion latents in)

The images then depend only on the request and the weights: image ``i`` starts from the portable
noise of ``request.seeds[i]``, so the same seed gives the same image from every front door.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .noise import randn_tensor
from .request import ResolvedRequest
from .sampling import SamplerConfig, cfg_velocity, guided, sample_euler
from .text import TextEmbeddings

StepCallback = Callable[[int, int, torch.Tensor], None]


class GenerationStages(Protocol):
    sampler: SamplerConfig
    latent_channels: int
    latent_factor: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode_text(self, prompts: list[str]) -> TextEmbeddings: ...

    def unet_velocity(self, latents: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Generated:
    latents: torch.Tensor
    pixels: torch.Tensor | None  # (B, 3, H, W) in [-1, 1]; None when not decoded
    timings: dict[str, float] = field(default_factory=dict)  # text_s, unet_s, decode_s, total_s


@torch.no_grad()
def generate(
    stages: GenerationStages,
    request: ResolvedRequest,
    on_step: StepCallback | None = None,
    decode: bool = True,
) -> Generated:
    """Run ``request`` on ``stages``. ``on_step(step, steps, latents)`` after every step; raising from it stops.

    The unconditional text (the negative prompts) is encoded only when guidance needs it.
    """
    start = time.perf_counter()
    prompts = list(request.prompts)
    cond = stages.encode_text(prompts)
    uncond = stages.encode_text(list(request.negative_prompts)) if request.guidance_scale != 1.0 else None
    text_done = time.perf_counter()

    f = stages.latent_factor
    shape = (stages.latent_channels, request.height // f, request.width // f)
    noise = randn_tensor(list(request.seeds), shape, device=stages.device, dtype=stages.dtype)
    timesteps = stages.sampler.timesteps(request.steps, request.height, request.width)
    velocity = guided(cfg_velocity(stages.unet_velocity, cond, uncond), request.guidance_scale)
    latents = sample_euler(velocity, noise, timesteps, on_step)
    unet_done = time.perf_counter()

    pixels = stages.decode(latents) if decode else None
    end = time.perf_counter()
    timings = {"text_s": text_done - start, "unet_s": unet_done - text_done, "decode_s": end - unet_done,
               "total_s": end - start}  # fmt: skip
    return Generated(latents=latents, pixels=pixels, timings=timings)


def to_uint8(pixels: torch.Tensor) -> list[np.ndarray]:
    """Images in [-1, 1], (B, 3, H, W) -> list of uint8 (H, W, 3) arrays."""
    scaled = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(scaled.permute(0, 2, 3, 1).cpu().numpy())
