"""Benchmark of the embedded default model on the CPU: decoders and end-to-end latency.

1. Tiny decoder vs the full decoder of the autoencoder it was distilled from: PSNR on ``--images``
   unseen ShapesBench pictures (each decoder against the picture, and tiny against full on the
   same latents), and CPU latency per image at batch 1 and batch 8.
2. End to end, the way a user calls it (``SnapGenPipeline.__call__``: text encoder + 4 U-Net steps
   + decoder, PIL output): latency of one image at batch 1 (median and p90 of ``--repeats`` runs,
   each with a new prompt and seed, so nothing is cached) and throughput at batch 8, with the
   pipeline's own split into text / U-Net / decode time; once eager, once with the U-Net traced
   (``enable_unet_tracing``, what the server's CPU workers do).

Usage::

    .venv/bin/python bench/bench_default_model.py                          # default model, its own autoencoder/
    .venv/bin/python bench/bench_default_model.py --model DIR --autoencoder runs/shapes/autoencoder/autoencoder
    .venv/bin/python bench/bench_default_model.py --out docs/results.md    # + results section

Raw numbers go to ``bench/results/default_model.json``; ``--out FILE`` replaces (or appends) the
section between ``<!-- bench_default_model:start -->`` and ``<!-- bench_default_model:end -->``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path

import torch
from benchlib import cpu_name, publish, write_json

from snapgen.model_dir import default_model_dir, load_pipeline
from snapgen.models.autoencoder import load_decoder, load_encoder

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "default_model.json"
START, END = "<!-- bench_default_model:start -->", "<!-- bench_default_model:end -->"
PROMPTS = [
    "a red circle to the left of a blue square",
    "three green triangles",
    "a yellow square above a purple circle",
    "a white triangle and a red square",
]


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = torch.mean((x.float() - y.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # range [-1, 1]


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@torch.no_grad()
def bench_decoders(model_dir: Path, autoencoder: Path, images: int, repeats: int) -> dict:
    from training.shapesbench import ShapesDataset

    tiny = load_decoder(model_dir / "decoder")
    full = load_decoder(autoencoder)
    encoder = load_encoder(autoencoder)
    data = ShapesDataset(length=images, seed=10_000)  # a seed no training config uses: unseen scenes
    pixels = torch.stack([data[i]["pixels"] for i in range(images)])
    z = encoder.encode(pixels)
    tiny_out, full_out = tiny.decode(z), full.decode(z)
    result = {
        "images": images,
        "params": {name: sum(p.numel() for p in d.parameters()) for name, d in (("tiny", tiny), ("full", full))},
        "psnr_db": {
            "tiny_vs_image": psnr(tiny_out, pixels),
            "full_vs_image": psnr(full_out, pixels),
            "tiny_vs_full": psnr(tiny_out, full_out),
        },
        "latency_ms": {},
    }
    for batch in (1, 8):
        for name, decoder in (("tiny", tiny), ("full", full)):
            times = timed(lambda d=decoder, b=batch: d.decode(z[:b]), repeats)
            result["latency_ms"][f"{name}_batch{batch}_per_image"] = 1000 * statistics.median(times) / batch
    return result


def bench_end_to_end(model_dir: Path, steps: int, repeats: int, trace_unet: bool) -> dict:
    pipeline = load_pipeline(model_dir)
    if trace_unet:
        pipeline.enable_unet_tracing()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(repeats + 1)]
    runs = []
    for i, prompt in enumerate(prompts):  # the first is the warm-up
        start = time.perf_counter()
        out = pipeline(prompt, seeds=1000 + i, steps=steps, output_type="pil")
        runs.append((time.perf_counter() - start, out.timings))
    runs = runs[1:]
    latencies = [r[0] for r in runs]
    split = {k: 1000 * statistics.median(r[1][k] for r in runs) for k in ("text_s", "unet_s", "decode_s")}

    batch_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    pipeline(batch_prompts, seeds=0, steps=steps)  # warm-up at batch 8
    batch_times = timed(lambda: pipeline(batch_prompts, seeds=7, steps=steps, output_type="pil"), max(3, repeats // 5))
    return {
        "steps": steps,
        "guidance_scale": pipeline.sampler.guidance_scale,
        "resolution": list(pipeline.default_size),
        "batch1_latency_ms": {"median": 1000 * statistics.median(latencies), "p90": 1000 * quantile(latencies, 0.9)},
        "batch1_split_ms": {k.removesuffix("_s"): v for k, v in split.items()},
        "batch8_images_per_s": 8 / statistics.median(batch_times),
        "batch8_latency_ms": 1000 * statistics.median(batch_times),
    }


def markdown(results: dict) -> str:
    d, eager, traced = results["decoders"], results["end_to_end_eager"], results["end_to_end_traced"]
    lat = d["latency_ms"]

    def row(label: str, cell) -> str:
        return f"| {label} | {cell(eager)} | {cell(traced)} |"

    lines = [
        START,
        f"### Latency and decoders (`bench/bench_default_model.py`, {results['date']}, {results['machine']}, "
        f"{results['threads']} threads, torch {results['torch']})",
        "",
        f"End to end, {eager['steps']} steps, {eager['resolution'][0]}x{eager['resolution'][1]} px, guidance "
        f"{eager['guidance_scale']:g} (text encoder + U-Net + decoder + PIL). Eager is what a one-off "
        "`snapgen generate` runs; traced is the U-Net through TorchScript traces (`snapgen.tracing`), what the "
        "server's CPU workers run: the same images bit for bit.",
        "",
        "| | eager | traced U-Net |",
        "|---|---|---|",
        row("batch 1 latency, median", lambda e: f"{e['batch1_latency_ms']['median']:.1f} ms"),
        row("batch 1 latency, p90", lambda e: f"{e['batch1_latency_ms']['p90']:.1f} ms"),
        row(
            f"batch 1 split: text / U-Net ({eager['steps']} steps) / decode",
            lambda e: " / ".join(f"{e['batch1_split_ms'][k]:.1f}" for k in ("text", "unet", "decode")) + " ms",
        ),
        row(
            "batch 8 throughput",
            lambda e: f"{e['batch8_images_per_s']:.1f} images/s ({e['batch8_latency_ms']:.0f} ms a batch)",
        ),
        "",
        f"Decoders on {d['images']} unseen ShapesBench pictures (PSNR over [-1, 1]):",
        "",
        "| decoder | params | PSNR vs picture | ms/image, batch 1 | ms/image, batch 8 |",
        "|---|---|---|---|---|",
        f"| tiny decoder | {d['params']['tiny']:,} | {d['psnr_db']['tiny_vs_image']:.2f} dB | "
        f"{lat['tiny_batch1_per_image']:.2f} | {lat['tiny_batch8_per_image']:.2f} |",
        f"| full decoder (autoencoder) | {d['params']['full']:,} | {d['psnr_db']['full_vs_image']:.2f} dB | "
        f"{lat['full_batch1_per_image']:.2f} | {lat['full_batch8_per_image']:.2f} |",
        "",
        f"Tiny vs full decoder on the same latents: {d['psnr_db']['tiny_vs_full']:.2f} dB; the tiny decoder is "
        f"{lat['full_batch1_per_image'] / lat['tiny_batch1_per_image']:.1f}x faster at batch 1.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded one)")
    parser.add_argument(
        "--autoencoder",
        type=Path,
        default=None,
        help="the autoencoder whose full decoder the tiny one is compared with (default: the "
        "model's own autoencoder/, else the recipe's runs/shapes/autoencoder/autoencoder)",
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to put the results section in")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or default_model_dir()
    if args.autoencoder is None:
        shipped = model_dir / "autoencoder"
        args.autoencoder = shipped if shipped.is_dir() else REPO / "runs/shapes/autoencoder/autoencoder"
    if not args.autoencoder.is_dir():
        parser.error(f"--autoencoder {args.autoencoder}: no such directory (train it with training/recipes/shapes.sh)")

    results = {
        "date": dt.date.today().isoformat(),
        "machine": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "model": str(model_dir),
        "decoders": bench_decoders(model_dir, args.autoencoder, args.images, args.repeats),
        "end_to_end_eager": bench_end_to_end(model_dir, args.steps, args.repeats, trace_unet=False),
        "end_to_end_traced": bench_end_to_end(model_dir, args.steps, args.repeats, trace_unet=True),
    }
    write_json(args.json, results)
    publish(markdown(results), args.out, START, END)


if __name__ == "__main__":
    main()
