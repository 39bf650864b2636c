"""The GPU measurements that judge the Triton kernels and the one-graph sampler, as parts that each run in a
process of their own under a time budget (``bench/gpu_session.sh`` runs them all, ``bench/bench_gpu.py --part
NAME`` one).

    unet-snapgen   one snapgen-379m U-Net step, 1024 px, fp16, batch 1, 77 text tokens (random weights)
    unet-sdxl      SDXL's U-Net measured the same way
    image-1024     a 4-step 1024 px image: text (CLIP-L, CLIP-G and Gemma-2-2b in their shapes, random weights),
                   4 snapgen-379m steps and the tiny decoder, fp16, batch 1
    default-model  the embedded default model (its weights; 128 px, 4 steps) from text embeddings to pixels:
                   latency at batch 1, images/s at batch 64; whether a graph gives eager's bytes
    decoder        the tiny decoder at 1024 px, fp16, batch 1
    server         the worker's engine (``TorchBackend.generate``: text encoder to uint8 images), default model

Modes, where they apply: ``eager``; ``graph`` (the same kernels replayed as a CUDA graph: for a U-Net or decoder
the one call, for a sampler the whole of it, ``snapgen.graphed``); ``triton`` and ``triton+graph`` (the fused
kernels of ``snapgen.models.kernels``); ``compile`` and ``compile+graph`` (``torch.compile``'s default mode, then
its kernels captured as a graph). A mode's result is written as soon as it is measured, and a mode is marked
running before it starts, so a part stopped by its budget keeps what it had and shows what it was doing.

``smoke``: tiny shapes, one step, one run each, on whatever device there is (the CPU in CI, where graphs run
uncaptured and ``torch.compile`` uses its eager backend; compiling and Triton's interpreter are tried in the decoder
part only, the cheapest): checks that every path runs, measures nothing.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from benchlib import write_json
from torch import nn

PARTS = ("unet-snapgen", "unet-sdxl", "image-1024", "default-model", "decoder", "server")
MODULE_MODES = ("eager", "graph", "triton", "triton+graph", "compile", "compile+graph")
COMPILE_NEEDS_S = 45  # a mode that compiles starts only with this much of the part's budget left


@dataclass
class Part:
    """One part's run: where it writes, what is left of its budget, and its results so far."""

    name: str
    out: Path
    budget_s: float
    smoke: bool
    device: torch.device
    warmup: int
    runs: int
    started: float = field(default_factory=time.monotonic)
    report: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        write_json(self.out, self.report)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.float32


def environment(device: torch.device) -> dict:
    info = {"date": dt.date.today().isoformat(), "device": str(device), "torch": torch.__version__}
    info["cuda"] = torch.version.cuda
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["kernels"] = kernels_reason() or "available"
    return info


# -- timing -------------------------------------------------------------------------------------------------------


def device_ms(fn: Callable[[], object], part: Part) -> float:
    """Median milliseconds of ``part.runs`` calls after ``part.warmup``: CUDA events on a GPU, else the wall clock."""
    for _ in range(part.warmup):
        fn()
    cuda = part.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(part.device)
    times = []
    for _ in range(part.runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(part.device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def as_graph(fn: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], object]:
    """``fn`` (on fixed input tensors) captured as a CUDA graph; returns the replay. Without CUDA: ``fn`` itself."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def compiled(module: nn.Module, device: torch.device):
    """``torch.compile`` in its default mode; on a CPU its eager backend (the smoke run checks the wiring only)."""
    return torch.compile(module, backend="inductor" if device.type == "cuda" else "eager", dynamic=False)


def kernels_reason() -> str | None:
    """None where ``snapgen.models.kernels`` can run Triton kernels here, else why not."""
    try:
        from snapgen.models import kernels
    except ImportError as e:
        return f"snapgen.models.kernels cannot be imported: {e}"
    return kernels.available()


def set_kernels(module: nn.Module, kind: str) -> None:
    from snapgen.models import kernels

    kernels.set_kernels(module, kind)


def cast(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module`` on ``device`` in ``dtype``; ``.half()`` rather than ``.to(dtype=...)``, on which diffusers' models
    warn about float32 modules that these models do not have."""
    module = module.to(device)
    return {torch.float16: module.half, torch.bfloat16: module.bfloat16}.get(dtype, module.float)()


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def run_modes(part: Part, row: dict, modes: tuple[str, ...], measure: Callable[[str], dict]) -> None:
    """``measure(mode)`` for each mode, its result (or why it has none) stored in ``row`` and saved at once."""
    reason = kernels_reason()
    for mode in modes:
        if part.smoke and part.name != "decoder" and ("triton" in mode or "compile" in mode):
            row[mode] = {"skipped": "smoke run: tried in the decoder part only"}
            continue
        if "triton" in mode and reason is not None:
            row[mode] = {"skipped": reason}
            continue
        compiles = "compile" in mode and not (mode == "compile+graph" and "ms" in row.get("compile", {}))
        if compiles and part.left() < COMPILE_NEEDS_S and not part.smoke:
            row[mode] = {"skipped": f"{part.left():.0f} s of the part's budget left"}
            continue
        row[mode] = {"running": True}
        part.save()
        try:
            row[mode] = measure(mode)
        except Exception as e:  # one mode failing (capture, compile, a kernel) must not cost the others
            row[mode] = {"error": one_line(e)}
        part.save()
        print(part.name, row.get("name", ""), mode, row[mode], flush=True)


# -- one module call: a U-Net step, a decoder -------------------------------------------------------------------


@torch.inference_mode()
def measure_module(part: Part, name: str, model: nn.Module, args: tuple, kwargs: dict, modes: tuple[str, ...]) -> None:
    row = {"name": name, "params": sum(p.numel() for p in model.parameters())}
    part.report.setdefault("rows", []).append(row)
    model = cast(model, part.device, part.dtype).eval()
    state, switchable = {}, kernels_reason() is None

    def measure(mode: str) -> dict:
        if switchable:
            set_kernels(model, "triton" if "triton" in mode else "torch")
        if mode.startswith("compile"):
            if "fn" not in state:
                fn = compiled(model, part.device)
                t0 = time.perf_counter()
                fn(*args, **kwargs)
                state["fn"], state["compile_s"] = fn, time.perf_counter() - t0
            call = lambda: state["fn"](*args, **kwargs)  # noqa: E731
        else:
            call = lambda: model(*args, **kwargs)  # noqa: E731
        if mode.endswith("graph"):
            call = as_graph(call, part.device)
        result = {"ms": device_ms(call, part)}
        if mode == "compile":
            result["compile_s"] = state["compile_s"]
        return result

    run_modes(part, row, modes, measure)
    free_memory(part.device)


def _inputs_on(inputs, device, dtype):
    def one(x):
        if isinstance(x, dict):
            return {k: one(v) for k, v in x.items()}
        x = x.to(device)
        return x.to(dtype) if x.is_floating_point() else x

    args, kwargs = inputs
    return tuple(one(a) for a in args), one(kwargs)


def part_unet_snapgen(part: Part) -> None:
    from bench_efficiency import snapgen_unet

    from snapgen.models.configs import unet_config

    config, resolution = (unet_config("snapgen-tiny"), 64) if part.smoke else (unet_config("snapgen-379m"), 1024)
    workload = snapgen_unet("SnapGen U-Net (snapgen-379m)", config, resolution, 77)
    torch.manual_seed(0)
    model = workload.build(part.device)
    args, kwargs = _inputs_on(workload.inputs(torch.device("cpu")), part.device, part.dtype)
    part.report["resolution"] = resolution
    measure_module(part, workload.name, model, args, kwargs, MODULE_MODES)


SDXL_SMOKE = dict(
    block_out_channels=(32, 64, 64),
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 2, 2),
    cross_attention_dim=32,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=8,
    layers_per_block=1,
)


def part_unet_sdxl(part: Part) -> None:
    from bench_efficiency import SDXL_TIME_IDS, SDXL_UNET_CONFIG, sdxl_unet
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if part.smoke:
        resolution, config = 64, dict(SDXL_UNET_CONFIG, **SDXL_SMOKE)
        model = UNet2DConditionModel(**config)
        added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, SDXL_TIME_IDS)}
        inputs = (
            (torch.randn(1, 4, 8, 8), torch.full((1,), 500.0), torch.randn(1, 77, 32)),
            {"added_cond_kwargs": added},
        )
    else:
        resolution, workload = 1024, sdxl_unet(1024)
        with torch.device(part.device):
            model = workload.build(part.device)
        inputs = workload.inputs(torch.device("cpu"))
    args, kwargs = _inputs_on(inputs, part.device, part.dtype)
    part.report["resolution"] = resolution
    measure_module(part, "SDXL U-Net (diffusers)", model, args, kwargs, ("eager", "graph", "compile", "compile+graph"))


def part_decoder(part: Part) -> None:
    from snapgen.models.autoencoder import LatentDecoder
    from snapgen.models.tiny_decoder import TinyDecoder

    resolution = 64 if part.smoke else 1024
    torch.manual_seed(0)
    with torch.device(part.device):
        decoder = LatentDecoder(TinyDecoder(latent_channels=16), "TinyDecoder", 1.0, None)
    latents = torch.randn(1, 16, resolution // 8, resolution // 8).to(part.device, part.dtype)
    part.report["resolution"] = resolution
    measure_module(part, "SnapGen TinyDecoder", decoder, (latents,), {}, MODULE_MODES)


# -- the sampler: text embeddings in, pixels out -----------------------------------------------------------------


class Stages:
    """``snapgen.generation.GenerationStages`` from bare modules: a U-Net (or a call standing in for it), a
    ``LatentDecoder`` and fixed text embeddings (the benchmarks time the text encoder apart, or not at all)."""

    def __init__(self, unet, decoder, sampler, text, unet_call=None, latent_factor: int = 8):
        self.unet, self.decoder, self.sampler, self.text = unet, decoder, sampler, text
        self.unet_call = unet_call or (lambda *inputs: unet(*inputs).sample)
        self.latent_channels = int(unet.config.in_channels)
        self.latent_factor = latent_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_text(self, prompts):
        return self.text.select(torch.arange(len(prompts)) % self.text.tokens.shape[0])

    def unet_velocity(self, latents, t, text):
        return self.unet_call(latents, t, text.tokens, text.mask, text.pooled)

    def decode(self, latents):
        return self.decoder.decode(self.decoder.from_diffusion(latents))


def random_text(unet, rows: int, tokens: int, real_tokens: int, device, dtype):
    from snapgen.text import TextEmbeddings

    generator = torch.Generator().manual_seed(0)
    width, pooled = unet.config.cross_attention_dim, unet.config.pooled_projection_dim
    mask = torch.arange(tokens).expand(rows, tokens) < real_tokens
    return TextEmbeddings(
        torch.randn(rows, tokens, width, generator=generator).to(device, dtype),
        mask.to(device),
        None if pooled is None else torch.randn(rows, pooled, generator=generator).to(device, dtype),
    )


def sampler_modes(part: Part, row: dict, stages_for: Callable[[str], Stages], batches: tuple[int, ...],
                  modes: tuple[str, ...], steps: int, size: int) -> None:  # fmt: skip
    """Each mode's sampler (text embeddings -> pixels) at each batch size; ``stages_for(mode)`` builds its stages.
    With an uncaptured twin (``eager``, ``traced``), a graph's pixels are compared with its twin's bytes."""
    from snapgen.generation import to_uint8
    from snapgen.graphed import Bucket, GraphedSampler
    from snapgen.noise import randn_tensor

    eager_pixels = {}

    def measure(mode: str) -> dict:
        stages = stages_for(mode)
        capture = "graph" in mode and part.device.type == "cuda"
        result = {"captured": capture}
        for batch in batches:
            bucket = Bucket(batch, size, size, steps, 1.0)
            t0 = time.perf_counter()
            sampler = GraphedSampler(stages, bucket, stages.text, capture=capture)
            result[f"batch{batch}_prepare_s"] = time.perf_counter() - t0
            text = stages.encode_text([""] * batch)
            shape = (stages.latent_channels, size // 8, size // 8)
            noise = randn_tensor(list(range(batch)), shape, device=stages.device, dtype=stages.dtype)
            result[f"batch{batch}_ms"] = device_ms(lambda s=sampler, x=text, n=noise: s(x, None, n), part)
            pixels = torch.stack([torch.from_numpy(a) for a in to_uint8(sampler(text, None, noise))])
            if batch == batches[0]:
                if "graph" not in mode:
                    eager_pixels.setdefault(str(stages.dtype), pixels)
                elif str(stages.dtype) in eager_pixels:
                    twin = eager_pixels[str(stages.dtype)]
                    result["max_diff_vs_eager"] = int((pixels.int() - twin.int()).abs().max())
                    result["bytes_equal_eager"] = bool(torch.equal(pixels, twin))
            del sampler
            free_memory(part.device)
        return result

    run_modes(part, row, modes, measure)


def part_default_model(part: Part) -> None:
    from snapgen.model_dir import default_model_dir
    from snapgen.models.autoencoder import load_decoder
    from snapgen.models.unet import SnapGenUNet
    from snapgen.sampling import SamplerConfig
    from snapgen.tracing import TracedUNet

    directory = default_model_dir()
    sampler = SamplerConfig.load(directory / "scheduler")
    batches = (1, 2) if part.smoke else (1, 64)
    models = {}

    def stages_for(mode: str) -> Stages:
        dtype = torch.float32 if mode.startswith("fp32") else part.dtype
        if dtype not in models:
            unet = cast(SnapGenUNet.from_pretrained(directory / "unet", use_safetensors=True), part.device, dtype)
            decoder = cast(load_decoder(directory / "decoder"), part.device, dtype)
            models[dtype] = (unet.eval(), decoder.eval())
        unet, decoder = models[dtype]
        for module in (unet, decoder):
            if kernels_reason() is None:
                set_kernels(module, "triton" if "triton" in mode else "torch")
        call = None
        if "traced" in mode:
            call = TracedUNet(unet)
        elif "compile" in mode:
            fn = compiled(unet, part.device)
            call = lambda *inputs: fn(*inputs).sample  # noqa: E731
        text = random_text(unet, max(batches), 32, 8, part.device, dtype)
        return Stages(unet, decoder, sampler, text, call)

    half = "fp16" if part.dtype == torch.float16 else "fp32"
    modes = (
        ("fp32 eager", "fp32 graph", "fp32 traced graph")
        if part.smoke
        else ("fp32 eager", "fp32 traced", "fp32 graph", "fp32 traced graph")
    )
    if half != "fp32":
        modes += (f"{half} eager", f"{half} graph")
    modes += (f"{half} triton+graph", f"{half} compile+graph")
    steps = 1 if part.smoke else sampler.default_steps
    row = {"name": "default model", "steps": steps, "resolution": 128, "batches": list(batches)}
    part.report["rows"] = [row]
    sampler_modes(part, row, stages_for, batches, modes, steps, 128)


# -- a 4-step 1024 px image with SnapGen's text encoders (random weights) ----------------------------------------


class RandomTextStack(nn.Module):
    """SnapGen's text encoders in their shapes, random weights (timing only): CLIP-L and CLIP-G on 77 token ids
    each, Gemma-2-2b on 128; tokens projected to the U-Net's width and concatenated (282 tokens), the two CLIP
    pooled projections concatenated (768 + 1280 = 2048). Tokenization is not timed."""

    def __init__(self, width: int, pooled_dim: int, small: bool = False):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model

        if small:
            clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
            configs = [
                CLIPTextConfig(**clip, projection_dim=pooled_dim // 2),
                CLIPTextConfig(**clip, projection_dim=pooled_dim - pooled_dim // 2),
            ]
            gemma = Gemma2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
        else:
            configs = [
                CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               projection_dim=768),
                CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               projection_dim=1280),
            ]  # fmt: skip
            gemma = Gemma2Config()  # its defaults are Gemma-2-2b's shapes
        self.clips = nn.ModuleList(CLIPTextModelWithProjection(c) for c in configs)
        self.gemma = Gemma2Model(gemma)
        widths = [c.hidden_size for c in configs] + [gemma.hidden_size]
        self.projections = nn.ModuleList(nn.Linear(w, width) for w in widths)
        self.lengths = (77, 77, 128)
        self.vocab = [c.vocab_size for c in configs] + [gemma.vocab_size]

    def ids(self, batch: int, device) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return [
            torch.randint(0, v, (batch, n), generator=generator).to(device) for v, n in zip(self.vocab, self.lengths)
        ]

    def forward(self, ids: list[torch.Tensor]):
        outs = [clip(input_ids=i) for clip, i in zip(self.clips, ids[:2])]
        hidden = [o.last_hidden_state for o in outs] + [self.gemma(input_ids=ids[2], use_cache=False).last_hidden_state]
        tokens = torch.cat([p(h) for p, h in zip(self.projections, hidden)], dim=1)
        return tokens, torch.cat([o.text_embeds for o in outs], dim=-1)


def timed_text(part: Part, row: dict, width: int, pooled_dim: int):
    """SnapGen's text encoders (random weights) timed on one prompt's token ids, eager and as a graph; their
    embeddings of it. The encoders are freed on return: the image's U-Net needs the memory more."""
    from snapgen.text import TextEmbeddings

    with torch.device(part.device):
        stack = RandomTextStack(width, pooled_dim, part.smoke)
    stack = stack.to(part.dtype).eval()
    ids = stack.ids(1, part.device)
    row["text_tokens"] = sum(stack.lengths)
    with torch.inference_mode():
        row["text eager"] = {"ms": device_ms(lambda: stack(ids), part)}
        part.save()
        try:
            row["text graph"] = {"ms": device_ms(as_graph(lambda: stack(ids), part.device), part)}
        except Exception as e:  # a host sync inside the encoders makes capture fail: eager is the answer then
            row["text graph"] = {"error": one_line(e)}
        tokens, pooled = stack(ids)
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=part.device)
    return TextEmbeddings(tokens.clone(), mask, pooled.clone())


def part_image_1024(part: Part) -> None:
    from snapgen.models.autoencoder import LatentDecoder
    from snapgen.models.configs import build_unet, unet_config
    from snapgen.models.tiny_decoder import TinyDecoder
    from snapgen.sampling import SamplerConfig

    config, size = (unet_config("snapgen-tiny"), 64) if part.smoke else (unet_config("snapgen-379m"), 1024)
    row = {"name": "4-step image", "resolution": size}
    part.report["rows"] = [row]
    text = timed_text(part, row, config["cross_attention_dim"], config["pooled_projection_dim"])
    free_memory(part.device)
    torch.manual_seed(0)
    with torch.device(part.device):
        unet = cast(build_unet(config), part.device, part.dtype).eval()
        decoder = LatentDecoder(TinyDecoder(latent_channels=config["in_channels"]), "TinyDecoder", 1.0, None)
    decoder = decoder.to(part.dtype).eval()
    sampler = SamplerConfig(default_steps=4)

    def stages_for(mode: str) -> Stages:
        if kernels_reason() is None:
            for module in (unet, decoder):
                set_kernels(module, "triton" if "triton" in mode else "torch")
        call = None
        if "compile" in mode:
            fn = compiled(unet, part.device)
            call = lambda *inputs: fn(*inputs).sample  # noqa: E731
        return Stages(unet, decoder, sampler, text, call)

    steps = 1 if part.smoke else 4
    row["steps"] = steps
    sampler_modes(part, row, stages_for, (1,), ("eager", "graph", "triton+graph", "compile+graph"), steps, size)


# -- the worker's engine ---------------------------------------------------------------------------------------------


def part_server(part: Part) -> None:
    import numpy as np

    from server.backends import TorchBackend
    from snapgen.graphed import SamplerGraphs
    from snapgen.model_dir import default_model_dir
    from snapgen.request import GenerationRequest

    cuda = part.device.type == "cuda"
    batches = (1,) if part.smoke else (1, 8, 64)
    modes = {  # name: (TorchBackend options, the mode whose images it must equal bit for bit)
        "fp32 traced U-Net": ({"trace_unet": True}, None),
        "fp32 graph": ({"trace_unet": True, "graph": True}, "fp32 traced U-Net"),
        "fp16 traced U-Net": ({"dtype": "fp16", "trace_unet": True}, None),
        "fp16 graph": ({"dtype": "fp16", "trace_unet": True, "graph": True}, "fp16 traced U-Net"),
        "fp16 triton graph": ({"dtype": "fp16", "kernels": "triton", "graph": True}, None),
    }
    if part.smoke:  # the new path alone, in fp32, untraced (on a CPU, uncaptured)
        modes = {"fp32 graph": ({"trace_unet": False, "graph": True}, None)}
    prompts = ["a red circle to the left of a blue square", "three green triangles"] * 32
    steps = 1 if part.smoke else None  # None: the model's default (4)
    row = {"name": "server engine", "batches": list(batches)}
    part.report["rows"] = [row]
    part.report["text_encoder_weights"] = os.environ.get("SNAPGEN_BENCH_TEXT_WEIGHTS", "real")
    images_of = {}

    def measure(mode: str) -> dict:
        options, twin = modes[mode]
        options = dict(options, device=str(part.device), max_batch=max(batches))
        graph = options.pop("graph", False) and cuda
        backend = TorchBackend(default_model_dir(), **options, graph=graph)
        if modes[mode][0].get("graph") and not cuda:  # the CPU: the same path, uncaptured
            backend.graphs = SamplerGraphs(backend, max(batches), capture=False)
        t0 = time.perf_counter()
        backend.warmup()
        result = {"warmup_s": time.perf_counter() - t0}
        for batch in batches:
            job = backend.resolve(GenerationRequest(prompts[:batch], seed=0, guidance_scale=1.0, steps=steps))
            result[f"batch{batch}_ms"] = device_ms(lambda j=job: backend.generate(j), part)
        images = np.stack(backend.generate(job).images).astype(np.int16)
        images_of[mode] = images
        if twin is not None and twin in images_of:
            result["identical_to_twin"] = bool(np.array_equal(images, images_of[twin]))
        return result

    run_modes(part, row, tuple(modes), measure)


RUNNERS = {
    "unet-snapgen": part_unet_snapgen,
    "unet-sdxl": part_unet_sdxl,
    "image-1024": part_image_1024,
    "default-model": part_default_model,
    "decoder": part_decoder,
    "server": part_server,
}


def run_part(name: str, results: Path, budget_s: float, smoke: bool, warmup: int, runs: int) -> dict:
    """Measure part ``name`` into ``results/NAME.json``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if smoke:
        warmup, runs = 0, 1
    part = Part(name, results / f"{name}.json", budget_s, smoke, device, warmup, runs)
    part.report = {"part": name, "smoke": smoke, "budget_s": budget_s, **environment(device)}
    part.save()
    try:
        RUNNERS[name](part)
    except Exception as e:  # the part's own set-up failed: say so in its file, the session goes on
        part.report["error"] = one_line(e)
        raise
    finally:
        part.report["elapsed_s"] = time.monotonic() - part.started
        part.save()
    return part.report


def load_parts(paths: list[Path]) -> dict[str, dict]:
    parts = {}
    for path in paths:
        data = json.loads(path.read_text())
        parts[data["part"]] = data
    return parts
