"""`schemathesis run --checks all` against `snapgen serve` under uvicorn, with API keys off and on.

Every check is on but one (see ``run_schemathesis``); the adaptations the static schema cannot express
(the model's sizes and max_steps, the seed rule across seed and n, the worker-side token check) are in
schemathesis.toml and schemathesis_hooks.py, each with its reason. Examples per operation are few, so
both runs take about a minute on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_harness import ROOT, Proc, Server, clean_env, free_port, metric_values, snapgen, wait_until

CONFIG = ROOT / "tests" / "server" / "schemathesis.toml"
MAX_EXAMPLES = 15
KEY = "schemathesis-key-0123456789"


def run_schemathesis(url: str, tmp_path: Path, *options: str) -> str:
    args = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file", str(CONFIG),
        "run", f"{url}/openapi.json",
        "--checks", "all",
        # DELETE /v1/jobs/{id} cancels a job; the canceled job stays readable until it expires (docs/server.md,
        # test_server_embedded), where use_after_free expects a 404 after any successful DELETE.
        "--exclude-checks", "use_after_free",
        "--max-examples", str(MAX_EXAMPLES),
        "--no-color",
        *options,
    ]  # fmt: skip
    env = {**os.environ, "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis")}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"schemathesis failed:\n{done.stdout[-30000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def check_model(client: httpx.Client) -> None:
    # schemathesis_hooks.py gives generated sizes the test model's one size, and steps its max_steps at most.
    [card] = client.get("/v1/models").json()["data"]
    assert card["sizes"] == [[128, 128]] and card["max_steps"] == 50, card


def drain(client: httpx.Client) -> None:
    """Wait for the jobs the run queued, so later tests find an idle worker."""

    def idle():
        values = metric_values(client.get("/metrics").text)
        return values["snapgen_queue_depth"] == 0 and values["snapgen_jobs_in_flight"] == 0

    wait_until(idle, 180, "the jobs queued by schemathesis to finish", interval=0.5)


@pytest.fixture(scope="module")
def keyed(tiny_model, mobile_dir, log_dir):
    """A second embedded server, with an API key."""
    port = free_port()
    env = clean_env(
        SNAPGEN_API_KEYS=KEY,
        SNAPGEN_MAX_QUEUE_DEPTH="4",
        SNAPGEN_MOBILE_DIR=str(mobile_dir),
        SNAPGEN_TORCH_THREADS="1",
        SNAPGEN_DRAIN_TIMEOUT_S="2",
    )
    proc = Proc("keyed", snapgen("serve", "--model", str(tiny_model), "--port", str(port)), env, log_dir).start()
    try:
        yield Server(proc, port).wait_ready()
    finally:
        proc.stop(signal.SIGTERM, timeout=30)


def test_schemathesis_without_keys(embedded, tmp_path):
    with embedded.client() as client:
        check_model(client)
        assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})
        try:
            run_schemathesis(embedded.url, tmp_path)
        finally:
            drain(client)


def test_schemathesis_with_keys(keyed, tmp_path):
    with keyed.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        check_model(client)
        assert "HTTPBearer" in client.get("/openapi.json").json()["components"]["securitySchemes"]
        try:
            run_schemathesis(keyed.url, tmp_path, "--header", f"Authorization: Bearer {KEY}")
        finally:
            drain(client)
