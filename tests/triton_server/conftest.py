"""Fixtures for the Triton tests: a random snapgen-tiny model, its python-backend repository, reference images.

(The folder is not named ``triton``: with tests/ on sys.path that would be an importable namespace package
``triton``, which torch takes for OpenAI Triton.)

The server tests' helpers (redis-server, `snapgen serve` under uvicorn, polling) are reused from
tests/server/server_harness.py; Triton itself is the real ``tritonserver`` of the nvidia-pytriton wheel
(``triton_export.server``), started on free loopback ports.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from server_harness import ROOT, clean_env, snapgen  # noqa: E402

from snapgen.cli import main  # noqa: E402


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("triton-logs")


@pytest.fixture(scope="session")
def python_repo(tiny_model, tmp_path_factory) -> Path:
    """`snapgen export triton` with the defaults: python backend, max_batch_size 16, KIND_CPU."""
    path = tmp_path_factory.mktemp("triton-repos") / "python"
    assert main(["export", "triton", "--model", str(tiny_model), "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def reference_pngs(tiny_model, tmp_path_factory):
    """``make(prompt, seed, steps, n=1, guidance=1.0)``: PNG bytes of ``snapgen generate`` (the in-process pipeline),
    ``n`` images of one prompt with seeds ``seed``, ``seed + 1``, ..."""
    cache: dict[tuple, list[bytes]] = {}
    directory = tmp_path_factory.mktemp("triton-reference")

    def make(prompt: str, seed: int, steps: int, n: int = 1, guidance: float = 1.0) -> list[bytes]:
        key = (seed, steps, n, guidance, prompt)
        if key not in cache:
            out = directory / f"{len(cache)}"
            prompts = directory / f"{len(cache)}.txt"
            prompts.write_text((prompt + "\n") * n)
            args = snapgen("generate", "--prompt-file", str(prompts), "--out-dir", str(out), "--model", str(tiny_model),
                           "--seed", str(seed), "--steps", str(steps), "--guidance", str(guidance))  # fmt: skip
            result = subprocess.run(args, env=clean_env(), capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert result.returncode == 0, result.stderr
            cache[key] = [(out / f"{i:04d}.png").read_bytes() for i in range(n)]
        return cache[key]

    return make
