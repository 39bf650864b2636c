"""Prompt -> image: text encoder, portable noise, Euler sampler over the U-Net, decoder.

Not a diffusers ``DiffusionPipeline`` subclass: its loader resolves components through
diffusers' and transformers' class registries, while our text encoder is a composite of several
transformers models plus a merge layer and our decoder slot accepts four classes. The directory
layout is the diffusers one (``model_index.json`` plus one folder per component), and the U-Net
and tiny decoder are plain ``ModelMixin`` models, so each drops into diffusers code on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .generation import StepCallback, generate, to_uint8
from .models.autoencoder import LatentDecoder
from .models.unet import SnapGenUNet
from .request import MAX_SEED, GenerationRequest, InvalidRequestError, ModelCard, ResolvedRequest
from .sampling import SamplerConfig, cfg_velocity
from .text import TextEmbeddings, TextEncoder
from .tracing import TracedUNet

__all__ = ["MAX_SEED", "InvalidRequestError", "PipelineOutput", "SnapGenPipeline", "to_uint8"]
OUTPUT_TYPES = ("pil", "np", "latent")


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

    # -- the contract ----------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def card(self) -> ModelCard:
        """What this model offers: sizes, step limits, defaults (``snapgen.request``)."""
        model_dir = getattr(self, "model_dir", None)
        return ModelCard(
            id=Path(model_dir).name if model_dir else "snapgen",
            sizes=tuple(self.resolutions),
            default_steps=self.sampler.default_steps,
            max_steps=self.sampler.max_steps,
            guidance_scale=self.sampler.guidance_scale,
            distilled_steps=tuple(int(s) for s in self.sampler.distilled_timesteps),
            max_prompt_tokens=self.text_encoder.max_length,
            latent_factor=self.latent_factor,
        )

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return self.text_encoder.count_tokens(list(prompts))

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """Check ``request`` against this model and fill in its defaults (raises InvalidRequestError)."""
        return request.resolve(self.card, self.count_tokens)

    # -- the three stages ``snapgen.generation.generate`` runs ---------------------------------
    def encode_text(self, prompts: list[str]) -> TextEmbeddings:
        return self.text_encoder.encode(list(prompts)).to(device=self.device, dtype=self.dtype)


    def unet_velocity(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        if self._traced_unet is not None:
            return self._traced_unet(x, t, text.tokens, text.mask, text.pooled)
        return self.unet(x, t, text.tokens, text.mask, text.pooled).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(self.decoder.from_diffusion(latents))

    def velocity_fn(self, cond: TextEmbeddings, uncond: TextEmbeddings | None):
        """The U-Net as ``velocity(x, t, with_uncond)`` for ``snapgen.sampling.guided``.

        Public because the Core ML golden reference (mobile_export) must compute the first step's
        velocity exactly as this pipeline's sampler does.
        """
        return cfg_velocity(self.unet_velocity, cond, uncond)

    # -- running ----------------------------------------------------------------------------
    def __call__(
        self,
        prompts: str | Sequence[str],
        seeds: int | Sequence[int] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        on_step: StepCallback | None = None,
        output_type: str = "pil",
    ) -> PipelineOutput:
        """Generate one image per prompt; image ``i`` starts from the portable noise of ``seeds[i]``.

        ``seeds`` may be one int (image i then uses seed + i) or one per prompt; None draws them.
        ``on_step(step, steps, latents)`` is called after every step; raising from it cancels.
        ``output_type``: "pil", "np" (uint8 HWC arrays) or "latent" (no decoding).
        """
        request = GenerationRequest(
            prompt=prompts,
            negative_prompt=negative_prompt,
            seed=seeds,
            steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
        )
        return self.run(request, on_step, output_type)

    def run(
        self,
        request: GenerationRequest | ResolvedRequest,
        on_step: StepCallback | None = None,
        output_type: str = "pil",
    ) -> PipelineOutput:
        """Generate what ``request`` asks for (resolved against this model first, unless it already is)."""
        if output_type not in OUTPUT_TYPES:
            raise InvalidRequestError("output_type", f"got {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        resolved = self.resolve(request) if isinstance(request, GenerationRequest) else request
        out = generate(self, resolved, on_step, decode=output_type != "latent")
        images = None
        if out.pixels is not None:
            arrays = to_uint8(out.pixels)
            images = arrays if output_type == "np" else [Image.fromarray(a) for a in arrays]
        return PipelineOutput(images=images, latents=out.latents, seeds=list(resolved.seeds), timings=out.timings)
