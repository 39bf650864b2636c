"""--kernels and --graph on `snapgen generate`, `serve` and `worker`: refused at start, naming the flag, where they
cannot run (Triton without CUDA or its interpreter, CUDA graphs on a CPU); wired to the backend where they can."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest
from PIL import Image
from test_cli_fast import _env, probe

import snapgen.models.kernels as kernels
from server.backends import TorchBackend
from server.settings import Settings
from snapgen.cli import main
from snapgen.tracing import TracedUNet

REDIS = ["--redis", "redis://127.0.0.1:1/0"]  # never connected to: each command stops before


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SNAPGEN_") or name == "TRITON_INTERPRET":
            monkeypatch.delenv(name)


def test_generate_refuses_triton_on_a_cpu_before_importing_torch(tmp_path):
    code, _, heavy, result = probe(tmp_path, "generate", "a red circle", "--out", "x.png", "--kernels", "triton")
    assert code == 2 and heavy == []
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--kernels triton" in lines[0], result.stderr
    # Where triton is installed, what is missing is a GPU or the interpreter; where not, the package.
    assert ("TRITON_INTERPRET=1" if find_spec("triton") else "not installed") in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,words",
    [
        (["worker", *REDIS, "--graph"], ["--graph", "CUDA device", "cpu"]),
        (["worker", *REDIS, "--graph", "--device", "cuda:99"], ["--device cuda:99"]),
        (["worker", *REDIS, "--kernels", "triton"], ["--kernels triton"]),
        (["serve", "--graph"], ["--graph", "CUDA device"]),
        (["serve", "--kernels", "triton"], ["--kernels triton"]),
        (["serve", *REDIS, "--graph"], ["API only", "snapgen worker"]),
        (["worker", *REDIS, "--kernels", "triton", "--trace-unet"], ["trace"]),
        (["worker", *REDIS, "--graph", "--backend", "triton", "--triton-url", "grpc://h:8001"], ["backend torch"]),
    ],
)
def test_serve_and_worker_refuse_what_cannot_run_at_start(capsys, args, words):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_the_environment_sets_them_too(monkeypatch, capsys):
    monkeypatch.setenv("SNAPGEN_GRAPH", "true")
    monkeypatch.setenv("SNAPGEN_KERNELS", "triton")
    settings = Settings()
    assert settings.graph is True and settings.kernels == "triton"
    assert main(["worker", *REDIS]) == 2
    assert "--graph (SNAPGEN_GRAPH)" in capsys.readouterr().err


def test_the_backend_applies_the_kernels_and_leaves_the_trace_off(tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "available", lambda: None)
    monkeypatch.setattr(kernels, "set_kernels", lambda module, kind: calls.append((type(module).__name__, kind)))
    backend = TorchBackend(tiny_model, kernels="triton")
    assert calls == [("SnapGenUNet", "triton"), ("LatentDecoder", "triton")]
    assert not isinstance(backend._unet, TracedUNet)
    assert backend.describe()["kernels"] == "triton" and backend.describe()["graph"] is False
    with pytest.raises(ValueError, match="trace"):
        TorchBackend(tiny_model, kernels="triton", trace_unet=True)
    monkeypatch.setattr(kernels, "available", lambda: "no GPU here")
    with pytest.raises(ValueError, match="no GPU here"):
        TorchBackend(tiny_model, kernels="triton")
    assert isinstance(TorchBackend(tiny_model)._unet, TracedUNet)


def test_generate_runs_triton_through_the_interpreter(tiny_model, tmp_path):
    pytest.importorskip("triton")
    env = {**_env(), "TRITON_INTERPRET": "1"}
    images = {}
    for kind in ("torch", "triton"):
        out = tmp_path / f"{kind}.png"
        args = ["generate", "a red circle", "--model", str(tiny_model), "--steps", "1", "--kernels", kind]
        result = subprocess.run([sys.executable, "-m", "snapgen.cli", *args, "--out", str(out)], env=env,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr
        images[kind] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(images["triton"] - images["torch"]).max() <= 2
