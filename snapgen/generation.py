"""The generation recipe, written once: encode text -> portable noise -> timesteps -> guided Euler -> decode.

Everything that makes images calls :func:`generate`: the pipeline, the server's backends (in process,
or with the three models on a Triton server) and the trainer's sample grids. They differ only in how
the three model stages run, which they provide as :class:`GenerationStages`:

    encode_text(prompts) -> TextEmbeddings
    unet_velocity(latents, t, text) -> velocity     (every step; what a Triton backend sends away)
    decode(latents) -> pixels in [-1, 1]            (diffusion latents in)

The images then depend only on the request and the weights: image ``i`` starts from the portable
noise of ``request.seeds[i]``, so the same seed gives the same image from every front door.

Image-to-image (SDEdit on the straight path): the input's latents ``x0`` are moved to flow time ``t``
by ``x_t = (1 - t) x0 + t eps`` and sampled back to 0 along the rest of the schedule. ``t`` is the
time of the request's schedule nearest ``strength`` (for a step-distilled model, one of the times it
was distilled for), 0 included: a strength near 0 runs no step and returns the input's latents.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .flow import interpolate
from .noise import randn_tensor
from .request import ResolvedRequest
from .sampling import SamplerConfig, StepCallback, cfg_velocity, guided, sample_euler
from .text import TextEmbeddings


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
    noise: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    on_x0: StepCallback | None = None,
) -> Generated:
    """Run ``request`` on ``stages``. ``on_step(step, steps, latents)`` after every step: raising from it
    stops, returning a tensor replaces the latents. ``on_x0(step, steps, x0)``, before it, gets the step's
    estimate of the final latents (what a live preview decodes): on the straight path from ``x_t`` with
    velocity ``v``, ``x0 = x_t - t v``, the same as the latents after the step minus ``t_next v``.

    ``noise`` replaces the portable noise of the seeds (a caller's own starting latents); ``image_latents``
    (diffusion latents, one per image) are the input of an image-to-image request (``request.strength``).
    The unconditional text (the negative prompts) is encoded only when guidance needs it.
    """
    start = time.perf_counter()
    prompts = list(request.prompts)
    cond = stages.encode_text(prompts)
    uncond = stages.encode_text(list(request.negative_prompts)) if request.guidance_scale != 1.0 else None
    text_done = time.perf_counter()

    f = stages.latent_factor
    shape = (request.images, stages.latent_channels, request.height // f, request.width // f)
    if noise is None:
        noise = randn_tensor(list(request.seeds), shape[1:], device=stages.device, dtype=stages.dtype)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"the starting latents have shape {tuple(noise.shape)}; this request needs {shape}")
    noise = noise.to(device=stages.device, dtype=stages.dtype)
    timesteps = stages.sampler.timesteps(request.steps, request.height, request.width)
    x_start = noise
    if request.strength is not None:
        if image_latents is None or tuple(image_latents.shape) != shape:
            raise ValueError(f"an image-to-image request needs the input's latents, shape {shape}")
        timesteps = timesteps[image_to_image_start(timesteps, request.strength) :]
        x_start = interpolate(image_latents.to(device=stages.device, dtype=stages.dtype), noise, float(timesteps[0]))
    velocity = guided(cfg_velocity(stages.unet_velocity, cond, uncond), request.guidance_scale)
    if on_x0 is not None:
        velocity, on_step = _with_x0_estimate(velocity, timesteps, on_step, on_x0)
    latents = sample_euler(velocity, x_start, timesteps, on_step)
    unet_done = time.perf_counter()

    pixels = stages.decode(latents) if decode else None
    end = time.perf_counter()
    timings = {"text_s": text_done - start, "unet_s": unet_done - text_done, "decode_s": end - unet_done,
               "total_s": end - start}  # fmt: skip
    return Generated(latents=latents, pixels=pixels, timings=timings)


def _with_x0_estimate(velocity, timesteps: torch.Tensor, on_step, on_x0):
    """``velocity`` that remembers its last output, and a step callback that reports ``x0`` from it first."""
    last = {}

    def remembering(x, t):
        last["v"] = velocity(x, t)
        return last["v"]

    def step_callback(step, steps, x):
        t_next = float(timesteps[step])
        on_x0(step, steps, (x.float() - t_next * last["v"].float()).to(x.dtype))
        return None if on_step is None else on_step(step, steps, x)

    return remembering, step_callback


def image_to_image_start(timesteps: torch.Tensor, strength: float) -> int:
    """The index of the schedule's time nearest ``strength`` (the last, 0, included): where SDEdit starts."""
    return int(torch.argmin((timesteps.double() - strength).abs()))


def to_uint8(pixels: torch.Tensor) -> list[np.ndarray]:
    """Images in [-1, 1], (B, 3, H, W) -> list of uint8 (H, W, 3) arrays."""
    scaled = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(scaled.permute(0, 2, 3, 1).cpu().numpy())
