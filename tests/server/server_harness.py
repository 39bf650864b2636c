"""Helpers for the server tests: redis-server on a free port, `snapgen serve` under uvicorn, SSE, metrics.

(Not named conftest: every test folder has one, and a plain import would find the wrong one.)

Waits are condition polls with deadlines (generous: the CI machine has two shared cores).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 300.0  # model loading under a loaded 2-core machine
JOB_TIMEOUT = 120.0


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_same_picture(b64_a: str, b64_b: str) -> None:
    """The same seed in batches of different sizes: equal up to one grey level, not always in bytes.

    CPU BLAS kernels may sum in an order that depends on the batch size (seen on AVX-512 machines).
    """
    a, b = (np.asarray(decode(x), dtype=int) for x in (b64_a, b64_b))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (httpx.HTTPError, OSError) as e:
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPGEN_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name, self.args, self.env = name, args, env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return None if self.popen is None else self.popen.returncode
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(10)


class RedisServer(Proc):
    """Debian's redis-server; append-only file with fsync on every write, so a restart loses nothing."""

    def __init__(self, log_dir: Path, data_dir: Path):
        self.port = free_port()
        data_dir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run scripts/system-deps.sh")
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--protected-mode", "yes",
        ]  # fmt: skip
        super().__init__(f"redis-{self.port}", args, clean_env(), log_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)

    def start(self) -> RedisServer:
        super().start()
        wait_until(self._pings, 30, f"redis-server on port {self.port}")
        return self

    def _pings(self) -> bool:
        if not self.alive():
            raise AssertionError(f"redis-server exited:\n{self.log_tail()}")
        try:
            return bool(self.client().ping())
        except Exception:
            return False


def fill_redis(client, prefix: str = "filler") -> None:
    """Fill Redis (policy noeviction) up to a maxmemory about 1 MiB above what it uses now, until it refuses
    a write; then lower maxmemory a little under what is used: full, whatever small buffers come and go.
    Room again: ``client.config_set("maxmemory", "0")`` and delete the ``prefix:*`` keys."""
    import redis

    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) + (1 << 20)))
    try:
        for i in range(10_000):
            client.set(f"{prefix}:{i}", b"f" * 20_000)
        raise AssertionError("Redis took 200 MB without refusing a write: is maxmemory ignored?")
    except redis.exceptions.OutOfMemoryError:
        pass
    client.config_set("maxmemory", str(int(int(client.info("memory")["used_memory"]) * 0.95)))


class Server:
    """`snapgen serve` under uvicorn on a free port."""

    def __init__(self, proc: Proc, port: int):
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=JOB_TIMEOUT, **kwargs)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> Server:
        def ready():
            if not self.proc.alive():
                raise AssertionError(f"{self.proc.name} exited:\n{self.proc.log_tail()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"{self.proc.name} to be ready", interval=0.2)
        return self


def snapgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "snapgen.cli", *args]


def sse_events(
    client: httpx.Client,
    path: str,
    until: set[str] | None = None,
    timeout: float = JOB_TIMEOUT,
    after_first: Callable[[], None] | None = None,
):
    """Read server-sent events from ``path`` until the stream ends (or an event in ``until``).

    ``after_first`` runs once the first event has arrived, i.e. once the stream is surely subscribed.
    """
    events = []
    with client.stream("GET", path, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = None, []
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and name is not None:
                events.append((name, json.loads("\n".join(data))))
                if after_first is not None and len(events) == 1:
                    after_first()
                if until and name in until:
                    break
                name, data = None, []
    return events


def wait_job(client: httpx.Client, job_id: str, condition: Callable[[dict], bool], what: str, timeout=JOB_TIMEOUT):
    def check():
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        return body if condition(body) else None

    return wait_until(check, timeout, what)


def finished(body: dict) -> bool:
    return body["status"] in ("succeeded", "failed", "canceled")


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values
