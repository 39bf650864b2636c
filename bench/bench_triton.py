"""Per-call latency of the Triton models against the same calls in process (the numbers in docs/triton.md).

    python bench/bench_triton.py --model DIR [--backend python onnx] [--calls 50] [--json out.json]

Exports the model to a temporary repository per backend, starts the nvidia-pytriton ``tritonserver`` on
loopback, and times, for batch 1 at the model's first size: each stage through ``TritonBackend`` over
gRPC and HTTP (what the worker pays per call, client encoding included) and through ``TorchBackend``, and a
whole image (``generate``, default steps). Medians over ``--calls`` calls after a few warm-up calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _median_ms(fn, calls: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _stages(backend, batch, calls: int) -> dict[str, float]:
    import torch

    from snapgen.noise import randn_tensor

    h, w = batch.height // backend.latent_factor, batch.width // backend.latent_factor
    latents = randn_tensor(batch.seeds, (backend.latent_channels, h, w))
    t = torch.full((len(batch.seeds),), 0.75)
    with torch.no_grad():
        text = backend.encode_text(batch.prompts)
        return {
            "text_encoder_ms": _median_ms(lambda: backend.encode_text(batch.prompts), calls),
            "unet_ms": _median_ms(lambda: backend.unet_velocity(latents, t, text), calls),
            "decoder_ms": _median_ms(lambda: backend.decode(latents), calls),
            "image_ms": _median_ms(lambda: backend.generate(batch), max(3, calls // 5), warmup=1),
        }


def run(model: Path, backends: list[str], calls: int) -> dict:
    import torch

    from server.backends import TorchBackend
    from server.triton_backend import TritonBackend
    from snapgen.request import GenerationRequest
    from triton_export.repository import export_triton
    from triton_export.server import TritonServer

    local = TorchBackend(model)
    batch = local.resolve(GenerationRequest("a red circle to the left of a blue square", seed=0))
    height, width = batch.height, batch.width
    report = {
        "model": str(model),
        "size": [height, width],
        "steps": batch.steps,
        "torch_threads": torch.get_num_threads(),
        "in_process": _stages(local, batch, calls),
    }
    with tempfile.TemporaryDirectory(prefix="snapgen-triton-bench-") as tmp:
        for backend in backends:
            repo = Path(tmp) / backend
            export_triton(model, repo, backend=backend, max_batch_size=8, log=lambda _: None)
            with TritonServer(repo) as server:
                for url in (server.grpc_url, server.http_url):
                    report[f"triton_{backend}_{url.split(':')[0]}"] = _stages(TritonBackend(model, url), batch, calls)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/bench_triton.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--backend", nargs="+", default=["python", "onnx"], choices=["python", "onnx"])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args.model, args.backend, args.calls)
    stages = ("text_encoder_ms", "unet_ms", "decoder_ms", "image_ms")
    print(f"{'path':<22}" + "".join(f"{s:>17}" for s in stages))
    for name, row in report.items():
        if isinstance(row, dict):
            print(f"{name:<22}" + "".join(f"{row[s]:>17.2f}" for s in stages))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
