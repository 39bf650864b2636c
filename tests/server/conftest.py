"""Fixtures for the server tests: a tiny random model, the embedded server, a bundle directory.

Helpers live in server_harness.py.
"""

from __future__ import annotations

import json
import os
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import Proc, Server, clean_env, free_port, snapgen


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def mobile_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("mobile")
    with zipfile.ZipFile(directory / "snapgen-ios.zip", "w") as z:
        z.writestr("manifest.json", json.dumps({"name": "snapgen-ios", "version": "0.1.0"}))
        z.writestr("Unet.mlmodelc/weights.bin", os.urandom(50_000))  # incompressible: a real size
    (directory / "notes.txt").write_text("not a bundle")
    (directory.parent / "secret.zip").write_bytes(b"outside the bundle directory")
    return directory


@pytest.fixture(scope="session")
def embedded(tiny_model, mobile_dir, log_dir) -> Iterator[Server]:
    """The embedded default: API + in-memory queue + one worker, no auth (loopback)."""
    port = free_port()
    env = clean_env(
        SNAPGEN_MAX_QUEUE_DEPTH="4",
        SNAPGEN_MOBILE_DIR=str(mobile_dir),
        SNAPGEN_TORCH_THREADS="1",
        SNAPGEN_DRAIN_TIMEOUT_S="2",
        SNAPGEN_MAX_IMAGE_BYTES="65536",
    )
    proc = Proc("embedded", snapgen("serve", "--model", str(tiny_model), "--port", str(port)), env, log_dir).start()
    server = Server(proc, port)
    try:
        yield server.wait_ready()
    finally:
        code = proc.stop(signal.SIGTERM, timeout=30)
        # uvicorn re-raises the signal after its graceful shutdown.
        assert code in (0, -signal.SIGTERM), f"the embedded server did not stop cleanly ({code}):\n{proc.log_tail()}"
        assert "Finished server process" in proc.log_tail(), proc.log_tail()


@pytest.fixture(scope="session")
def embedded_default(log_dir) -> Iterator[Server]:
    """``snapgen serve`` on the embedded default model, which has an encoder (image-to-image)."""
    port = free_port()
    env = clean_env(SNAPGEN_TORCH_THREADS="1", SNAPGEN_DRAIN_TIMEOUT_S="2")
    proc = Proc("embedded-default", snapgen("serve", "--port", str(port)), env, log_dir).start()
    try:
        yield Server(proc, port).wait_ready()
    finally:
        proc.stop(signal.SIGTERM, timeout=30)
