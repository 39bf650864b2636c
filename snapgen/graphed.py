"""The few-step sampler as one CUDA graph: text embeddings in, image out, one graph per bucket.

At the default model's size (128 px, 4 steps) a GPU waits on the CPU launching thousands of small
kernels one by one: 43-63 ms a batch on an H100 whatever the batch size (docs/benchmarks.md). A CUDA
graph records those launches once and replays them in one call. :class:`GraphedSampler` records the
whole sampler, every U-Net step of the guided Euler loop and the decoder, for one :class:`Bucket`:

    (batch, height, width, steps, guidance scale)

The timesteps follow from the bucket, so they are constants of the graph. The text embeddings and the
starting noise are copied into the graph's static input tensors before each replay, so the seeds still
decide the images (the portable noise is made outside, as in :func:`snapgen.generation.generate`). The
guidance scale is part of the bucket, not an input: the eager recipe multiplies by a Python number,
and only the same constant gives the same bytes. A batch smaller than its bucket (1, 2, 4, 8, ... up
to the largest batch) is padded with copies of its last row, whose images are dropped.

What a graph cannot do is run Python between its kernels. So a graphed batch reports progress once,
when it is done (``on_step(steps, steps, latents)``, whose return value is not used), is canceled
between batches only, and makes no step previews. Batches that need previews, image-to-image ones
and ones larger than the largest bucket run through :func:`~snapgen.generation.generate` instead
(:meth:`SamplerGraphs.accepts`).

Without capture (``capture=False``, the only choice on a CPU) the same static buffers, padding and
recorded function run eagerly: that is how the CPU tests check that a graphed batch gives the bytes of
:func:`~snapgen.generation.generate` run at the bucket's batch size (the same kernels, launched by a
replay instead of by Python; ``bench/bench_gpu.py`` checks the bytes on a GPU).

Graphs of one :class:`SamplerGraphs` share one memory pool, which holds the activations of one run at
a time: safe because they are replayed one at a time and each replay's outputs are copied out before
the next one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .generation import Generated, GenerationStages
from .noise import randn_tensor
from .request import ResolvedRequest
from .sampling import StepCallback, cfg_velocity, guided, sample_euler
from .text import TextEmbeddings

WARMUP_RUNS = 3  # eager runs on a side stream before capture: lazy initialisation must not land in the graph


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes graphs are made for: powers of two below ``max_batch``, then ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def bucket_batch(images: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``images`` rows."""
    for size in buckets:
        if images <= size:
            return size
    raise ValueError(f"a batch of {images} images is larger than the largest bucket ({buckets[-1]})")


@dataclass(frozen=True)
class Bucket:
    """What one graph is recorded for."""

    batch: int
    height: int
    width: int
    steps: int
    guidance_scale: float  # 1.0: no guidance, so no unconditional pass

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @classmethod
    def of(cls, request: ResolvedRequest, batch: int) -> Bucket:
        return cls(batch, request.height, request.width, request.steps, float(request.guidance_scale))


class GraphedSampler:
    """Noise and text embeddings -> decoded pixels for one bucket, replayed as one CUDA graph.

    ``example``: text embeddings of the stages' shapes (any number of rows; default: the encoding of
    an empty prompt). ``capture``: record a CUDA graph (default: on a CUDA device); False runs the
    recorded function eagerly on each call. ``pool``: a graph memory pool shared with other samplers.
    """

    def __init__(
        self,
        stages: GenerationStages,
        bucket: Bucket,
        example: TextEmbeddings | None = None,
        capture: bool | None = None,
        pool=None,
    ):
        device = torch.device(stages.device)
        if capture is None:
            capture = device.type == "cuda"
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; these stages run on {device}")
        self.stages, self.bucket = stages, bucket
        self._timesteps = stages.sampler.timesteps(bucket.steps, bucket.height, bucket.width)
        if example is None:
            example = stages.encode_text([""])
        self._text = _static_text(example, bucket.batch)
        self._uncond = _static_text(example, bucket.batch) if bucket.guided else None
        f = stages.latent_factor
        shape = (bucket.batch, stages.latent_channels, bucket.height // f, bucket.width // f)
        self._noise = torch.zeros(shape, device=device, dtype=stages.dtype)
        self._rows = bucket.batch
        self._graph = None
        self._latents = self._pixels = None
        if capture:
            self._capture(device, pool)

    @torch.no_grad()
    def _run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the graph records: :func:`snapgen.generation.generate` from the noise on, without callbacks."""
        velocity = guided(cfg_velocity(self.stages.unet_velocity, self._text, self._uncond), self.bucket.guidance_scale)
        latents = sample_euler(velocity, self._noise, self._timesteps)
        return latents, self.stages.decode(latents)

    @torch.no_grad()
    def _capture(self, device: torch.device, pool) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Thread-local: a worker records from its own thread, and CUDA work in another thread of the process
        # (the embedded server runs its worker beside the API) must not break the capture.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self._latents, self._pixels = self._run()
        self._graph = graph

    @property
    def captured(self) -> bool:
        return self._graph is not None

    @property
    def latents(self) -> torch.Tensor:
        """The final latents of the last call (its rows only); overwritten by the next call."""
        if self._latents is None:
            raise RuntimeError("the sampler has not run yet")
        return self._latents[: self._rows]

    @torch.no_grad()
    def __call__(self, text: TextEmbeddings, uncond: TextEmbeddings | None, noise: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], one row per row of ``noise`` (at most the bucket's batch). The tensor is the
        graph's output buffer: read or copy it before the next call of any sampler sharing its pool."""
        rows = noise.shape[0]
        if not 1 <= rows <= self.bucket.batch:
            raise ValueError(f"this sampler takes 1 to {self.bucket.batch} rows, got {rows}")
        if (uncond is not None) != self.bucket.guided:
            need = "needs" if self.bucket.guided else "takes no"
            raise ValueError(f"guidance scale {self.bucket.guidance_scale} {need} unconditional text")
        _fill(self._noise, noise)
        _fill_text(self._text, text, rows)
        if uncond is not None:
            _fill_text(self._uncond, uncond, rows)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._latents, self._pixels = self._run()
        self._rows = rows
        return self._pixels[:rows]


def _static_text(example: TextEmbeddings, rows: int) -> TextEmbeddings:
    def grown(x):
        return x[:1].expand(rows, *x.shape[1:]).clone()

    return TextEmbeddings(
        grown(example.tokens), grown(example.mask), None if example.pooled is None else grown(example.pooled)
    )


def _fill(static: torch.Tensor, given: torch.Tensor) -> None:
    """Copy ``given`` into the first rows of ``static`` and its last row into the rest (the padding)."""
    if tuple(given.shape[1:]) != tuple(static.shape[1:]):
        raise ValueError(f"expected rows of shape {tuple(static.shape[1:])}, got {tuple(given.shape[1:])}")
    rows = given.shape[0]
    static[:rows].copy_(given)
    if rows < static.shape[0]:
        static[rows:].copy_(given[-1:].expand(static.shape[0] - rows, *given.shape[1:]))


def _fill_text(static: TextEmbeddings, given: TextEmbeddings, rows: int) -> None:
    if given.tokens.shape[0] != rows:
        raise ValueError(f"{given.tokens.shape[0]} rows of text for {rows} rows of noise")
    if (given.pooled is None) != (static.pooled is None):
        raise ValueError("the text embeddings differ from the sampler's in having a pooled vector")
    _fill(static.tokens, given.tokens)
    _fill(static.mask, given.mask)
    if given.pooled is not None:
        _fill(static.pooled, given.pooled)


class SamplerGraphs:
    """One :class:`GraphedSampler` per bucket for ``stages``, made on first use (or by :meth:`prepare`),
    at most ``max_graphs`` kept (least recently used dropped); batches up to ``max_batch`` images."""

    def __init__(self, stages: GenerationStages, max_batch: int, capture: bool | None = None, max_graphs: int = 64):
        device = torch.device(stages.device)
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this model runs on {device}")
        self.stages, self.buckets, self.max_graphs = stages, batch_buckets(max_batch), max_graphs
        self._samplers: OrderedDict[Bucket, GraphedSampler] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._example: TextEmbeddings | None = None

    def __len__(self) -> int:
        return len(self._samplers)

    def accepts(self, request: ResolvedRequest, previews: bool = False) -> bool:
        """Whether ``request`` can run as a graph: text to image, no step previews, within the largest bucket."""
        return request.strength is None and not previews and request.images <= self.buckets[-1]

    def sampler(self, bucket: Bucket) -> GraphedSampler:
        found = self._samplers.get(bucket)
        if found is not None:
            self._samplers.move_to_end(bucket)
            return found
        if self._example is None:
            self._example = self.stages.encode_text([""])
        made = GraphedSampler(self.stages, bucket, self._example, capture=self.capture, pool=self._pool)
        self._samplers[bucket] = made
        while len(self._samplers) > self.max_graphs:
            self._samplers.popitem(last=False)
        return made

    def prepare(self, height: int, width: int, steps: int, guidance_scale: float) -> None:
        """Make the graphs of every batch bucket at this size, steps and guidance (a worker's warm-up)."""
        for batch in self.buckets:
            self.sampler(Bucket(batch, height, width, steps, float(guidance_scale)))

    @torch.no_grad()
    def generate(self, request: ResolvedRequest, on_step: StepCallback | None = None) -> Generated:
        """:func:`snapgen.generation.generate` for a request :meth:`accepts`, the sampler and decoder in one replay.

        ``on_step(steps, steps, latents)`` once, after the replay; raising from it discards the batch.
        Timings: ``unet_s`` is the replay (the U-Net steps and the decoder), ``decode_s`` is 0.
        """
        if not self.accepts(request):
            raise ValueError("this request cannot run as a graph (image-to-image, or larger than the largest bucket)")
        start = time.perf_counter()
        stages = self.stages
        cond = stages.encode_text(list(request.prompts))
        uncond = stages.encode_text(list(request.negative_prompts)) if request.guidance_scale != 1.0 else None
        text_done = time.perf_counter()
        f = stages.latent_factor
        shape = (stages.latent_channels, request.height // f, request.width // f)
        noise = randn_tensor(list(request.seeds), shape, device=stages.device, dtype=stages.dtype)
        sampler = self.sampler(Bucket.of(request, bucket_batch(request.images, self.buckets)))
        pixels = sampler(cond, uncond, noise).clone()
        latents = sampler.latents.clone()
        end = time.perf_counter()
        if on_step is not None:
            on_step(request.steps, request.steps, latents)
        timings = {"text_s": text_done - start, "unet_s": end - text_done, "decode_s": 0.0, "total_s": end - start}
        return Generated(latents=latents, pixels=pixels, timings=timings)
