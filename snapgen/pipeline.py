"""Prompt -> image: text encoder, portable noise, Euler sampler over the U-Net, decoder.

Not a diffusers ``DiffusionPipeline`` subclass: its loader resolves components through
diffusers' and transformers' class registries, while our text encoder is a composite of several
transformers models plus a merge layer and our decoder slot accepts four classes. The directory
layout is the diffusers one (``model_index.json`` plus one folder per component), and the U-Net
and tiny decoder are plain ``ModelMixin`` models, so each drops into diffusers code on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
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
        self._encoder = None  # for image-to-image, loaded on first use

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
        # Only what is set is passed on: diffusers' ModelMixin.to warns that modules "should be kept in
        # float32" whenever a dtype keyword is present, even None, and these models keep none in float32.
        move = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.unet.to(**move)
        self.decoder.to(**move)
        self.text_encoder.to(device=device)
        if self._traced_unet is not None:
            self._traced_unet.clear()  # the traces hold the tensors from before the move
        if self._encoder is not None:
            self._encoder.to(**move)
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

    def provenance(self) -> tuple[str, str | None]:
        """(model name, sha256 of the U-Net weights) that saved images record (``snapgen.model_dir.provenance``)."""
        from .model_dir import provenance

        model_dir = getattr(self, "model_dir", None)
        return provenance(model_dir) if model_dir else ("snapgen", None)

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

    def image_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> diffusion latents, by the encoder of the model's latent space
        (its ``autoencoder/``, or the decoder when that is a whole autoencoder), loaded on first use."""
        if self._encoder is None:
            from .model_dir import ModelDirectoryError, encoder_dir
            from .models.autoencoder import load_encoder

            model_dir = getattr(self, "model_dir", None)
            if model_dir is None:
                raise InvalidRequestError("image", "this pipeline was not loaded from a model directory: no encoder")
            try:
                folder = encoder_dir(model_dir)
            except ModelDirectoryError as e:
                raise InvalidRequestError("image", f"this model cannot take an input image: {e}") from None
            self._encoder = load_encoder(folder, torch_dtype=self.dtype).to(self.device)
        with torch.no_grad():
            z = self._encoder.encode(pixels.to(device=self.device, dtype=self.dtype))
            return self._encoder.to_diffusion(z)

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
        image: ImageInput | None = None,
        strength: float | None = None,
    ) -> PipelineOutput:
        """Generate one image per prompt; image ``i`` starts from the portable noise of ``seeds[i]``.

        ``seeds`` may be one int (image i then uses seed + i) or one per prompt; None draws them.
        ``on_step(step, steps, latents)`` is called after every step; raising from it cancels.
        ``output_type``: "pil", "np" (uint8 HWC arrays) or "latent" (no decoding).
        ``image`` and ``strength``: image-to-image (see :meth:`run`).
        """
        request = GenerationRequest(
            prompt=prompts,
            negative_prompt=negative_prompt,
            seed=seeds,
            steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            strength=strength,
        )
        return self.run(request, on_step, output_type, image=image)

    def run(
        self,
        request: GenerationRequest | ResolvedRequest,
        on_step: StepCallback | None = None,
        output_type: str = "pil",
        noise: torch.Tensor | None = None,
        image: ImageInput | None = None,
    ) -> PipelineOutput:
        """Generate what ``request`` asks for (resolved against this model first, unless it already is).

        ``noise`` replaces the seeds' portable noise. ``image`` is the input of image-to-image (the request's
        ``strength``): one image for all, one per prompt or one per image; PIL images, uint8 (H, W, 3)
        arrays, or a (B, 3, H, W) tensor in [-1, 1]. Without a size in the request, the image's is used.
        """
        if output_type not in OUTPUT_TYPES:
            raise InvalidRequestError("output_type", f"got {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        pixels = None if image is None else image_pixels(image)
        if isinstance(request, GenerationRequest):
            if pixels is not None and request.height is None and request.width is None:
                request = replace(request, height=pixels.shape[-2], width=pixels.shape[-1])
            resolved = self.resolve(request)
            per_prompt = request.n
        else:
            resolved, per_prompt = request, 1
        image_latents = None
        if resolved.strength is not None:
            if pixels is None:
                raise InvalidRequestError("image", "strength asks for image-to-image: give an input image")
            image_latents = self.image_latents(expand_images(pixels, resolved, per_prompt))
        elif pixels is not None:
            raise InvalidRequestError("strength", "an input image needs a strength from 0 (keep it) to 1 (ignore it)")
        out = generate(self, resolved, on_step, decode=output_type != "latent", noise=noise,
                       image_latents=image_latents)  # fmt: skip
        images = None
        if out.pixels is not None:
            arrays = to_uint8(out.pixels)
            images = arrays if output_type == "np" else [Image.fromarray(a) for a in arrays]
        return PipelineOutput(images=images, latents=out.latents, seeds=list(resolved.seeds), timings=out.timings)


ImageInput = Image.Image | np.ndarray | torch.Tensor | Sequence[Image.Image | np.ndarray]


def image_pixels(image: ImageInput) -> torch.Tensor:
    """An input image (or several, of one size) as a (B, 3, H, W) float tensor in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        pixels = image if image.ndim == 4 else image.unsqueeze(0)
    else:
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        arrays = [np.asarray(i.convert("RGB") if isinstance(i, Image.Image) else i) for i in items]
        if any(a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8 for a in arrays):
            raise InvalidRequestError("image", "give PIL images or uint8 (H, W, 3) arrays")
        if len({a.shape for a in arrays}) > 1:
            raise InvalidRequestError("image", "the input images differ in size; give images of one size")
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise InvalidRequestError("image", f"got a tensor of shape {tuple(pixels.shape)}; allowed: (B, 3, H, W)")
    return pixels


def expand_images(pixels: torch.Tensor, request: ResolvedRequest, per_prompt: int) -> torch.Tensor:
    """One input image per image of the request, from one for all, one per prompt or one per image."""
    if tuple(pixels.shape[-2:]) != (request.height, request.width):
        h, w = pixels.shape[-2:]
        raise InvalidRequestError(
            "image", f"the input image is {w}x{h} (width x height); this request makes {request.width}x"
            f"{request.height} images: resize it, or ask for the image's size if the model makes it"
        )  # fmt: skip
    count, total = pixels.shape[0], request.images
    if count == total:
        return pixels
    if count == 1:
        return pixels.expand(total, -1, -1, -1)
    if count * per_prompt == total:
        return pixels.repeat_interleave(per_prompt, dim=0)
    raise InvalidRequestError("image", f"got {count} input images for {total} images; give one, or one per prompt")
