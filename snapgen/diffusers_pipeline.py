"""The diffusers front door: a snapgen model directory as a ``diffusers.DiffusionPipeline``.

::

    import snapgen.diffusers_pipeline  # registers SnapGen's pipeline class with diffusers
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("DIR")          # or the default: snapgen.model_dir.DEFAULT_MODEL_DIR
    image = pipe("a red circle", generator=torch.Generator().manual_seed(3)).images[0]

How diffusers finds the classes. ``model_index.json`` names the pipeline class (``_class_name``), which
``DiffusionPipeline.from_pretrained`` looks up as an attribute of the ``diffusers`` module, and one
``[library, class]`` pair per component folder, as diffusers' own ``save_pretrained`` writes them (the module
defining the class, e.g. ``["snapgen.text", "MiniLMTextEncoder"]``). diffusers imports no module a repository
names: a component's library must already be imported, and its class must derive from a base it knows
(``ModelMixin``, ``SchedulerMixin``, ...) found beside it. Importing this module does both: it imports every
component library and sets :class:`SnapGenDiffusionPipeline` on the ``diffusers`` module, under its own name
and under ``SnapGenPipeline``, the ``_class_name`` of model directories written before this format.

This class only translates: diffusers' call keywords become a :class:`~snapgen.request.GenerationRequest`
(defaults, limits and the seed rule live there) and :class:`~snapgen.pipeline.SnapGenPipeline` runs it, so an
image made here is the image ``snapgen generate`` makes for the same seed. It lives apart from the core so
that the CLI and the server never import diffusers' pipeline machinery.

The generator rule. SnapGen's initial noise is portable (``snapgen.noise``: Philox keyed by a uint32 seed),
not drawn from torch's RNG, so a ``torch.Generator`` is read for its seed only:
``seed = generator.initial_seed()``. One generator for all images gives image ``i`` the seed ``seed + i``
(snapgen's seed rule); a list gives one generator per image. The generator is neither read further nor
advanced, so calling again with the same generator makes the same images.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from . import models
from .model_dir import DIFFUSERS_PIPELINE_CLASS, MODEL_INDEX, save_model
from .model_dir import latent_factor as decoder_latent_factor
from .models import tiny_decoder  # noqa: F401  (diffusers finds a component's class only in an imported module)
from .models.autoencoder import DECODER_CLASSES, LatentDecoder
from .models.unet import SnapGenUNet
from .pipeline import SnapGenPipeline, image_pixels
from .request import MAX_SEED, GenerationRequest, InvalidRequestError
from .sampling import SamplerConfig
from .text import TextEncoder

__all__ = ["SnapGenDiffusionPipeline", "SnapGenDiffusionPipelineOutput", "seeds_from_generator"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
LEGACY_CLASS_NAME = "SnapGenPipeline"  # the _class_name of model directories from before the diffusers format


@dataclass
class SnapGenDiffusionPipelineOutput(BaseOutput):
    """``images`` as ``output_type`` asked; ``seeds``: the seed of each image; ``timings``: seconds per stage."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    seeds: list[int] | None = None
    timings: dict[str, float] | None = None


def seeds_from_generator(generator: torch.Generator | Sequence[torch.Generator] | None, images: int):
    """The seed (or one seed per image) that diffusers' ``generator`` stands for (see the module's docstring)."""
    if generator is None:
        return None
    many = isinstance(generator, (list, tuple))
    generators = list(generator) if many else [generator]
    if not all(isinstance(g, torch.Generator) for g in generators):
        raise InvalidRequestError("generator", "allowed: a torch.Generator, or a list of them (one per image)")
    if many and len(generators) != images:
        raise InvalidRequestError("generator", f"got {len(generators)} generators for {images} images; give one "
                                  "(image i uses its seed + i) or one per image")  # fmt: skip
    seeds = [g.initial_seed() for g in generators]
    for seed in seeds:
        if seed > MAX_SEED:
            raise InvalidRequestError(
                "generator", f"its seed is {seed}; snapgen's portable noise takes seeds from 0 to {MAX_SEED}: "
                "seed the generator with manual_seed(n)"
            )  # fmt: skip
    return tuple(seeds) if many else seeds[0]


def _latent_decoder(decoder: ModelMixin) -> LatentDecoder:
    """The decoder component wrapped as the core runs it (what ``load_decoder`` returns for its folder)."""
    name = type(decoder).__name__
    if name not in DECODER_CLASSES:
        raise ValueError(f"the decoder must be one of {', '.join(DECODER_CLASSES)}; got a {name}")
    model = decoder.decoder if name == "SmallAutoencoder" else decoder  # the core needs only the decoder half
    config = decoder.config
    return LatentDecoder(model, name, config.scaling_factor, getattr(config, "shift_factor", None)).eval()


def _current_entry(entry: Any) -> Any:
    """A component entry of an old model index (``["snapgen", "TinyDecoder"]``) as the module defining the
    class: the library diffusers looks the class up in."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] in ("snapgen", "snapgen.models"):
        cls = getattr(models, entry[1], None)
        if isinstance(cls, type):
            return [cls.__module__, entry[1]]
    return entry


class SnapGenDiffusionPipeline(DiffusionPipeline):
    r"""SnapGen text-to-image (and image-to-image) with diffusers' loading, saving and call keywords.

    Components: ``unet`` (:class:`~snapgen.models.unet.SnapGenUNet`), ``decoder`` (TinyDecoder, SmallAutoencoder,
    AutoencoderKL or AutoencoderTiny), ``text_encoder`` (a :class:`~snapgen.text.TextEncoder`), ``scheduler``
    (:class:`~snapgen.sampling.SamplerConfig`: step counts, guidance, shift, distilled times) and, optionally,
    ``autoencoder`` (the encoder of the latent space, where the decoder cannot encode). ``latent_factor`` and
    ``resolutions`` (the (height, width) sizes the model makes, the first the default) come from the index.
    """

    _optional_components = ["autoencoder"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet: SnapGenUNet,
        decoder: ModelMixin,
        text_encoder: TextEncoder,
        scheduler: SamplerConfig,
        autoencoder: ModelMixin | None = None,
        latent_factor=None,
        resolutions=None,
    ):
        super().__init__()
        factor = int(latent_factor) if latent_factor is not None else decoder_latent_factor(decoder)
        self._core = SnapGenPipeline(
            unet,
            _latent_decoder(decoder),
            text_encoder,
            scheduler,
            latent_factor=factor,
            resolutions=[tuple(r) for r in resolutions] if resolutions else None,
        )
        self.register_modules(
            unet=unet, decoder=decoder, text_encoder=text_encoder, scheduler=scheduler, autoencoder=autoencoder
        )
        self.register_to_config(latent_factor=factor, resolutions=[list(r) for r in self._core.resolutions])
        self._num_timesteps = None

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # Model directories from before the diffusers format name "snapgen" or "snapgen.models" as a
        # component's library; diffusers looks the class up in the module that defines it.
        return super().extract_init_dict({k: _current_entry(v) for k, v in config_dict.items()}, **kwargs)

    # -- the core -------------------------------------------------------------------------------
    @property
    def core(self) -> SnapGenPipeline:
        """The :class:`~snapgen.pipeline.SnapGenPipeline` that runs every call (it shares the components)."""
        directory = self.name_or_path
        if getattr(self._core, "model_dir", None) is None and directory and Path(directory).is_dir():
            # Where image-to-image finds the encoder of the latent space (the core loads it on first use).
            self._core.model_dir = Path(directory).resolve()
        return self._core

    @property
    def device(self) -> torch.device:
        return self._core.device

    @property
    def dtype(self) -> torch.dtype:
        """The U-Net's and decoder's dtype; the text encoder keeps its own (its embeddings are cast)."""
        return self._core.dtype

    @property
    def num_timesteps(self) -> int | None:
        """Steps of the last call (diffusers' callbacks read it)."""
        return self._num_timesteps

    def to(self, *args, **kwargs) -> SnapGenDiffusionPipeline:
        """``to(device)``, ``to(dtype)``, ``to(device, dtype)`` or keywords ``device=``/``dtype=``, as diffusers'.

        The U-Net and decoders move and cast; the text encoder only moves (it stays in its own dtype).
        """
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs:
            raise TypeError(f"to() got an unexpected keyword argument {sorted(kwargs)[0]!r}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, int, torch.device)):
                device = arg
            else:
                raise TypeError(f"to() takes a device and/or a dtype; got {arg!r}")
        device = torch.device(device) if isinstance(device, (str, int)) else device
        self._core.to(device=device, dtype=dtype)
        move = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.decoder, self.autoencoder):
            if module is not None and module is not self._core.decoder.model:
                module.to(**move)  # the core moves only the part it runs (a SmallAutoencoder's decoder half)
        return self

    # -- saving ---------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
    ) -> None:
        """Write a snapgen model directory (``snapgen.model_dir.save_model``: atomic, safetensors only).

        Loads with ``DiffusionPipeline.from_pretrained`` and ``snapgen.model_dir.load_pipeline``. An existing
        model directory (or empty directory) is replaced; a directory holding anything else is refused.
        """
        if not safe_serialization:
            raise ValueError("safe_serialization=False: snapgen model directories hold safetensors only")
        if variant is not None:
            raise ValueError(f"variant={variant!r}: a snapgen model directory holds one set of weights, no variants")
        if push_to_hub:
            raise NotImplementedError("push_to_hub: save the directory, then upload it with huggingface_hub")
        directory = Path(save_directory)
        if directory.is_dir() and any(directory.iterdir()) and not (directory / MODEL_INDEX).is_file():
            raise FileExistsError(f"{directory} holds files but no {MODEL_INDEX}; saving would replace them, so "
                                  "give an empty or new directory, or a model directory")  # fmt: skip
        save_model(directory, self.unet, self.decoder, self.text_encoder, self.scheduler,
                   resolutions=list(self._core.resolutions), overwrite=True, autoencoder=self.autoencoder)  # fmt: skip

    # -- calling --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        image: Any = None,
        strength: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | Any | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        seeds: int | Sequence[int] | None = None,
        steps: int | None = None,
    ) -> SnapGenDiffusionPipelineOutput | tuple:
        r"""Generate images; keywords as in diffusers' pipelines.

        Args:
            prompt: a prompt or a list of them.
            negative_prompt: one for all prompts or one per prompt; used only with guidance.
            num_inference_steps: sampling steps; the model's default (its distilled step count) if None.
                ``steps`` is an alias.
            guidance_scale: classifier-free guidance; the model's default if None. As in diffusers, guidance is
                on above 1 only: a value from 0 to 1 means none (``snapgen generate --guidance`` below 1 would
                move towards the negative prompt instead).
            height, width: one of the model's sizes (the first is the default).
            num_images_per_prompt: images of each prompt, prompt-major (copy k of prompt p is image p * n + k).
            generator: a seeded ``torch.Generator`` (image i gets its seed + i) or one per image; see the
                module's docstring. ``seeds`` (snapgen's: one int, or one per image) is the alternative.
                Neither: seeds drawn at random, returned in ``.seeds``.
            latents: the starting noise, (images, channels, height / f, width / f), instead of the seeds'.
            image, strength: image-to-image: input image(s) (PIL, uint8 HWC arrays or a (B, 3, H, W) tensor in
                [-1, 1]) and how far towards noise they are taken (0 keeps, 1 ignores them).
            output_type: "pil" (PIL images), "np" (float32 (B, H, W, 3) in [0, 1]), "pt" (float (B, 3, H, W)
                in [0, 1]) or "latent" (the final latents, not decoded).
            return_dict: False returns the tuple ``(images,)``.
            callback_on_step_end: ``callback(pipe, step_index, timestep, callback_kwargs) -> dict`` after each
                step; ``timestep`` is the step's flow time x 1000 (diffusers' flow-matching convention, 1000 =
                noise). A "latents" entry in the returned dict replaces the latents.
            callback_on_step_end_tensor_inputs: the entries of ``callback_kwargs``; only "latents" (the default).

        Raises:
            InvalidRequestError: a value outside what the model allows; ``.field`` names the keyword.
        """
        try:
            if steps is not None and num_inference_steps is not None:
                raise InvalidRequestError("num_inference_steps", "give num_inference_steps or steps, not both")
            if seeds is not None and generator is not None:
                raise InvalidRequestError("generator", "give generator or seeds, not both")
            if output_type not in OUTPUT_TYPES:
                raise InvalidRequestError("output_type", f"got {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
            callback, tensor_inputs = _callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                                self._callback_tensor_inputs)  # fmt: skip
            n = 1 if num_images_per_prompt is None else num_images_per_prompt
            images = len(prompt) if isinstance(prompt, (list, tuple)) else 1
            seed = seeds if seeds is not None else seeds_from_generator(generator, images * n if _is_int(n) else 1)
            request = GenerationRequest(
                prompt=prompt,
                negative_prompt=negative_prompt,
                n=n,
                seed=seed,
                steps=steps if steps is not None else num_inference_steps,
                guidance_scale=_diffusers_guidance(guidance_scale),
                height=height,
                width=width,
                strength=strength,
            ).with_seed()  # drawn once, so the seeds checked below are the ones that run
            return self._run(request, image, latents, output_type, return_dict, callback, tensor_inputs)
        except InvalidRequestError as e:
            raise InvalidRequestError(_keyword(e.field, steps is not None, generator is not None), e.message) from None

    def _run(self, request, image, latents, output_type, return_dict, callback, tensor_inputs):
        core = self.core
        if image is not None and request.height is None and request.width is None:
            height, width = image_pixels(image).shape[-2:]  # the core makes the input image's size
            request = dataclasses.replace(request, height=int(height), width=int(width))
        resolved = core.resolve(request)
        f = core.latent_factor
        shape = (resolved.images, core.latent_channels, resolved.height // f, resolved.width // f)
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InvalidRequestError("latents", f"got {got}; this call needs a tensor of shape {shape} "
                                      "(images, channels, height / f, width / f)")  # fmt: skip
        times = core.sampler.timesteps(resolved.steps, resolved.height, resolved.width)
        bar = None

        def on_step(step: int, steps: int, x: torch.Tensor) -> torch.Tensor | None:
            nonlocal bar
            if bar is None:
                self._num_timesteps = steps
                bar = self.progress_bar(total=steps)
            bar.update()
            if callback is None:
                return None
            # An image-to-image call runs the last ``steps`` steps of the schedule.
            t = times[len(times) - 1 - steps + step - 1]
            timestep = torch.tensor(float(t) * 1000.0, device=x.device)
            outputs = callback(self, step - 1, timestep, {name: x for name in tensor_inputs}) or {}
            replaced = outputs.get("latents")
            if replaced is not None and (not isinstance(replaced, torch.Tensor) or replaced.shape != x.shape):
                got = tuple(replaced.shape) if isinstance(replaced, torch.Tensor) else type(replaced).__name__
                raise InvalidRequestError("callback_on_step_end", f"returned latents {got}; they must be a tensor "
                                          f"of shape {tuple(x.shape)}")  # fmt: skip
            return replaced

        try:
            out = core.run(request, on_step, output_type="pil" if output_type == "pil" else "latent", noise=latents,
                           image=image)  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        timings = dict(out.timings)
        if output_type == "pil":
            images = out.images
        elif output_type == "latent":
            images = out.latents
        else:
            start = time.perf_counter()
            pixels = (core.decode(out.latents).float().clamp(-1, 1) + 1) / 2  # diffusers' [0, 1]
            images = pixels.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else pixels
            timings["decode_s"] = time.perf_counter() - start
            timings["total_s"] = timings.get("total_s", 0.0) + timings["decode_s"]
        if not return_dict:
            return (images,)
        return SnapGenDiffusionPipelineOutput(images=images, seeds=out.seeds, timings=timings)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _diffusers_guidance(scale: Any) -> Any:
    """diffusers turns guidance on above 1 only; snapgen's scale 1 is "no guidance"."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 <= scale < 1:
        return 1.0
    return scale


def _callback(callback: Any, tensor_inputs: list[str] | None, allowed: list[str]):
    """The step-end callback and the names of the tensors it is given, checked."""
    if callback is not None and not callable(callback):
        raise InvalidRequestError("callback_on_step_end", f"got {callback!r}; allowed: a callable "
                                  "(pipe, step_index, timestep, callback_kwargs) -> dict")  # fmt: skip
    # diffusers' PipelineCallback objects name the tensors they need themselves.
    inputs = getattr(callback, "tensor_inputs", None) or tensor_inputs or ["latents"]
    if isinstance(inputs, str) or not all(isinstance(name, str) for name in inputs):
        raise InvalidRequestError("callback_on_step_end_tensor_inputs", f"got {inputs!r}; allowed: a list of names")
    unknown = [name for name in inputs if name not in allowed]
    if unknown:
        raise InvalidRequestError("callback_on_step_end_tensor_inputs", f"got {unknown}; allowed: {allowed} (the "
                                  "text embeddings are not exposed)")  # fmt: skip
    return callback, list(inputs)


def _keyword(field: str, steps_alias: bool, generator: bool) -> str:
    """The keyword of this call that a request field came from."""
    if field == "n":
        return "num_images_per_prompt"
    if field == "steps":
        return "steps" if steps_alias else "num_inference_steps"
    if field == "seed":
        return "generator" if generator else "seeds"
    return field


def _register_with_diffusers() -> None:
    import diffusers

    for name in (DIFFUSERS_PIPELINE_CLASS, LEGACY_CLASS_NAME):
        current = getattr(diffusers, name, None)
        # Never shadow a class diffusers itself may one day ship under the same name.
        if current is None or getattr(current, "__module__", None) == __name__:
            setattr(diffusers, name, SnapGenDiffusionPipeline)


_register_with_diffusers()
