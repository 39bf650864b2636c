"""Prompt -> image: text encoder, portable noise, Euler sampler over the U-Net, decoder.

Not a diffusers ``DiffusionPipeline`` subclass: its loader resolves components through
diffusers' and transformers' class registries, while our text encoder is a composite of several
transformers models plus a merge layer and our decoder slot accepts four classes. The directory
layout is the diffusers one (``model_index.json`` plus one folder per component), and the U-Net
and tiny decoder are plain ``ModelMixin`` models, so each drops into diffusers code on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .models.autoencoder import LatentDecoder
from .models.unet import SnapGenUNet
from .noise import randn_tensor
from .sampling import SamplerConfig, cfg_velocity, guided, sample_euler
from .text import TextEmbeddings, TextEncoder
from .tracing import TracedUNet

MAX_SEED = 2**32 - 1


class InvalidRequestError(ValueError):
    """Bad user input; ``field`` names the argument so APIs can point at it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class PipelineOutput:
    images: list[Image.Image] | None
    latents: torch.Tensor
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class SnapGenPipeline:
    """Holds the four components and runs them; load one with ``snapgen.model_dir.load_pipeline``."""

    def __init__(
        self,
        unet: SnapGenUNet,
        decoder: LatentDecoder,
        text_encoder: TextEncoder,
        sampler: SamplerConfig,
        latent_factor: int,
        resolutions: Sequence[tuple[int, int]] | None = None,
    ):
        self.unet = unet.eval()
        self.decoder = decoder.eval()
        self.text_encoder = text_encoder.eval()
        self.sampler = sampler
        self.latent_factor = latent_factor
        native = unet.config.sample_size * latent_factor
        self.resolutions = [tuple(r) for r in (resolutions or [(native, native)])]
        self._traced_unet: TracedUNet | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def default_size(self) -> tuple[int, int]:
        return self.resolutions[0]

    def to(self, device=None, dtype=None) -> SnapGenPipeline:
        """Move the U-Net and decoder (and the text encoder, kept in fp32) to ``device``/``dtype``."""
        self.unet.to(device=device, dtype=dtype)
        self.decoder.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device)
        if self._traced_unet is not None:
            self._traced_unet.clear()  # the traces hold the tensors from before the move
        return self

    def enable_unet_tracing(self, max_traces: int = 32) -> SnapGenPipeline:
        """Run the U-Net through TorchScript traces (one per batch size and resolution).

        Same outputs bit for bit, about half the U-Net time at batch 1, ~1 s to trace each new input
        signature: worth it in a process that makes many images (see ``snapgen.tracing``).
        """
        self._traced_unet = TracedUNet(self.unet, max_traces)
        return self

    def disable_unet_tracing(self) -> SnapGenPipeline:
        self._traced_unet = None
        return self

    # -- validation -------------------------------------------------------------------------
    def validate(
        self,
        prompts: Sequence[str],
        steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        seeds: Sequence[int],
    ) -> None:
        if not prompts:
            raise InvalidRequestError("prompt", "give at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidRequestError("prompt", f"prompt {i} is empty; write what the image should show")
        counts = self.text_encoder.count_tokens(list(prompts))
        for i, count in enumerate(counts):
            if count > self.text_encoder.max_length:
                raise InvalidRequestError(
                    "prompt",
                    f"prompt {i} has {count} tokens; this model reads at most {self.text_encoder.max_length}",
                )
        if not isinstance(steps, int) or not 1 <= steps <= self.sampler.max_steps:
            raise InvalidRequestError("steps", f"got {steps!r}; allowed: an integer from 1 to {self.sampler.max_steps}")
        if not guidance_scale >= 0:  # also rejects NaN
            raise InvalidRequestError("guidance_scale", f"got {guidance_scale!r}; allowed: a number >= 0")
        f = self.latent_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % f:
                raise InvalidRequestError(name, f"got {value!r}; it must be a positive multiple of {f}")
        if (height, width) not in self.resolutions:
            allowed = ", ".join(f"{h}x{w}" for h, w in self.resolutions)
            raise InvalidRequestError("size", f"{height}x{width} is not supported by this model; allowed: {allowed}")
        for seed in seeds:
            if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise InvalidRequestError("seed", f"got {seed!r}; allowed: an integer from 0 to {MAX_SEED}")

    # -- running ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> TextEmbeddings:
        return self.text_encoder.encode(prompts).to(device=self.device, dtype=self.dtype)

    def _call_unet(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        if self._traced_unet is not None:
            return self._traced_unet(x, t, text.tokens, text.mask, text.pooled)
        return self.unet(x, t, text.tokens, text.mask, text.pooled).sample

    def velocity_fn(self, cond: TextEmbeddings, uncond: TextEmbeddings | None):
        """The U-Net as ``velocity(x, t, with_uncond)`` for ``snapgen.sampling.guided``.

        Public because the Core ML golden reference (mobile_export) must compute the first step's
        velocity exactly as this pipeline's sampler does.
        """
        return cfg_velocity(self._call_unet, cond, uncond)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        seeds: int | Sequence[int] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        on_step: Callable[[int, int, torch.Tensor], None] | None = None,
        output_type: str = "pil",
    ) -> PipelineOutput:
        """Generate one image per prompt; image ``i`` starts from the portable noise of ``seeds[i]``.

        ``seeds`` may be one int (image i then uses seed + i) or one per prompt; None draws them.
        ``on_step(step, steps, latents)`` is called after every step; raising from it cancels.
        ``output_type``: "pil", "np" (uint8 HWC arrays) or "latent" (no decoding).
        """
        start = time.perf_counter()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        steps = self.sampler.default_steps if steps is None else steps
        guidance_scale = self.sampler.guidance_scale if guidance_scale is None else float(guidance_scale)
        height, width = height or self.default_size[0], width or self.default_size[1]
        if seeds is None:
            seeds = int(np.random.SeedSequence().generate_state(1)[0])
        if isinstance(seeds, int):
            seeds = [seeds + i for i in range(len(prompts))]
        seeds = list(seeds)
        if len(seeds) != len(prompts):
            raise InvalidRequestError("seed", f"got {len(seeds)} seeds for {len(prompts)} prompts")
        self.validate(prompts, steps, guidance_scale, height, width, seeds)
        if output_type not in ("pil", "np", "latent"):
            raise InvalidRequestError("output_type", f"got {output_type!r}; allowed: pil, np, latent")

        cond = self.encode_prompts(prompts)
        uncond = None
        if guidance_scale != 1.0:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            uncond = self.encode_prompts(negatives)
        text_done = time.perf_counter()

        f = self.latent_factor
        shape = (self.unet.config.in_channels, height // f, width // f)
        noise = randn_tensor(seeds, shape, device=self.device, dtype=self.dtype)
        timesteps = self.sampler.timesteps(steps, height, width)
        velocity = guided(self.velocity_fn(cond, uncond), guidance_scale)
        latents = sample_euler(velocity, noise, timesteps, on_step)
        unet_done = time.perf_counter()

        images = None
        if output_type != "latent":
            pixels = self.decoder.decode(self.decoder.from_diffusion(latents))
            arrays = to_uint8(pixels)
            images = arrays if output_type == "np" else [Image.fromarray(a) for a in arrays]
        end = time.perf_counter()
        timings = {
            "text_s": text_done - start,
            "unet_s": unet_done - text_done,
            "decode_s": end - unet_done,
            "total_s": end - start,
        }
        return PipelineOutput(images=images, latents=latents, seeds=seeds, timings=timings)


def to_uint8(pixels: torch.Tensor) -> list[np.ndarray]:
    """Images in [-1, 1], (B, 3, H, W) -> list of uint8 (H, W, 3) arrays."""
    scaled = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(scaled.permute(0, 2, 3, 1).cpu().numpy())
