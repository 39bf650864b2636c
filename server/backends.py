"""What a worker runs: a small backend interface and its in-process PyTorch implementation.

The sampling loop (text -> portable noise -> Euler steps with guidance -> decode) lives in
:class:`StagedBackend`, written with the library's own pieces (``snapgen.noise``,
``snapgen.sampling``); it calls three stages a subclass provides:

    encode_text(prompts) -> TextEmbeddings
    unet(latents, t, text) -> velocity            (each step; what a Triton backend sends away)
    decode(latents) -> pixels in [-1, 1]

:class:`TorchBackend` runs the three in this process; ``server.triton_backend.TritonBackend`` replaces
them with calls to an NVIDIA Triton Inference Server. Images match ``SnapGenPipeline.__call__`` exactly
(tested). A backend whose model service is down raises :class:`BackendUnavailable`, and its
:meth:`Backend.health` says why; the worker then hands jobs back instead of failing them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Batch:
    """Images that share size, steps and guidance; one prompt and seed per image."""

    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompts: list[str] | None = None


@dataclass
class BackendOutput:
    images: list[Any]  # uint8 (H, W, 3) numpy arrays
    timings: dict[str, float] = field(default_factory=dict)


StepCallback = Callable[[int, int, Any], None]


class BackendUnavailable(RuntimeError):
    """The backend's model service cannot serve now (unreachable, a model not ready); the message says why.

    Not the job's fault: the worker hands the batch back to the queue instead of failing it, and takes no
    jobs until :meth:`Backend.health` is clear again.
    """


class Backend(ABC):
    """A loaded model that turns batches into images."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the API validates against and shows at /v1/models (plain JSON types only)."""

    @abstractmethod
    def validate(self, batch: Batch) -> None:
        """Raise ``snapgen.pipeline.InvalidRequestError`` for anything this model cannot do."""

    @abstractmethod
    def generate(self, batch: Batch, on_step: StepCallback | None = None) -> BackendOutput:
        """Run the batch; ``on_step(step, steps, latents)`` after each step, raising from it stops."""

    def health(self) -> str | None:
        """None when the backend can serve; else why not (shown at /readyz). In-process backends always can."""
        return None

    def warmup(self) -> None:
        """Run every supported size once so the first request pays no start-up costs."""
        info = self.describe()
        for height, width in info["sizes"][:4]:
            self.generate(Batch(["warm-up"], [0], 1, info["guidance_scale"], height, width))


class StagedBackend(Backend):
    """The pipeline's sampling loop over three replaceable stages."""

    # Subclasses set these.
    sampler: Any  # snapgen.sampling.SamplerConfig
    latent_channels: int
    latent_factor: int
    resolutions: list[tuple[int, int]]
    max_prompt_tokens: int
    name: str

    @property
    @abstractmethod
    def device(self): ...

    @property
    @abstractmethod
    def dtype(self): ...

    @abstractmethod
    def encode_text(self, prompts: list[str]): ...

    @abstractmethod
    def unet(self, latents, t, text): ...

    @abstractmethod
    def decode(self, latents): ...

    @abstractmethod
    def count_tokens(self, prompts: list[str]) -> list[int]: ...

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "sizes": [[h, w] for h, w in self.resolutions],
            "default_size": list(self.resolutions[0]),
            "default_steps": int(self.sampler.default_steps),
            "max_steps": int(self.sampler.max_steps),
            "distilled_steps": sorted(int(s) for s in self.sampler.distilled_timesteps),
            "guidance_scale": float(self.sampler.guidance_scale),
            "max_prompt_tokens": int(self.max_prompt_tokens),
            "latent_factor": int(self.latent_factor),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "backend": type(self).__name__,
        }

    def validate(self, batch: Batch) -> None:
        from snapgen.pipeline import InvalidRequestError, SnapGenPipeline

        # The pipeline's own checks, on this backend's model description.
        SnapGenPipeline.validate(self, batch.prompts, batch.steps, batch.guidance_scale, batch.height, batch.width,
                                 batch.seeds)  # fmt: skip
        if batch.negative_prompts:
            for i, count in enumerate(self.count_tokens(batch.negative_prompts)):
                if count > self.max_prompt_tokens:
                    raise InvalidRequestError(
                        "negative_prompt",
                        f"negative prompt {i} has {count} tokens; this model reads at most {self.max_prompt_tokens}",
                    )

    # SnapGenPipeline.validate reads these two attributes.
    @property
    def text_encoder(self):
        return _TokenCounter(self.count_tokens, self.max_prompt_tokens)

    def generate(self, batch: Batch, on_step: StepCallback | None = None) -> BackendOutput:
        import torch

        from snapgen.noise import randn_tensor
        from snapgen.pipeline import to_uint8
        from snapgen.sampling import cfg_velocity, guided, sample_euler

        with torch.no_grad():
            start = time.perf_counter()
            cond = self.encode_text(batch.prompts)
            uncond = None
            if batch.guidance_scale != 1.0:
                negatives = batch.negative_prompts or [""] * len(batch.prompts)
                uncond = self.encode_text(negatives)
            text_done = time.perf_counter()
            velocity = cfg_velocity(self.unet, cond, uncond)
            f = self.latent_factor
            shape = (self.latent_channels, batch.height // f, batch.width // f)
            noise = randn_tensor(batch.seeds, shape, device=self.device, dtype=self.dtype)
            timesteps = self.sampler.timesteps(batch.steps, batch.height, batch.width)
            latents = sample_euler(guided(velocity, batch.guidance_scale), noise, timesteps, on_step)
            unet_done = time.perf_counter()
            images = to_uint8(self.decode(latents))
            end = time.perf_counter()
        timings = {"text_s": text_done - start, "unet_s": unet_done - text_done, "decode_s": end - unet_done}
        return BackendOutput(images=images, timings=timings)


@dataclass
class _TokenCounter:
    count_tokens: Callable[[list[str]], list[int]]
    max_length: int


class TorchBackend(StagedBackend):
    """The model in this process (CPU or ``cuda:N``), optionally fp16/bf16, channels_last, compiled.

    The U-Net runs through TorchScript traces unless ``trace_unet=False`` or ``compile``: the same
    bytes out, about half the U-Net time at batch 1 on CPU and on an H100 (``snapgen.tracing``).
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
    ):
        import torch

        from snapgen.model_dir import load_pipeline
        from snapgen.tracing import TracedUNet

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.pipe = load_pipeline(model_dir, device=device, dtype=getattr(torch, DTYPES[dtype]))
        self.name = name or Path(model_dir).resolve().name
        self.sampler = self.pipe.sampler
        self.latent_channels = int(self.pipe.unet.config.in_channels)
        self.latent_factor = int(self.pipe.latent_factor)
        self.resolutions = [tuple(r) for r in self.pipe.resolutions]
        self.max_prompt_tokens = int(self.pipe.text_encoder.max_length)
        if channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.decoder.to(memory_format=torch.channels_last)
        if trace_unet is None:  # faster at the same bits on CPU and on an H100 (docs/benchmarks.md)
            trace_unet = not compile
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

    @property
    def device(self):
        return self._device

    @property
    def dtype(self):
        return self._dtype

    def count_tokens(self, prompts):
        return self.pipe.text_encoder.count_tokens(list(prompts))

    def encode_text(self, prompts):
        return self.pipe.encode_prompts(list(prompts))

    def unet(self, latents, t, text):
        return self._unet(latents, t, text.tokens, text.mask, text.pooled)

    def decode(self, latents):
        decoder = self.pipe.decoder
        return decoder.decode(decoder.from_diffusion(latents))
