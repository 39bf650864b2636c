"""CPU efficiency benchmark: SnapGen's U-Net and tiny decoder against SDXL/SD3 baselines.

Everything runs with random weights, fp32, batch 1, ``torch.inference_mode`` on the CPU, in one
process, so every number in a report comes from the same machine and the same run:

1. U-Net: ``snapgen-379m`` vs diffusers' SDXL ``UNet2DConditionModel`` (built from its config),
   one denoising step at 512 px and 1024 px.
2. Decoder: SnapGen's ``TinyDecoder`` vs the decoders of diffusers' ``AutoencoderKL`` (SDXL and
   SD3 configs) and ``AutoencoderTiny`` (TAESD), latents -> image at 512 px and 1024 px.
3. Ladder: every step of ``snapgen.models.configs.LADDER`` (SDXL-like -> snapgen-379m), with
   the relative change against the previous step, like the paper's table.

Per workload: parameters, FLOPs per call (``torch.utils.flop_counter.FlopCounterMode`` on the
meta device, multiply-add = 2 FLOPs), median latency of ``--runs`` timed calls after
``--warmup`` untimed ones, achieved GFLOP/s, and the process's peak RSS while the model was
built and run. Usage::

    .venv/bin/python bench/bench_efficiency.py --out docs/benchmarks.md   # full run (~10+ min)
    .venv/bin/python bench/bench_efficiency.py --quick                    # smoke test, 128 px
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from benchlib import cpu_name, write_json, write_section
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from snapgen.models.configs import LADDER, build_unet, count_parameters, unet_config
from snapgen.models.tiny_decoder import TinyDecoder

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "efficiency.json"
LATENT_FACTOR = 8
LOW_CPU_UTILISATION = 0.9  # below this share of threads x wall time, a timing is flagged as contended

# --------------------------------------------------------------------------------------------
# Baseline configs (diffusers classes, random weights)
# --------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the fields that shape the network.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' historic name: these are head *counts* (x64 dims)
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 (CLIP-G pooled) + 6 * 256 (size/crop ids)
    use_linear_projection=True,
    norm_num_groups=32,
)
SDXL_TEXT_TOKENS = 77  # CLIP-L (768) and CLIP-G (1280) concatenated along channels: 77 x 2048
SDXL_POOLED_DIM = 1280
SDXL_TIME_IDS = 6

# SnapGen's merged text embedding (snapgen.text.MergedTextEncoder with its encoders' default
# max_length): CLIP-L 77 + CLIP-G 77 + Gemma-2-2b 128 tokens, each projected to 2304.
SNAPGEN_TEXT_TOKENS = 77 + 77 + 128

_VAE_BLOCKS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    sample_size=1024,
)
SDXL_VAE_CONFIG = dict(_VAE_BLOCKS, latent_channels=4, scaling_factor=0.13025)
SD3_VAE_CONFIG = dict(
    _VAE_BLOCKS,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TAESD_CONFIG: dict = {}  # AutoencoderTiny defaults: TAESD, 4-channel latents


class KLDecoder(nn.Module):
    """The decode half of an ``AutoencoderKL`` (post-quant conv + decoder), without its encoder."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# --------------------------------------------------------------------------------------------
# Workloads: a model builder + an input builder, both device-agnostic (meta or cpu)
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    resolution: int  # output image side in pixels
    build: Callable[[torch.device], nn.Module]
    inputs: Callable[[torch.device], tuple[tuple, dict]]
    latent_channels: int
    notes: str = ""
    identity: str | None = None  # equal identities = the same network and inputs (defaults to name)

    @property
    def latent_side(self) -> int:
        return self.resolution // LATENT_FACTOR

    @property
    def key(self) -> tuple[str, int]:
        return (self.identity or self.name, self.resolution)


def _on(device: torch.device, cls, **config) -> nn.Module:
    with torch.device(device):
        return cls(**config)


def snapgen_unet(name: str, config: dict, resolution: int, text_tokens: int) -> Workload:
    side = resolution // LATENT_FACTOR
    channels, context, pooled = config["in_channels"], config["cross_attention_dim"], config["pooled_projection_dim"]

    def inputs(device):
        return (
            torch.randn(1, channels, side, side, device=device),
            torch.full((1,), 0.5, device=device),
            torch.randn(1, text_tokens, context, device=device),
            torch.ones(1, text_tokens, dtype=torch.bool, device=device),
            torch.randn(1, pooled, device=device),
        ), {}

    # The ladder's last step is snapgen-379m itself: the identity lets both sections share one measurement.
    identity = f"snapgen-unet {json.dumps(config, sort_keys=True)} text={text_tokens}"
    return Workload(
        name,
        resolution,
        lambda device: build_unet(config, device),
        inputs,
        channels,
        f"{text_tokens} text tokens x {context}, pooled {pooled}, with mask",
        identity,
    )


def sdxl_unet(resolution: int) -> Workload:
    from diffusers import UNet2DConditionModel

    side = resolution // LATENT_FACTOR
    channels = SDXL_UNET_CONFIG["in_channels"]

    def inputs(device):
        added = {
            "text_embeds": torch.randn(1, SDXL_POOLED_DIM, device=device),
            "time_ids": torch.randn(1, SDXL_TIME_IDS, device=device),
        }
        return (
            torch.randn(1, channels, side, side, device=device),
            torch.full((1,), 500.0, device=device),
            torch.randn(1, SDXL_TEXT_TOKENS, SDXL_UNET_CONFIG["cross_attention_dim"], device=device),
        ), {"added_cond_kwargs": added}

    return Workload(
        "SDXL U-Net (diffusers)",
        resolution,
        lambda device: _on(device, UNet2DConditionModel, **SDXL_UNET_CONFIG),
        inputs,
        channels,
        f"{SDXL_TEXT_TOKENS} text tokens x 2048, pooled 1280 + 6 time ids",
    )


def decoder(name: str, build: Callable[[torch.device], nn.Module], latent_channels: int, resolution: int) -> Workload:
    side = resolution // LATENT_FACTOR

    def inputs(device):
        return (torch.randn(1, latent_channels, side, side, device=device),), {}

    return Workload(name, resolution, build, inputs, latent_channels)


def decoder_workloads(resolution: int) -> list[Workload]:
    from diffusers import AutoencoderKL, AutoencoderTiny

    return [
        decoder("SnapGen TinyDecoder", lambda d: _on(d, TinyDecoder), 16, resolution),
        decoder(
            "TAESD decoder (AutoencoderTiny)", lambda d: _on(d, AutoencoderTiny, **TAESD_CONFIG).decoder, 4, resolution
        ),
        decoder(
            "SDXL VAE decoder (AutoencoderKL)",
            lambda d: KLDecoder(_on(d, AutoencoderKL, **SDXL_VAE_CONFIG)),
            4,
            resolution,
        ),
        decoder(
            "SD3 VAE decoder (AutoencoderKL)",
            lambda d: KLDecoder(_on(d, AutoencoderKL, **SD3_VAE_CONFIG)),
            16,
            resolution,
        ),
    ]


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

FLOP_KINDS = {
    "convolution": "conv",
    "addmm": "linear",
    "mm": "linear",
    "bmm": "attention",
    "baddbmm": "attention",
}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernel.

    On real CPU tensors ``F.scaled_dot_product_attention`` runs
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's counter has no formula
    for (it counts 0). On the meta device SDPA falls back to the math path (``bmm``), which it
    counts; this mapping makes both agree.
    """
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def flops_by_kind(counter: FlopCounterMode) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[-1]
        kind = "attention" if "attention" in name else FLOP_KINDS.get(name, "other")
        kinds[kind] = kinds.get(kind, 0) + int(flops)
    return kinds


def run_model(model: nn.Module, inputs: tuple[tuple, dict]):
    args, kwargs = inputs
    return model(*args, **kwargs)


def count_flops(model: nn.Module, inputs: tuple[tuple, dict]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call (multiply-add = 2), total and per kind (conv / linear / attention)."""
    with torch.inference_mode(), flop_counter() as counter:
        run_model(model, inputs)
    return counter.get_total_flops(), flops_by_kind(counter)


@dataclass
class Timing:
    wall: list[float]  # seconds per timed call
    cpu: list[float]  # this process's CPU seconds (all threads) per timed call

    def cpu_utilisation(self, threads: int) -> float:
        """CPU seconds / (wall seconds x threads): well below 1 means the cores were shared or idle."""
        return sum(self.cpu) / (sum(self.wall) * threads)


def measure_latency(fn: Callable[[], object], warmup: int, runs: int) -> Timing:
    """Wall-clock (and CPU) seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    timing = Timing([], [])
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        timing.wall.append(time.perf_counter() - wall)
        timing.cpu.append(time.process_time() - cpu)
    return timing


def _status_kib(field_name: str) -> int | None:
    try:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS drops between models."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak resident set size of this process inside a ``with`` block, in bytes.

    Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS, so the peak is
    this block's alone. Elsewhere it falls back to ``ru_maxrss``, a process-lifetime peak
    (``resettable`` is then False and the number only grows from workload to workload).
    """

    def __enter__(self) -> PeakRSS:
        _release_freed_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = _status_kib("VmHWM") is not None
        except OSError:
            self.resettable = False
        self.baseline = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM") if self.resettable else None
        # ru_maxrss is KiB on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        self.peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class Result:
    name: str
    resolution: int
    latent: list[int]
    params: int
    flops: int
    flops_by_kind: dict[str, int]
    flops_device: str
    notes: str = ""
    timed: bool = False
    skipped: str | None = None  # why latency was not measured
    latency_runs: list[float] = field(default_factory=list)
    latency_s: float | None = None
    gflops_per_s: float | None = None
    cpu_utilisation: float | None = None  # see Timing.cpu_utilisation
    flops_cpu_check: int | None = None  # FLOPs counted on real tensors during the warm-up call
    peak_rss_bytes: int | None = None
    rss_increase_bytes: int | None = None  # peak minus the RSS before the model was built


class Bench:
    """Measures workloads with the run's settings; caches results so sections can share them."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results: dict[tuple[tuple[str, int], bool], Result] = {}
        self.log = print if not args.silent else (lambda *a, **k: None)

    def measure(self, workload: Workload, skip: str | None = None) -> Result:
        """Params and FLOPs, then latency and memory unless ``skip`` gives a reason not to time it."""
        timed = skip is None
        for cached in [(workload.key, timed)] + ([] if timed else [(workload.key, True)]):
            if cached in self.results:
                return self.results[cached]
        started = time.perf_counter()
        result = self._static(workload)
        if timed and self.args.latency_max_params and result.params > self.args.latency_max_params:
            skip = f"over --latency-max-params {self.args.latency_max_params:.3g}"
        if skip is None:
            self._time(workload, result)
        else:
            result.skipped = skip
        self.log(
            f"  {workload.name} @ {workload.resolution}px: {_fmt_result(result)} "
            f"[{time.perf_counter() - started:.1f} s]",
            file=sys.stderr,
            flush=True,
        )
        self.results[(workload.key, timed)] = result
        return result

    def _static(self, workload: Workload) -> Result:
        """Params and FLOPs without allocating weights (meta device); real tensors as a fallback."""
        device = "meta"
        try:
            model = workload.build(torch.device("meta")).eval()
            flops, kinds = count_flops(model, workload.inputs(torch.device("meta")))
        except Exception as error:  # an op without a meta kernel: count on real tensors instead
            self.log(f"  meta FLOP count failed for {workload.name} ({error!r}); counting on cpu", file=sys.stderr)
            device = "cpu"
            model = workload.build(torch.device("cpu")).eval()
            flops, kinds = count_flops(model, workload.inputs(torch.device("cpu")))
        side = workload.latent_side
        result = Result(
            workload.name,
            workload.resolution,
            [workload.latent_channels, side, side],
            count_parameters(model),
            flops,
            kinds,
            device,
            workload.notes,
        )
        del model
        return result

    def _time(self, workload: Workload, result: Result) -> None:
        slow = result.flops > self.args.slow_flops
        runs = self.args.slow_runs if slow else self.args.runs
        with PeakRSS() as rss:
            timing, result.flops_cpu_check = self._build_and_run(workload, self.args.warmup, runs)
        result.timed = True
        result.latency_runs = timing.wall
        result.latency_s = statistics.median(timing.wall)
        result.cpu_utilisation = timing.cpu_utilisation(torch.get_num_threads())
        result.gflops_per_s = result.flops / result.latency_s / 1e9
        result.peak_rss_bytes = rss.peak
        result.rss_increase_bytes = max(rss.peak - rss.baseline, 0) if rss.resettable else None
        _release_freed_memory()

    @staticmethod
    def _build_and_run(workload: Workload, warmup: int, runs: int) -> tuple[Timing, int | None]:
        """Build on the CPU with seeded random weights and time it; the model dies with this frame."""
        torch.manual_seed(0)
        model = workload.build(torch.device("cpu")).eval()
        inputs = workload.inputs(torch.device("cpu"))
        # The first warm-up call doubles as a FLOP count on real tensors (a cross-check of the
        # meta count): the counter only observes the ops, the kernels that run are the same.
        flops_cpu = None
        if warmup > 0:
            flops_cpu, _ = count_flops(model, inputs)
            warmup -= 1
        with torch.inference_mode():
            timing = measure_latency(lambda: run_model(model, inputs), warmup, runs)
        return timing, flops_cpu


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def unet_section(bench: Bench) -> dict:
    args = bench.args
    rows, speedups = [], []
    config = unet_config("snapgen-379m")
    for res in args.unet_resolutions:
        ours = bench.measure(snapgen_unet("SnapGen U-Net (snapgen-379m)", config, res, args.snapgen_text_tokens))
        rows.append(ours)
        if args.skip_sdxl:
            continue
        sdxl = bench.measure(sdxl_unet(res))
        rows.append(sdxl)
        speedups.append(_comparison(res, sdxl, ours))
    return {"rows": rows, "speedups": speedups}


def decoder_section(bench: Bench) -> dict:
    args = bench.args
    rows, speedups = [], []
    for res in args.decoder_resolutions:
        ours, *others = decoder_workloads(res)
        ours_result = bench.measure(ours)
        rows.append(ours_result)
        for other in others:
            too_slow = res > args.kl_max_resolution and "AutoencoderKL" in other.name
            result = bench.measure(other, skip="timed with --kl-1024" if too_slow else None)
            rows.append(result)
            speedups.append(_comparison(res, result, ours_result))
    return {"rows": rows, "speedups": speedups}


def ladder_section(bench: Bench) -> dict:
    args = bench.args
    latency_res = list(args.ladder_latency_resolutions)
    steps = []
    for index, (step, config) in enumerate(LADDER):
        name = f"ladder {index}: {step}"
        per_res = {}
        for res in sorted({args.ladder_flops_resolution, *latency_res}):
            workload = snapgen_unet(name, config, res, args.snapgen_text_tokens)
            per_res[res] = bench.measure(workload, skip=None if res in latency_res else "FLOPs only")
        flops_row = per_res[args.ladder_flops_resolution]
        steps.append(
            {
                "step": step,
                "params": flops_row.params,
                "flops": flops_row.flops,
                "latency_s": {res: per_res[res].latency_s for res in latency_res},
                "timed": {res: per_res[res] for res in latency_res},
                "results": list(per_res.values()),
            }
        )
    return {"flops_resolution": args.ladder_flops_resolution, "latency_resolutions": latency_res, "steps": steps}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _comparison(res: int, baseline: Result, ours: Result) -> dict:
    return {
        "resolution": res,
        "baseline": baseline.name,
        "ours": ours.name,
        "speedup": _ratio(baseline.latency_s, ours.latency_s),
        "contended": _contended(baseline) or _contended(ours),
        "flops_ratio": _ratio(baseline.flops, ours.flops),
        "params_ratio": _ratio(baseline.params, ours.params),
    }


# --------------------------------------------------------------------------------------------
# Machine info and report
# --------------------------------------------------------------------------------------------


def cpu_jiffies() -> list[int] | None:
    """The aggregate ``cpu`` line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None


def steal_share(start: list[int] | None, end: list[int] | None) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two ``cpu_jiffies`` readings."""
    if not start or not end or len(start) < 8:
        return None
    delta = [b - a for a, b in zip(start, end, strict=False)]
    return delta[7] / sum(delta[:8]) if sum(delta[:8]) else None


def machine_info(threads: int) -> dict:
    cpu = cpu_name()
    mem = None
    try:
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem = int(match.group(1)) * 1024 if match else None
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    import diffusers

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "ram_bytes": mem,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
        "git": commit,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


HEADER = """\
# Efficiency benchmarks

How to run (from the repository root, on an otherwise idle machine; about 10-15 minutes on 2
CPU cores, peak memory about 11 GB for the SDXL U-Net at 1024 px):

    .venv/bin/python bench/bench_efficiency.py --out docs/benchmarks.md

It rewrites its own part of this file (between the `bench_efficiency` markers; other sections
stay) and saves the raw numbers to `bench/results/efficiency.json`. Options:
`--runs N` (timed calls per workload, default 3), `--kl-1024` (also time the KL decoders at
1024 px, about a minute per call on 2 cores), `--ladder-1024` (ladder latency at 1024 px as
well), `--quick` (smoke test at 128 px, about 2 minutes); `--help` lists the rest.

What is measured, all with random weights, fp32, batch 1, `torch.inference_mode`, on the CPU
with `torch.set_num_threads` = the usable cores, in a single run:

- **U-Net**: one denoising step of `snapgen-379m` (16-ch latents; 282 merged text tokens of
  width 2304 = CLIP-L 77 + CLIP-G 77 + Gemma-2 128, with their mask; pooled 2048) and of
  diffusers' SDXL `UNet2DConditionModel` built from SDXL-base's config (4-ch latents; 77 text
  tokens of width 2048; pooled 1280 + 6 time ids), at 512 px (64x64 latent) and 1024 px
  (128x128 latent). One call = one step without classifier-free guidance.
- **Decoder**: latents -> RGB at the same output sizes for SnapGen's `TinyDecoder` (16-ch),
  TAESD (`AutoencoderTiny` defaults, 4-ch) and the decoder half (post-quant conv + decoder) of
  `AutoencoderKL` with SDXL's (4-ch) and SD3's (16-ch) configs. KL decoders are timed at
  512 px only unless `--kl-1024`.
- **Ladder**: each step of `snapgen.models.configs.LADDER`, from an SDXL-like U-Net (SDXL's
  widths/depths on SnapGen's latents and text) to `snapgen-379m`, one design switch per step,
  with the change against the previous step (the paper's table).

Columns: **params**; **FLOPs** of one call from `torch.utils.flop_counter.FlopCounterMode`
on the meta device (a multiply-add counts 2; only convolutions, matmuls/linears and attention
are counted, not norms or activations), split into conv / linear / attention (QK^T and AV;
published counts that skip these give roughly conv + linear); the warm-up call counts again on
real CPU tensors as a cross-check. **latency**: median wall-clock of N timed calls after one
warm-up call (a single timed call above 4 TFLOPs: the SDXL U-Net and the KL decoders at
1024 px); **GFLOP/s** = FLOPs / latency; **peak RSS**: the process's peak resident memory while
the model was built and run (weights included; `+` = increase over the RSS before building).
Speed-up = baseline latency / SnapGen latency. The run section records the load average, the
hypervisor's CPU steal and the lowest CPU utilisation of any timed workload: numbers from a
machine whose cores were shared are not comparable. CPU latencies rank the designs; they do
not predict phone latency (the paper's 274 ms U-Net step is on an iPhone 16 Pro Max).
"""


def _bytes(value: int | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.0f} MB"


def _contended(r: Result) -> bool:
    return r.cpu_utilisation is not None and r.cpu_utilisation < LOW_CPU_UTILISATION


def _fmt_latency(r: Result, runs: bool = True) -> str:
    if r.latency_s is None:
        return f"— ({r.skipped})" if r.skipped and runs else "—"
    text = f"{r.latency_s * 1e3:.1f} ms" if r.latency_s < 1 else f"{r.latency_s:.2f} s"
    return text + (f" (n={len(r.latency_runs)})" if runs else "") + (" *" if _contended(r) else "")


def _fmt_load(load: list[float] | None) -> str:
    return "—" if not load else ", ".join(f"{x:.2f}" for x in load)


def _fmt_share(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.0f} %"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _fmt_flops(n: int) -> str:
    return f"{n / 1e12:.3f} T" if n >= 1e12 else f"{n / 1e9:.1f} G"


def _fmt_x(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}x"


def _fmt_change(new: float | None, old: float | None) -> str:
    return "—" if not new or not old else f"{(new / old - 1) * 100:+.1f} %"


def _fmt_result(r: Result) -> str:
    gflops = "" if r.gflops_per_s is None else f", {r.gflops_per_s:.1f} GFLOP/s"
    return f"{_fmt_params(r.params)}, {_fmt_flops(r.flops)}FLOPs, {_fmt_latency(r)}{gflops}"


def _contention_note(results: list[Result]) -> list[str]:
    if not any(_contended(r) for r in results):
        return []
    return [
        "",
        f"\\* CPU utilisation below {LOW_CPU_UTILISATION:.0%} while timing: other processes shared the "
        "cores, so this latency is inflated; rerun on an idle machine.",
    ]


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _measurement_table(rows: list[Result]) -> list[str]:
    headers = ["model", "px", "latent", "params", "FLOPs", "conv / linear / attn", "latency", "GFLOP/s", "peak RSS (+)"]
    body = []
    for r in rows:
        kinds = " / ".join(_fmt_flops(r.flops_by_kind.get(k, 0)) for k in ("conv", "linear", "attention"))
        rss = "—" if r.peak_rss_bytes is None else f"{_bytes(r.peak_rss_bytes)} (+{_bytes(r.rss_increase_bytes)})"
        body.append(
            [
                r.name,
                str(r.resolution),
                "x".join(map(str, r.latent)),
                _fmt_params(r.params),
                _fmt_flops(r.flops),
                kinds,
                _fmt_latency(r),
                "—" if r.gflops_per_s is None else f"{r.gflops_per_s:.1f}",
                rss,
            ]
        )
    return _table(headers, body) + _contention_note(rows)


def _speedup_table(speedups: list[dict]) -> list[str]:
    headers = ["px", "baseline", "vs", "speed-up (latency)", "FLOPs ratio", "params ratio"]
    body = [
        [
            str(s["resolution"]),
            s["baseline"],
            s["ours"],
            _fmt_x(s["speedup"]) + (" *" if s["contended"] and s["speedup"] else ""),
            _fmt_x(s["flops_ratio"]),
            _fmt_x(s["params_ratio"]),
        ]
        for s in speedups
    ]
    return _table(headers, body)


def _ladder_table(ladder: dict) -> list[str]:
    fres, lres = ladder["flops_resolution"], ladder["latency_resolutions"]
    headers = ["#", "step", "params", "Δ params", f"FLOPs @{fres}", "Δ FLOPs"]
    for res in lres:
        headers += [f"latency @{res}", f"Δ latency @{res}"]
    body, prev = [], None
    for i, step in enumerate(ladder["steps"]):
        row = [
            str(i),
            step["step"],
            _fmt_params(step["params"]),
            _fmt_change(step["params"], prev and prev["params"]),
            _fmt_flops(step["flops"]),
            _fmt_change(step["flops"], prev and prev["flops"]),
        ]
        for res in lres:
            row += [
                _fmt_latency(step["timed"][res], runs=False),
                _fmt_change(step["latency_s"][res], prev and prev["latency_s"][res]),
            ]
        body.append(row)
        prev = step
    timed = [r for step in ladder["steps"] for r in step["timed"].values()]
    return _table(headers, body) + _contention_note(timed)


START, END = "<!-- bench_efficiency:start -->", "<!-- bench_efficiency:end -->"

# The efficiency targets the model is held to:
# (what, baseline name, resolution or None for the largest measured, minimum speed-up).
TARGETS = [
    ("SnapGen U-Net at least 5x faster per step than SDXL's at 1024 px", "SDXL U-Net (diffusers)", 1024, 5.0),
    ("tiny decoder at least 50x faster than SDXL's VAE decoder", "SDXL VAE decoder (AutoencoderKL)", None, 50.0),
    ("tiny decoder faster than AutoencoderTiny (TAESD)", "TAESD decoder (AutoencoderTiny)", None, 1.0),
]


def _targets_table(sections: dict) -> list[str]:
    comparisons = [c for name in ("unet", "decoder") if name in sections for c in sections[name]["speedups"]]
    body = []
    for what, baseline, resolution, minimum in TARGETS:
        found = [
            c
            for c in comparisons
            if c["baseline"] == baseline and c["speedup"] and resolution in (None, c["resolution"])
        ]
        if not found:
            body.append([what, "not measured in this run", "—"])
            continue
        c = max(found, key=lambda c: c["resolution"])
        verdict = "met" if c["speedup"] >= minimum else "**missed**"
        if c["contended"]:
            verdict += " (cores were shared: rerun on an idle machine)"
        body.append([what, f"{_fmt_x(c['speedup'])} at {c['resolution']} px", verdict])
    return _table(["target", "measured", ""], body)


def render_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [HEADER.rstrip(), "", "## Run", ""]
    if s["quick"]:
        lines += ["**Quick smoke run (`--quick`): toy sizes, not a benchmark.**", ""]
    cpus = f"{m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs"
    lines += [
        f"- date: {m['date_utc']}; git: {m['git']}",
        f"- machine: {m['cpu']}, {cpus}, {_bytes(m['ram_bytes'])} RAM; {m['platform']}",
        f"- load average at start / end: {_fmt_load(m['load_average_at_start'])} / "
        f"{_fmt_load(report['load_average_at_end'])}; CPU steal during the run: "
        f"{_fmt_share(report['cpu_steal_share'])}; lowest CPU utilisation of a timed workload "
        f"(CPU s / wall s / threads; well below 100 % = the cores were shared): "
        f"{_fmt_share(report['min_cpu_utilisation'])}",
        f"- torch {m['torch']} ({m['torch_threads']} threads, flush-denormal {s['flush_denormal']}), "
        f"diffusers {m['diffusers']}, Python {m['python']}",
        f"- runs: {s['runs']} timed after {s['warmup']} warm-up (workloads above "
        f"{s['slow_flops'] / 1e12:g} TFLOPs: {s['slow_runs']}); wall time {report['wall_time_s'] / 60:.1f} min",
        f"- FLOPs counted on: {', '.join(sorted(report['flops_devices']))}; "
        f"max deviation of the real-tensor count (warm-up call) from it: {report['flops_check']}",
    ]
    sections = report["sections"]
    if "unet" in sections:
        lines += ["", "## U-Net: one step", "", *_measurement_table(sections["unet"]["rows"])]
        lines += [_flops_note(r) for r in sections["unet"]["rows"] if r.name.startswith("SDXL")]
        if sections["unet"]["speedups"]:
            lines += ["", *_speedup_table(sections["unet"]["speedups"])]
    if "decoder" in sections:
        lines += [
            "",
            "## Decoder: latents -> image",
            "",
            *_measurement_table(sections["decoder"]["rows"]),
            "",
            *_speedup_table(sections["decoder"]["speedups"]),
        ]
    if "ladder" in sections:
        lines += [
            "",
            "## Ladder: SDXL-like -> snapgen-379m",
            "",
            "Δ = change against the previous step.",
            "",
            *_ladder_table(sections["ladder"]),
        ]
    if "unet" in sections or "decoder" in sections:
        lines += ["", "## Against issue 2's targets", "", *_targets_table(sections)]
    return "\n".join(lines) + "\n"


def _to_json(obj):
    if isinstance(obj, Result):
        return asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    return obj


def _flops_note(r: Result) -> str:
    """Conv + linear FLOPs alone: the figure most published counts (no attention matmuls) give."""
    dense = r.flops_by_kind.get("conv", 0) + r.flops_by_kind.get("linear", 0)
    return (
        f"\n{r.name} at {r.resolution} px: {_fmt_flops(r.flops)}FLOPs in all, {_fmt_flops(dense)}FLOPs "
        "in convolutions and linear layers alone (counters that skip attention's QK^T/AV give the latter)."
    )


def _flops_check(results: list[Result]) -> str:
    pairs = [(r.flops, r.flops_cpu_check) for r in results if r.flops_cpu_check is not None]
    if not pairs:
        return "n/a (nothing timed)"
    worst = max(abs(cpu - meta) / meta for meta, cpu in pairs)
    return f"{worst * 100:.2f} % over {len(pairs)} workloads"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the markdown report here (default: print it)")
    p.add_argument(
        "--json",
        type=Path,
        help=f"raw results (default: {DEFAULT_JSON.relative_to(REPO)}, or efficiency-quick.json with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 128 px, 1 run, ladder FLOPs at 256 px, no model over 500 M params timed",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=["unet", "decoder", "ladder"],
        default=["unet", "decoder", "ladder"],
        help="which sections to run (default: all)",
    )
    p.add_argument("--runs", type=int, default=3, help="timed calls per workload, median reported (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default: 1)")
    p.add_argument("--slow-runs", type=int, default=1, help="timed calls for workloads above --slow-flops (default: 1)")
    p.add_argument(
        "--slow-flops",
        type=float,
        default=4e12,
        help="FLOPs per call above which --slow-runs applies; the default 4e12 catches the SDXL U-Net "
        "(6.8 T) and the KL decoders (10.5 T) at 1024 px",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable CPU cores)")
    p.add_argument("--unet-resolutions", type=int, nargs="+", default=[512, 1024], help="pixels (default: 512 1024)")
    p.add_argument("--decoder-resolutions", type=int, nargs="+", default=[512, 1024], help="pixels (default: 512 1024)")
    p.add_argument(
        "--kl-1024", action="store_true", help="also time the AutoencoderKL decoders above 512 px (minutes a call)"
    )
    p.add_argument(
        "--ladder-flops-resolution", type=int, default=1024, help="ladder FLOPs at this size (default: 1024)"
    )
    p.add_argument("--ladder-1024", action="store_true", help="ladder latency at 1024 px as well as 512 px")
    p.add_argument("--skip-sdxl", action="store_true", help="U-Net section: SnapGen only")
    p.add_argument(
        "--snapgen-text-tokens",
        type=int,
        default=SNAPGEN_TEXT_TOKENS,
        help=f"merged text length of SnapGen U-Nets (default: {SNAPGEN_TEXT_TOKENS} = CLIP-L 77 + CLIP-G 77 "
        "+ Gemma-2 128, MergedTextEncoder's length with its encoders' defaults)",
    )
    p.add_argument(
        "--latency-max-params",
        type=float,
        default=None,
        help="models above this many params get params and FLOPs only (no CPU build, no timing)",
    )
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.quick:
        args.unet_resolutions = [128]
        args.decoder_resolutions = [128]
        args.ladder_flops_resolution = 256
        args.runs = 1
        args.latency_max_params = args.latency_max_params or 5e8
    args.kl_max_resolution = max(args.decoder_resolutions) if args.kl_1024 else 512
    base = min(args.unet_resolutions) if args.quick else 512
    args.ladder_latency_resolutions = [base, 1024] if args.ladder_1024 and not args.quick else [base]
    if args.json is None:
        args.json = DEFAULT_JSON.with_name("efficiency-quick.json") if args.quick else DEFAULT_JSON
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    flush_denormal = torch.set_flush_denormal(True)  # random weights must not hit slow denormal paths
    machine = machine_info(torch.get_num_threads())
    started, jiffies = time.perf_counter(), cpu_jiffies()
    bench = Bench(args)
    builders = {"unet": unet_section, "decoder": decoder_section, "ladder": ladder_section}
    sections = {}
    for name in args.sections:
        bench.log(f"[{name}]", file=sys.stderr, flush=True)
        sections[name] = builders[name](bench)
    results = list(bench.results.values())
    report = {
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"flush_denormal": flush_denormal},
        "wall_time_s": time.perf_counter() - started,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_steal_share": steal_share(jiffies, cpu_jiffies()),
        "min_cpu_utilisation": min((r.cpu_utilisation for r in results if r.cpu_utilisation), default=None),
        "flops_devices": sorted({r.flops_device for r in results}),
        "flops_check": _flops_check(results),
        "sections": sections,
    }
    markdown = render_markdown(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_section(args.out, f"{START}\n{markdown}{END}\n", START, END)
    else:
        print(markdown)
    write_json(args.json, _to_json(report))
    bench.log(f"wrote {args.json}" + (f" and {args.out}" if args.out else ""), file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
