"""What one training step of a U-Net layout costs on the CPU, relative to another: for planning
a recipe's compute (progressive resolution, a cheaper block layout) before spending it.

Each variant is a named U-Net config with optional overrides, trained at a latent size: random
weights and inputs; forward, a mean-squared error against the latents, backward and an AdamW
step, at batch ``--batch`` with ``--text-tokens`` of context (MiniLM's 32 by default). The
variants' steps are interleaved (one of each per round) so that a shared machine's drift hits
them alike; the report gives the median step and its ratio to the first variant. Usage::

    .venv/bin/python bench/bench_train_step.py --threads 1 --out docs/results.md \\
        --variant "128 px=snapgen-shapes@16" \\
        --variant "64 px=snapgen-shapes@8" \\
        --variant "no 16x16 transformer=snapgen-shapes@16:transformer_depth=0,1,2"

A variant is ``LABEL=CONFIG@LATENT_SIZE[:KEY=VALUE[;KEY=VALUE...]]``; a value is an int, a float,
true/false, or a comma-separated tuple of those.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
import torch

from snapgen.models.configs import build_unet, count_parameters, unet_config

START, END = "<!-- bench_train_step:start -->", "<!-- bench_train_step:end -->"


def parse_value(text: str):
    if "," in text:
        return tuple(parse_value(part) for part in text.split(","))
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return float(text)  # raises ValueError, naming the text, for anything else


def parse_variant(text: str) -> tuple[str, dict, int]:
    try:
        label, spec = text.split("=", 1)
        head, _, overrides = spec.partition(":")
        name, size = head.split("@")
        config = unet_config(name)
        for item in filter(None, overrides.split(";")):
            key, value = item.split("=", 1)
            if key not in config:
                raise ValueError(f"{name} has no option {key!r}")
            config[key] = parse_value(value)
        return label.strip(), config, int(size)
    except ValueError as e:
        raise SystemExit(f"bad --variant {text!r}: {e} (expected LABEL=CONFIG@LATENT_SIZE[:KEY=VALUE;...])") from None


@dataclass
class Variant:
    label: str
    latent_size: int
    unet: torch.nn.Module
    optimizer: torch.optim.Optimizer
    latents: torch.Tensor
    times: list[float] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, help="LABEL=CONFIG@LATENT_SIZE[:KEY=VALUE;...]")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=9, help="timed steps per variant, after one warm-up round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="markdown file to put the results section in")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = []
    for label, config, size in map(parse_variant, args.variant):
        torch.manual_seed(0)
        unet = build_unet(config)
        latents = torch.randn(args.batch, config["in_channels"], size, size)
        variants.append(Variant(label, size, unet, torch.optim.AdamW(unet.parameters(), lr=1e-4), latents))
    config = variants[0].unet.config
    context = torch.randn(args.batch, args.text_tokens, config.cross_attention_dim)
    mask = torch.ones(args.batch, args.text_tokens, dtype=torch.bool)
    pooled = torch.randn(args.batch, config.pooled_projection_dim)
    t = torch.rand(args.batch)
    for round_index in range(args.rounds + 1):
        for v in variants:
            start = time.perf_counter()
            velocity = v.unet(v.latents, t, context, mask, pooled, return_dict=False)[0]
            (velocity - v.latents).square().mean().backward()
            v.optimizer.step()
            v.optimizer.zero_grad(set_to_none=True)
            if round_index:  # the first round warms up
                v.times.append(time.perf_counter() - start)

    first = statistics.median(variants[0].times)
    lines = [
        START,
        f"### One training step per layout (`bench/bench_train_step.py`, {dt.date.today()}, "
        f"{benchlib.cpu_name()}, {args.threads} thread(s), torch {torch.__version__})",
        "",
        f"Batch {args.batch}, forward + backward + AdamW, median of {args.rounds} interleaved steps.",
        "",
        "| variant | latent size | parameters | step, median | relative |",
        "|---|---|---|---|---|",
    ]
    for v in variants:
        median = statistics.median(v.times)
        size, params = f"{v.latent_size}x{v.latent_size}", count_parameters(v.unet) / 1e6
        lines.append(f"| {v.label} | {size} | {params:.2f} M | {median:.3f} s | {median / first:.2f} |")
    lines.append(END)
    benchlib.publish("\n".join(lines), args.out, START, END)


if __name__ == "__main__":
    main()
