"""What the serving layer costs per request, with the model taken out: ``POST /v1/generate`` through the
API, the in-memory queue and a worker thread, the model replaced by one that returns black 8x8 images at
once. Sequential requests, in process (httpx's ASGI transport: no sockets), median of ``--requests``
after ``--warmup``.

``--base DIR`` runs the same measurement on another checkout (``git worktree add /tmp/base COMMIT``) in
a child process with ``PYTHONPATH=DIR``, alternated with this tree ``--rounds`` times, so both see the
same machine load. A change to the API, the queue or the worker shows here in tenths of a millisecond,
where the whole-request numbers of bench_server.py move by tens between runs of the same code.

Usage::

    .venv/bin/python bench/bench_api_overhead.py --rounds 5 --base /tmp/base
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def measure(requests: int, warmup: int) -> float:
    import httpx
    import numpy as np

    from server.api.app import create_app
    from server.backends import Backend, BackendOutput
    from server.queue import MemoryJobQueue
    from server.settings import Settings
    from server.worker import Worker
    from snapgen.request import ModelCard

    card = ModelCard(id="instant", sizes=((8, 8),), default_steps=2, max_steps=4, guidance_scale=1.0)

    class Instant(Backend):
        provenance = ("instant", None)

        def __init__(self):
            self.card = card

        def describe(self):
            return {**card.to_dict(), "device": "cpu", "dtype": "float32", "backend": "Instant"}

        def resolve(self, request):
            return request.resolve(card)

        def generate(self, request, on_step=None, *args, **kwargs):  # any version's signature
            for step in range(request.steps):
                if on_step is not None:
                    on_step(step + 1, request.steps, None)
            images = [np.zeros((8, 8, 3), np.uint8) for _ in request.prompts]
            return BackendOutput(images=images, timings={"text_s": 0.0, "unet_s": 0.0, "decode_s": 0.0})

    queue = MemoryJobQueue()
    app = create_app(Settings(), queue=queue, start_worker=False)
    worker = Worker(queue, Instant, warmup=False, heartbeat_s=0.5)
    worker.start_thread()
    worker.ready.wait(10)
    times = []
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for i in range(warmup + requests):
                start = time.perf_counter()
                response = await client.post("/v1/generate", json={"prompt": "a red circle", "seed": i})
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    raise RuntimeError(f"{response.status_code}: {response.text}")
                if i >= warmup:
                    times.append(elapsed * 1000)
    finally:
        worker.stop(0)
        worker.join(5)
    return statistics.median(times)


def child(tree: str, requests: int, warmup: int) -> float:
    env = {**os.environ, "PYTHONPATH": tree}
    args = [sys.executable, os.path.abspath(__file__), "--child", "--requests", str(requests), "--warmup", str(warmup)]
    out = subprocess.run(args, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["p50_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", help="another checkout to compare with, alternated round by round")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"p50_ms": asyncio.run(measure(args.requests, args.warmup))}))
        return
    trees = {"this": REPO, **({"base": os.path.abspath(args.base)} if args.base else {})}
    results: dict[str, list[float]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            results[name].append(child(tree, args.requests, args.warmup))
            print(f"round {round_ + 1}: {name} p50 {results[name][-1]:.3f} ms", file=sys.stderr)
    for name, values in results.items():
        print(f"{name}: p50 per request {statistics.median(values):.3f} ms (rounds: "
              f"{', '.join(f'{v:.3f}' for v in values)})")  # fmt: skip


if __name__ == "__main__":
    main()
