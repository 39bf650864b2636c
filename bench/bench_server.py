"""Server benchmark: concurrent HTTP clients on loopback against the embedded server and Redis mode.

Three set-ups, all running the same model directory with the same request (one image, PNG,
``--steps`` steps, a fixed prompt and per-request seed):

- ``direct``: the library call in this process, ``pipeline(prompt, seeds, steps)`` + PNG encoding,
  one request at a time: the baseline.
- ``embedded``: ``snapgen serve --model DIR`` (API + in-memory queue + one worker, one process).
- ``redis``: ``redis-server`` + ``snapgen serve --redis`` + ``--workers`` ``snapgen worker`` processes.

For each server set-up and each ``--concurrency`` level C, C clients each send synchronous
``POST /v1/generate`` requests back to back until ``--requests`` have been sent in total (at least
one per client). Reported: throughput (images per second), p50/p95/p99 latency of the successful
requests, and how every request was answered: 200, 429 (backpressure; allowed), anything else or
no answer (both counted as failures: the target is none). Overhead = server p50 at concurrency 1
minus direct p50; the server-side share of it (HTTP + queue + encode) is also reported from the
response's own timings (latency - text - unet - decode).

Usage::

    .venv/bin/python bench/bench_server.py --model models/random-tiny               # full run
    .venv/bin/python bench/bench_server.py --model DIR --quick                      # smoke test
    .venv/bin/python bench/bench_server.py --model DIR --out docs/benchmarks.md     # + results section

Raw numbers go to ``bench/results/server.json``; ``--out FILE`` replaces (or appends) the section
between ``<!-- bench_server:start -->`` and ``<!-- bench_server:end -->`` in FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from benchlib import publish, write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "server.json"
START, END = "<!-- bench_server:start -->", "<!-- bench_server:end -->"
PROMPT = "a red circle to the left of a blue square"


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-30:]
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n" + "\n".join(tail))

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPGEN_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def snapgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "snapgen.cli", *args]


def wait_ready(url: str, procs: Processes, timeout: float, workers: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        try:
            body = httpx.get(f"{url}/readyz", timeout=5).json()
            if body.get("status") == "ready" and (workers <= 1 or f"{workers} worker(s)" in body["checks"]["model"]):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready after {timeout:.0f}s")


# -- measuring ---------------------------------------------------------------------------------
@dataclass
class Run:
    mode: str
    concurrency: int
    requests: int
    wall_s: float
    ok: int = 0
    rejected_429: int = 0
    failed: int = 0  # another status, or no answer at all
    failures: dict[str, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    server_overhead_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        over = sorted(self.server_overhead_s)
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": self.ok,
            "429": self.rejected_429,
            "failed": self.failed,
            "failures": self.failures,
            "images_per_s": self.ok / self.wall_s if self.wall_s else 0.0,
            "p50_ms": 1000 * percentile(lat, 50),
            "p95_ms": 1000 * percentile(lat, 95),
            "p99_ms": 1000 * percentile(lat, 99),
            "server_overhead_p50_ms": 1000 * percentile(over, 50),
            "wall_s": self.wall_s,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


async def load(url: str, mode: str, concurrency: int, total: int, steps: int, timeout: float) -> Run:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    per_client = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]
    per_client = [max(1, n) for n in per_client]
    run = Run(mode, concurrency, sum(per_client), 0.0)
    counter = iter(range(10**9))

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def one_client(n: int) -> None:
            for _ in range(n):
                body = {"prompt": PROMPT, "seed": next(counter), "steps": steps}
                start = time.perf_counter()
                try:
                    response = await client.post("/v1/generate", json=body)
                except httpx.HTTPError as e:
                    run.failed += 1
                    run.failures[type(e).__name__] = run.failures.get(type(e).__name__, 0) + 1
                    continue
                elapsed = time.perf_counter() - start
                if response.status_code == 200:
                    run.ok += 1
                    run.latencies_s.append(elapsed)
                    t = response.json()["timings"]
                    run.server_overhead_s.append(elapsed - t["text_s"] - t["unet_s"] - t["decode_s"])
                elif response.status_code == 429:
                    run.rejected_429 += 1
                else:
                    run.failed += 1
                    key = str(response.status_code)
                    run.failures[key] = run.failures.get(key, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client(n) for n in per_client))
        run.wall_s = time.perf_counter() - started
    return run


def direct_baseline(model: Path, steps: int, requests: int, threads: int | None) -> Run:
    import torch

    from snapgen.model_dir import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = load_pipeline(model)
    pipe([PROMPT], seeds=0, steps=1)  # warm-up
    run = Run("direct", 1, requests, 0.0)
    started = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        out = pipe([PROMPT], seeds=i, steps=steps)
        buffer = io.BytesIO()
        out.images[0].save(buffer, format="PNG")
        run.latencies_s.append(time.perf_counter() - t0)
        run.ok += 1
    run.wall_s = time.perf_counter() - started
    del pipe
    return run


# -- set-ups -----------------------------------------------------------------------------------
def start_embedded(procs: Processes, model: Path, args) -> str:
    port = free_port()
    env = child_env(SNAPGEN_MAX_QUEUE_DEPTH=str(args.max_queue), SNAPGEN_MAX_BATCH_IMAGES=str(args.max_batch))
    if args.threads:
        env["SNAPGEN_TORCH_THREADS"] = str(args.threads)
    procs.start("embedded", snapgen("serve", "--model", str(model), "--port", str(port)), env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, procs, args.startup_timeout)
    return url


def start_redis_mode(procs: Processes, model: Path, args, data_dir: Path) -> str:
    redis_port, api_port = free_port(), free_port()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise RuntimeError("redis-server is not installed (scripts/system-deps.sh)")
    procs.start("redis", [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                          "--save", "", "--appendonly", "no"], child_env())  # fmt: skip
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    api_env = child_env(SNAPGEN_MAX_QUEUE_DEPTH=str(args.max_queue))
    procs.start("api", snapgen("serve", "--redis", redis_url, "--port", str(api_port),
                               "--api-processes", str(args.api_processes)), api_env)  # fmt: skip
    worker_env = child_env(SNAPGEN_MAX_BATCH_IMAGES=str(args.max_batch))
    for i in range(args.workers):
        extra = ["--threads", str(args.threads)] if args.threads else []
        procs.start(f"worker{i}", snapgen("worker", "--redis", redis_url, "--model", str(model),
                                          "--name", f"bench-w{i}", *extra), worker_env)  # fmt: skip
    url = f"http://127.0.0.1:{api_port}"
    wait_ready(url, procs, args.startup_timeout, workers=args.workers)
    return url


# -- report --------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        START,
        "## Server: HTTP + queue (bench/bench_server.py)",
        "",
        f"Run {meta['date']} on {meta['machine']} ({meta['cpus']} CPUs, load average before: {meta['load_before']}); "
        f"model `{meta['model']}`, {meta['steps']} steps, one {meta['size']} PNG per request; redis mode: "
        f"{meta['workers']} workers, {meta['api_processes']} API process(es); max batch {meta['max_batch']}, "
        f"queue limit {meta['max_queue']}.",
        "",
        "| set-up | clients | requests | 200 | 429 | failed | images/s | p50 ms | p95 ms | p99 ms | server p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {r['429']} | {r['failed']} | "
            f"{r['images_per_s']:.2f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['server_overhead_p50_ms']:.1f} |"
        )
    lines += ["", "Overhead of HTTP + queue over the direct call (p50 at 1 client, target <= 5 ms):", ""]
    for mode, value in results["overhead_ms"].items():
        lines.append(f"- {mode}: {value:+.1f} ms")
    lines += [
        "",
        "`server` = response latency - text - U-Net - decode time reported by the server (HTTP, queue, "
        "batching wait, PNG encoding, base64). Every request must be answered 200 or 429; `failed` counts "
        "anything else, including no answer.",
        END,
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model directory (e.g. from `snapgen init-model`)")
    p.add_argument("--modes", default="direct,embedded,redis")
    p.add_argument("--concurrency", default="1,8,32,200", help="client counts, comma-separated")
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level (>= clients)")
    p.add_argument("--direct-requests", type=int, default=30)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="workers in redis mode")
    p.add_argument("--api-processes", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--out", type=Path, help="markdown file whose bench_server section is replaced")
    p.add_argument("--quick", action="store_true", help="smoke test: 1,4 clients, 12 requests, 2 steps")
    args = p.parse_args()
    if args.quick:
        args.concurrency, args.requests, args.direct_requests, args.steps = "1,4", 12, 5, 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    levels = [int(c) for c in args.concurrency.split(",")]
    model = args.model.resolve()
    index = json.loads((model / "model_index.json").read_text())
    size = "x".join(map(str, index.get("resolutions", [[0, 0]])[0]))

    results = {
        "meta": {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "model": model.name,
            "size": size,
            "steps": args.steps,
            "workers": args.workers,
            "api_processes": args.api_processes,
            "max_batch": args.max_batch,
            "max_queue": args.max_queue,
        },
        "runs": [],
        "overhead_ms": {},
    }
    direct_p50 = None
    if "direct" in modes:
        run = direct_baseline(model, args.steps, args.direct_requests, args.threads)
        results["runs"].append(run.summary())
        direct_p50 = run.summary()["p50_ms"]
        print(json.dumps(run.summary()), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        for mode in (m for m in modes if m != "direct"):
            procs = Processes(Path(tmp))
            try:
                if mode == "embedded":
                    url = start_embedded(procs, model, args)
                elif mode == "redis":
                    url = start_redis_mode(procs, model, args, Path(tmp))
                else:
                    raise SystemExit(f"unknown mode {mode!r}; choose from direct, embedded, redis")
                for c in levels:
                    run = asyncio.run(load(url, mode, c, max(args.requests, c), args.steps, args.timeout))
                    summary = run.summary()
                    results["runs"].append(summary)
                    print(json.dumps(summary), flush=True)
                    if c == 1 and direct_p50 is not None:
                        results["overhead_ms"][mode] = summary["p50_ms"] - direct_p50
            finally:
                procs.stop_all()

    write_json(args.json, results)
    publish(markdown(results), args.out, START, END)
    failed = sum(r["failed"] for r in results["runs"])
    if failed:
        print(f"FAILED: {failed} request(s) got neither 200 nor 429", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
