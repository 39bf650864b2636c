"""What a worker runs: a small backend interface and its in-process PyTorch implementation.

A backend resolves requests against its model's card and generates them. :class:`StagedBackend` runs
the library's one generation recipe (``snapgen.generation.generate``) over three stages a subclass
provides:

    encode_text(prompts) -> TextEmbeddings
    unet_velocity(latents, t, text) -> velocity     (each step; what a Triton backend sends away)
    decode(latents) -> pixels in [-1, 1]

:class:`TorchBackend` runs the three in this process; ``server.triton_backend.TritonBackend`` replaces
them with calls to an NVIDIA Triton Inference Server. Images match ``SnapGenPipeline`` exactly (tested).
A backend whose model service is down raises :class:`BackendUnavailable`, and its :meth:`Backend.health`
says why; the worker then hands jobs back instead of failing them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from snapgen.request import GenerationRequest, InvalidRequestError, ModelCard, ResolvedRequest

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
KERNELS = ("torch", "triton")  # snapgen.models.kernels: the PyTorch layers, or fused Triton kernels


@dataclass
class BackendOutput:
    images: list[Any]  # uint8 (H, W, 3) numpy arrays
    timings: dict[str, float] = field(default_factory=dict)


StepCallback = Callable[[int, int, Any], None]
# on_preview(step, steps, images): uint8 (H, W, 3) arrays of every image's estimate at this step.
PreviewCallback = Callable[[int, int, list[Any]], None]


class BackendUnavailable(RuntimeError):
    """The backend's model service cannot serve now (unreachable, a model not ready); the message says why.

    Not the job's fault: the worker hands the batch back to the queue instead of failing it, and takes no
    jobs until :meth:`Backend.health` is clear again.
    """


class Backend(ABC):
    """A loaded model that turns resolved requests into images."""

    card: ModelCard
    provenance: tuple[str, str | None]  # (model directory name, U-Net sha256): what saved PNGs record
    accepts_images: bool = False  # whether it can encode an input image (image-to-image)

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The card and where it runs, as plain JSON (the API resolves against it; GET /v1/models shows it)."""

    @abstractmethod
    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """``request`` checked against this model (``snapgen.request.InvalidRequestError`` when it cannot)."""

    @abstractmethod
    def generate(
        self,
        request: ResolvedRequest,
        on_step: StepCallback | None = None,
        inputs: list[Any] | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> BackendOutput:
        """Run the batch; ``on_step(step, steps, latents)`` after each step, raising from it stops.

        ``inputs``: one uint8 (H, W, 3) array of the request's size per image, the input of an image-to-image
        request. ``on_preview``: called before ``on_step`` with a picture of where each image is heading.
        """

    def health(self) -> str | None:
        """None when the backend can serve; else why not (shown at /readyz). In-process backends always can."""
        return None

    def warmup(self) -> None:
        """Run every supported size once so the first request pays no start-up costs."""
        for height, width in self.card.sizes[:4]:
            self.generate(self.resolve(GenerationRequest("warm-up", seed=0, steps=1, height=height, width=width)))


class StagedBackend(Backend):
    """The library's generation recipe over three replaceable stages (``snapgen.generation.GenerationStages``)."""

    # Subclasses set these.
    card: ModelCard
    sampler: Any  # snapgen.sampling.SamplerConfig
    latent_channels: int
    latent_factor: int

    @property
    @abstractmethod
    def device(self): ...

    @property
    @abstractmethod
    def dtype(self): ...

    @abstractmethod
    def encode_text(self, prompts: list[str]): ...

    @abstractmethod
    def unet_velocity(self, latents, t, text): ...

    @abstractmethod
    def decode(self, latents): ...

    @abstractmethod
    def count_tokens(self, prompts: list[str]) -> list[int]: ...

    def image_latents(self, pixels):
        """Input images in [-1, 1], (B, 3, H, W) -> diffusion latents; only where ``accepts_images``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            **self.card.to_dict(),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "backend": type(self).__name__,
            "image_input": self.accepts_images,
        }

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        if request.strength is not None and not self.accepts_images:
            raise InvalidRequestError("image", "this model cannot take an input image: it has no encoder")
        return request.resolve(self.card, self.count_tokens)

    def generate(self, request, on_step=None, inputs=None, on_preview=None) -> BackendOutput:
        from snapgen.generation import generate, to_uint8
        from snapgen.pipeline import image_pixels

        image_latents = None
        if request.strength is not None:
            if inputs is None or len(inputs) != request.images:
                raise ValueError(f"an image-to-image batch needs {request.images} input images")
            image_latents = self.image_latents(image_pixels(inputs))
        on_x0 = None
        if on_preview is not None:

            def on_x0(step, steps, x0):
                on_preview(step, steps, to_uint8(self.decode(x0)))

        out = generate(self, request, on_step, image_latents=image_latents, on_x0=on_x0)
        return BackendOutput(images=to_uint8(out.pixels), timings=out.timings)


def named(card: ModelCard, name: str | None) -> ModelCard:
    """The card under the name the server serves it as."""
    return replace(card, id=name) if name else card


class TorchBackend(StagedBackend):
    """The model in this process (CPU or ``cuda:N``), optionally fp16/bf16, channels_last, compiled.

    The U-Net runs through TorchScript traces unless ``trace_unet=False``, ``compile`` or Triton kernels
    (which a trace cannot record): the same bytes out, about half the U-Net time at batch 1 on CPU and on
    an H100 (``snapgen.tracing``). ``kernels="triton"`` swaps the U-Net's and decoder's fused layers for
    Triton kernels (``snapgen.models.kernels``). ``graph`` (CUDA only) runs each batch's sampler and
    decoder as one CUDA graph per batch bucket up to ``max_batch`` images (``snapgen.graphed``), made
    at :meth:`warmup` for the model's default steps and guidance; batches with step previews,
    image-to-image ones and larger ones take the step-by-step path.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        trace_unet: bool | None = None,
        name: str | None = None,
        kernels: str = "torch",
        graph: bool = False,
        max_batch: int = 8,
    ):
        import torch

        from snapgen.model_dir import load_pipeline
        from snapgen.tracing import TracedUNet

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        if graph and torch.device(device).type != "cuda":
            raise ValueError(f"graph=True records CUDA graphs, which need a CUDA device; the device is {device}")
        if kernels == "triton":
            from snapgen.models import kernels as triton_kernels

            reason = triton_kernels.available()
            if reason is not None:
                raise ValueError(f"kernels=triton cannot run here: {reason}")
            if trace_unet:
                raise ValueError("a TorchScript trace cannot record Triton kernels: choose trace_unet or triton")
        self.pipe = load_pipeline(model_dir, device=device, dtype=getattr(torch, DTYPES[dtype]))
        self.card = named(self.pipe.card, name)
        self.provenance = self.pipe.provenance()
        self.sampler = self.pipe.sampler
        self.latent_channels = self.pipe.latent_channels
        self.latent_factor = int(self.pipe.latent_factor)
        if channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.decoder.to(memory_format=torch.channels_last)
        self.kernels = kernels
        if kernels == "triton":
            triton_kernels.set_kernels(self.pipe.unet, kernels)
            triton_kernels.set_kernels(self.pipe.decoder, kernels)
        if trace_unet is None:  # faster at the same bits on CPU and on an H100 (docs/benchmarks.md)
            trace_unet = not compile and kernels == "torch"
        if compile and trace_unet:
            raise ValueError("choose one of compile and trace_unet")
        if compile:
            compiled = torch.compile(self.pipe.unet)
            self._unet = lambda *inputs: compiled(*inputs).sample
        elif trace_unet:
            self._unet = TracedUNet(self.pipe.unet)
        else:
            self._unet = lambda *inputs: self.pipe.unet(*inputs).sample
        self._device, self._dtype = self.pipe.device, self.pipe.dtype
        self.accepts_images = _has_encoder(model_dir)
        self.graphs = None  # snapgen.graphed.SamplerGraphs when graph=True (tests set an uncaptured one on a CPU)
        if graph:
            from snapgen.graphed import SamplerGraphs

            self.graphs = SamplerGraphs(self, max_batch)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kernels": self.kernels, "graph": self.graphs is not None}

    def generate(self, request, on_step=None, inputs=None, on_preview=None) -> BackendOutput:
        """As :meth:`StagedBackend.generate`; a graphed batch calls ``on_step`` once, at its end (snapgen.graphed)."""
        if self.graphs is None or not self.graphs.accepts(request, previews=on_preview is not None):
            return super().generate(request, on_step, inputs, on_preview)
        from snapgen.generation import to_uint8

        out = self.graphs.generate(request, on_step)
        return BackendOutput(images=to_uint8(out.pixels), timings=out.timings)

    def warmup(self) -> None:
        """The step-by-step path once per size, then (with ``graph``) the graphs of every batch bucket for the
        model's default steps and guidance, so that no request pays for recording one."""
        for height, width in self.card.sizes[:4]:
            request = self.resolve(GenerationRequest("warm-up", seed=0, steps=1, height=height, width=width))
            StagedBackend.generate(self, request)
            if self.graphs is not None:
                self.graphs.prepare(height, width, self.card.default_steps, self.card.guidance_scale)

    @property
    def device(self):
        return self._device

    @property
    def dtype(self):
        return self._dtype

    def count_tokens(self, prompts):
        return self.pipe.count_tokens(prompts)

    def encode_text(self, prompts):
        return self.pipe.encode_text(prompts)

    def unet_velocity(self, latents, t, text):
        return self._unet(latents, t, text.tokens, text.mask, text.pooled)

    def decode(self, latents):
        return self.pipe.decode(latents)

    def image_latents(self, pixels):
        return self.pipe.image_latents(pixels)


def _has_encoder(model_dir) -> bool:
    from snapgen.model_dir import ModelDirectoryError, encoder_dir

    try:
        encoder_dir(model_dir)
    except ModelDirectoryError:
        return False
    return True
