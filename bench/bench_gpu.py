"""GPU benchmark: the U-Net, decoders and the default model on one CUDA device.

Run where a GPU is (random weights except for the default model; no text-encoder weights needed)::

    python bench/bench_gpu.py --json bench/results/gpu.json          # on the GPU machine
    .venv/bin/python bench/bench_gpu.py --render bench/results/gpu.json --out docs/benchmarks.md

1. One U-Net step at batch 1: ``snapgen-379m`` vs the SDXL U-Net (diffusers), 512 and 1024 px,
   fp16 and bf16, eager and replayed as a CUDA graph (which removes the CPU's kernel-launch time).
2. Decoders at 1024 px, fp16: the tiny decoder vs SDXL's VAE decoder and TAESD.
3. The embedded default model (U-Net + tiny decoder, 128 px, 4 steps): latency at batch 1 and 8,
   fp32, eager and with the U-Net traced (``snapgen.tracing``); and how far its GPU output is from
   the CPU's for the same noise (fp32 on both: different kernels, so not bit-identical).
The text encoder is replaced by a random-weight BERT of MiniLM-L6's shape for timing (its weights
are a pip package too large to carry to the GPU machine); prompt embeddings are seeded noise.
Timings: CUDA events, median of ``--runs`` after ``--warmup`` calls.

The measurements the Triton kernels and the one-graph sampler are judged by (each mode as a column: eager, CUDA
graph, Triton kernels, torch.compile, for SnapGen's models and SDXL's U-Net alike) are parts of their own, each
in its own process under a time budget (``bench/gpu_parts.py``); ``bench/gpu_session.sh`` runs them all::

    python bench/bench_gpu.py --part unet-snapgen --results OUT --budget-s 110    # OUT/unet-snapgen.json
    python bench/bench_gpu.py --session-report OUT/*.json --out docs/benchmarks.md   # targets met or missed
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
from pathlib import Path

import torch
from bench_efficiency import count_flops, decoder_workloads, sdxl_unet, snapgen_unet
from benchlib import publish, write_json
from gpu_parts import PARTS, as_graph, load_parts, run_part
from gpu_report import END as SESSION_END
from gpu_report import START as SESSION_START
from gpu_report import markdown as session_markdown
from gpu_report import targets, targets_text

from snapgen.model_dir import default_model_dir
from snapgen.models.autoencoder import load_decoder
from snapgen.models.configs import unet_config
from snapgen.models.unet import SnapGenUNet
from snapgen.noise import randn_tensor
from snapgen.tracing import TracedUNet

START, END = "<!-- bench_gpu:start -->", "<!-- bench_gpu:end -->"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cuda_ms(fn, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cast(inputs, device, dtype):
    args, kwargs = inputs

    def one(x):
        if isinstance(x, dict):
            return {k: one(v) for k, v in x.items()}
        x = x.to(device)
        return x.to(dtype) if x.is_floating_point() else x

    return tuple(one(a) for a in args), one(kwargs)


@torch.inference_mode()
def bench_workload(workload, dtype_name: str, warmup: int, runs: int, graph: bool) -> dict:
    device, dtype = torch.device("cuda"), DTYPES[dtype_name]
    flops, _ = count_flops(workload.build(torch.device("meta")), workload.inputs(torch.device("meta")))
    torch.manual_seed(0)
    model = workload.build(device).to(dtype).eval()
    args, kwargs = cast(workload.inputs(torch.device("cpu")), device, dtype)
    torch.cuda.reset_peak_memory_stats()
    call = lambda: model(*args, **kwargs)  # noqa: E731
    result = {
        "name": workload.name,
        "resolution": workload.resolution,
        "dtype": dtype_name,
        "params": sum(p.numel() for p in model.parameters()),
        "gflop": flops / 1e9,
        "eager_ms": cuda_ms(call, warmup, runs),
    }
    if graph:
        try:
            result["graph_ms"] = cuda_ms(as_graph(call, device), warmup, runs)
        except RuntimeError as error:  # a host sync inside the model makes capture fail: report, go on
            result["graph_error"] = str(error).splitlines()[0][:200]
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["tflops_eager"] = flops / result["eager_ms"] / 1e9
    return result


@torch.inference_mode()
def bench_text_encoder(warmup: int, runs: int) -> dict:
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    model = BertModel(config).cuda().eval()
    ids = torch.randint(0, config.vocab_size, (1, 32), device="cuda")
    name = "MiniLM-L6 shape (random weights), 32 tokens, fp32"
    return {"name": name, "eager_ms": cuda_ms(lambda: model(ids), warmup, runs)}


@torch.inference_mode()
def bench_default_model(warmup: int, runs: int) -> dict:
    directory = default_model_dir()
    unet = SnapGenUNet.from_pretrained(directory / "unet", use_safetensors=True).eval()
    decoder = load_decoder(directory / "decoder").eval()
    steps = json.loads((directory / "scheduler" / "scheduler_config.json").read_text()).get("default_steps", 4)
    timesteps = torch.linspace(1.0, 0.0, steps + 1)  # only the cost matters here, not the schedule
    side = unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(8, 32, unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(8, unet.config.pooled_projection_dim, generator=generator)
    mask = torch.ones(8, 32, dtype=torch.bool)

    def generate(step_fn, decode, batch, device):
        x = randn_tensor(list(range(batch)), (unet.config.in_channels, side, side)).to(device)
        t_text, t_mask, t_pooled = text[:batch].to(device), mask[:batch].to(device), pooled[:batch].to(device)
        for i in range(steps):
            t = torch.full((batch,), float(timesteps[i]), device=device)
            x = x + (timesteps[i + 1] - timesteps[i]).item() * step_fn(x, t, t_text, t_mask, t_pooled)
        return x, decode(x)

    eager = lambda *a: unet(*a).sample  # noqa: E731
    cpu_latents, cpu_pixels = generate(eager, decoder.decode, 8, "cpu")
    unet.cuda()
    decoder.cuda()
    traced = TracedUNet(unet)
    result = {"steps": steps, "resolution": side * 8}
    for batch in (1, 8):
        for name, step_fn in (("eager", eager), ("traced", traced)):
            ms = cuda_ms(lambda f=step_fn, b=batch: generate(f, decoder.decode, b, "cuda"), warmup, runs)
            result[f"batch{batch}_{name}_ms"] = ms
    gpu_latents, gpu_pixels = generate(eager, decoder.decode, 8, "cuda")
    diff = (gpu_pixels.cpu() - cpu_pixels).abs()
    to_u8 = lambda p: ((p.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    result["gpu_vs_cpu"] = {
        "latent_max_abs": (gpu_latents.cpu() - cpu_latents).abs().max().item(),
        "pixel_max_abs": diff.max().item(),
        "uint8_equal_share": (to_u8(gpu_pixels.cpu()) == to_u8(cpu_pixels)).float().mean().item(),
    }
    return result


def bench_server_backend(warmup: int, runs: int) -> dict:
    """The server worker's engine (``TorchBackend.generate``) on the GPU, in each of its GPU modes."""
    import numpy as np

    from server.backends import TorchBackend
    from snapgen.request import GenerationRequest

    prompts = ["a red circle to the left of a blue square", "three green triangles"] * 4
    modes = {  # name: (TorchBackend options, the mode whose images a trace must equal bit for bit)
        "fp32": ({"trace_unet": False}, None),
        "fp32 traced U-Net": ({"trace_unet": True}, "fp32"),
        "fp16": ({"dtype": "fp16", "trace_unet": False}, None),
        "fp16 traced U-Net": ({"dtype": "fp16", "trace_unet": True}, "fp16"),
        "fp16 channels_last": ({"dtype": "fp16", "channels_last": True, "trace_unet": False}, None),
        "fp16 torch.compile": ({"dtype": "fp16", "compile": True}, None),
    }
    result, reference, images_of = {}, None, {}
    for name, (options, eager_twin) in modes.items():
        backend = TorchBackend(default_model_dir(), device="cuda", **options)
        row = {}
        for batch in (1, 8):
            job = backend.resolve(GenerationRequest(prompts[:batch], seed=0, steps=4, guidance_scale=1.0))
            row[f"batch{batch}_ms"] = cuda_ms(lambda j=job, b=backend: b.generate(j), warmup, runs)
        images = np.stack(backend.generate(job).images).astype(np.int16)
        if reference is None:
            reference = images
        row["max_abs_vs_fp32"] = int(np.abs(images - reference).max())
        row["equal_share_vs_fp32"] = float((images == reference).mean())
        if eager_twin is not None:
            row["identical_to_eager"] = bool(np.array_equal(images, images_of[eager_twin]))
        images_of[name] = images
        result[name] = row
        print(name, row, flush=True)
    return result


def free_memory() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def run(args) -> dict:
    props = torch.cuda.get_device_properties(0)
    report = {
        "date": dt.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if "server" in args.sections:  # first: the sections below are in an earlier report if this one fails
        report["server_backend"] = bench_server_backend(args.warmup, args.runs)
    if "unet" not in args.sections:
        return report
    report["unet"], report["decoders"] = [], []
    snapgen = unet_config("snapgen-379m")
    for res in (512, 1024):
        for dtype in ("fp16", "bf16"):
            workload = snapgen_unet("SnapGen U-Net (snapgen-379m)", snapgen, res, 77)
            report["unet"].append(bench_workload(workload, dtype, args.warmup, args.runs, graph=True))
            free_memory()
        report["unet"].append(bench_workload(sdxl_unet(res), "fp16", args.warmup, args.runs, graph=True))
        free_memory()
        print(json.dumps(report["unet"][-3:]), flush=True)
    for workload in decoder_workloads(1024):
        if "SD3" not in workload.name:
            report["decoders"].append(bench_workload(workload, "fp16", args.warmup, args.runs, graph=False))
    print(json.dumps(report["decoders"]), flush=True)
    report["text_encoder"] = bench_text_encoder(args.warmup, args.runs)
    report["default_model"] = bench_default_model(args.warmup, args.runs)
    return report


def markdown(report: dict) -> str:
    lines = [
        START,
        f"## GPU: {report['gpu']} (`bench/bench_gpu.py`, {report['date']}, torch {report['torch']}, "
        f"CUDA {report['cuda']})",
        "",
        "One U-Net step at batch 1 (random weights; 77 text tokens). Eager = PyTorch launching each "
        "kernel; CUDA graph = the same kernels replayed without the CPU in between.",
        "",
        "| U-Net | px | dtype | GFLOP | eager ms | CUDA graph ms | TFLOP/s (eager) | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["unet"]:
        lines.append(
            f"| {r['name']} | {r['resolution']} | {r['dtype']} | {r['gflop']:.0f} | {r['eager_ms']:.2f} | "
            f"{r.get('graph_ms', float('nan')):.2f} | {r['tflops_eager']:.0f} | {r['peak_gib']:.2f} |"
        )
    by = {(r["name"], r["resolution"], r["dtype"]): r for r in report["unet"]}
    for res in (512, 1024):
        ours, sdxl = by[("SnapGen U-Net (snapgen-379m)", res, "fp16")], by[("SDXL U-Net (diffusers)", res, "fp16")]
        lines.append("")
        lines.append(
            f"At {res} px, fp16: SnapGen's step is {sdxl['eager_ms'] / ours['eager_ms']:.1f}x faster than SDXL's "
            f"eager, {sdxl.get('graph_ms', float('nan')) / ours.get('graph_ms', float('nan')):.1f}x as CUDA graphs "
            f"(FLOPs ratio "
            f"{sdxl['gflop'] / ours['gflop']:.1f}x)."
        )
    lines += ["", "Decoders at 1024 px, batch 1, fp16 (random weights):", "", "| decoder | ms | peak GiB |"]
    lines += ["|---|---|---|"]
    lines += [f"| {r['name']} | {r['eager_ms']:.2f} | {r['peak_gib']:.2f} |" for r in report["decoders"]]
    te, dm = report["text_encoder"], report["default_model"]
    lines += [
        "",
        f"Text encoder ({te['name']}): {te['eager_ms']:.2f} ms.",
        "",
        f"Embedded default model (its U-Net + tiny decoder, {dm['resolution']} px, {dm['steps']} steps, fp32; "
        "text embeddings given):",
        "",
        "| | eager | traced U-Net |",
        "|---|---|---|",
        f"| batch 1 | {dm['batch1_eager_ms']:.1f} ms | {dm['batch1_traced_ms']:.1f} ms |",
        f"| batch 8 | {dm['batch8_eager_ms']:.1f} ms | {dm['batch8_traced_ms']:.1f} ms |",
        "",
        f"GPU vs CPU, same noise and embeddings, fp32 both: latents differ by at most "
        f"{dm['gpu_vs_cpu']['latent_max_abs']:.2e}, pixels by {dm['gpu_vs_cpu']['pixel_max_abs']:.2e} "
        f"(of a [-1, 1] range); {100 * dm['gpu_vs_cpu']['uint8_equal_share']:.2f} % of 8-bit pixel values equal. "
        "So a GPU server and a CPU server give visually the same image for a seed, not the same bytes.",
    ]
    if "server_backend" in report:
        lines += [
            "",
            "The server's engine (`TorchBackend.generate`: text encoder, 4 U-Net steps, decoder, uint8 images) "
            f"on {report.get('server_backend_gpu', report['gpu'])}, default model, 128 px; images compared with "
            "the fp32 mode's (8-bit values):",
            "",
            "| mode | batch 1 | batch 8 | images/s at batch 8 | max diff vs fp32 | equal values | trace = eager |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in report["server_backend"].items():
            same = {True: "yes, bit for bit", False: "**no**", None: ""}[r.get("identical_to_eager")]
            lines.append(
                f"| {name} | {r['batch1_ms']:.1f} ms | {r['batch8_ms']:.1f} ms | {8000 / r['batch8_ms']:.0f} | "
                f"{r['max_abs_vs_fp32']} | {100 * r['equal_share_vs_fp32']:.1f} % | {same} |"
            )
        if report.get("text_encoder_weights") == "random":
            lines += ["", "(MiniLM's weights were random on this run, same shapes: timings hold, images do not.)"]
    lines += [
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the raw results here (measuring run)")
    parser.add_argument("--render", type=Path, nargs="+", help="results JSONs to merge and render, not measure")
    parser.add_argument("--out", type=Path, help="markdown file to put the section in")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sections", default="server,unet", help="server (needs MiniLM), unet (all the rest)")
    parser.add_argument("--part", choices=PARTS, nargs="+", help="measure these parts of the GPU session")
    parser.add_argument("--results", type=Path, help="--part's directory: one NAME.json per part")
    parser.add_argument(
        "--budget-s", type=float, default=120.0, help="--part's time budget: a mode that compiles needs enough left"
    )
    parser.add_argument("--smoke", action="store_true", help="--part with tiny shapes and one run, on any device")
    parser.add_argument(
        "--session-report", type=Path, nargs="+", metavar="JSON",
        help="the parts' JSONs: print the targets met or missed, render their section (to --out)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.part:
        if args.results is None:
            parser.error("--part needs --results DIR")
        for name in args.part:
            run_part(name, args.results, args.budget_s, args.smoke, args.warmup, args.runs)
        return
    if args.session_report:
        parts = load_parts(args.session_report)
        publish(session_markdown(parts), args.out, SESSION_START, SESSION_END)
        print(targets_text(targets(parts)))
        return
    if args.render:
        report = {}
        for path in args.render:
            part = json.loads(path.read_text())
            if "server_backend" in part:  # the parts may come from different cards: keep each one's name
                part.setdefault("server_backend_gpu", part["gpu"])
            report.update(part)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run this on a GPU machine, or pass --render JSON")
        report = run(args)
        report["text_encoder_weights"] = os.environ.get("SNAPGEN_BENCH_TEXT_WEIGHTS", "real")
        if args.json:
            write_json(args.json, report)
    publish(markdown(report), args.out, START, END)


if __name__ == "__main__":
    main()
