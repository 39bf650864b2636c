"""The ONNX repository (`--backend onnx`) served by the nvidia-pytriton `tritonserver`, over HTTP.

That binary has no onnxruntime backend; ``triton_export.server`` serves the unchanged repository (the
same config.pbtxt and model.onnx) through its Python-based ``onnxruntime`` stand-in, which runs the
graphs with the onnxruntime package. What this checks: the exported graphs with a dynamic batch, the
configs Triton accepts for them, the worker backend's HTTP client and its batch splitting, and
images within PSNR 35 dB of the in-process PyTorch backend.
"""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest
from server_harness import clean_env

from server.backends import TorchBackend
from server.triton_backend import TritonBackend
from snapgen.cli import main
from snapgen.request import ResolvedRequest
from triton_export.server import TritonServer


def psnr_8bit(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def onnx_repo(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("triton-repos") / "onnx"
    args = ["export", "triton", "--model", str(tiny_model), "--out", str(path), "--backend", "onnx",
            "--max-batch-size", "2"]  # fmt: skip
    assert main(args) == 0
    return path


def test_onnx_configs(onnx_repo):
    unet = (onnx_repo / "snapgen_unet" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in unet and 'default_model_filename: "model.onnx"' in unet
    assert "max_batch_size: 2" in unet and "dims: [ 4, 16, 16 ]" in unet  # traced at the one latent size
    decoder = (onnx_repo / "snapgen_decoder" / "config.pbtxt").read_text()
    assert "dims: [ 3, 128, 128 ]" in decoder
    manifest = json.loads((onnx_repo / "snapgen_triton.json").read_text())
    assert manifest["backend"] == "onnx" and manifest["latent_size"] == [16, 16]
    for component in ("text_encoder", "unet", "decoder"):
        check = manifest["onnx_check"][component]
        assert check["psnr_db"] is None or check["psnr_db"] >= 35, check  # null: identical
        assert (onnx_repo / f"snapgen_{component}" / "1" / "model.onnx").stat().st_size > 0


def test_onnx_images_match_the_in_process_backend(onnx_repo, tiny_model, log_dir):
    # Three images with guidance: 6 rows per U-Net call, sent as three requests of max_batch_size 2.
    batch = ResolvedRequest(("a red circle", "two blue squares", "a green triangle"), ("blurry", "", ""), (3, 4, 5),
                            steps=2, guidance_scale=3.0, height=128, width=128)  # fmt: skip
    want = TorchBackend(tiny_model).generate(batch).images
    triton = TritonServer(onnx_repo, log_path=log_dir / "triton-onnx.log", env=clean_env(SNAPGEN_TORCH_THREADS="1"))
    with triton.start(timeout=900.0) as t:
        backend = TritonBackend(tiny_model, t.http_url)
        assert backend.health() is None
        got = backend.generate(batch).images
        metrics = httpx.get(t.metrics_url, timeout=10).text
    assert len(got) == 3
    for a, b in zip(want, got, strict=True):
        assert a.shape == b.shape == (128, 128, 3)
        assert psnr_8bit(a, b) >= 35.0
    success = {
        model: float(value)
        for model, value in re.findall(r'^nv_inference_request_success{model="(\w+)",version="1"} (\S+)$', metrics,
                                       flags=re.M)  # fmt: skip
    }
    # 2 steps x 3 requests; cond and uncond text (3 prompts each: 2 requests each); the decoder: 2 requests.
    assert success == {"snapgen_unet": 6, "snapgen_text_encoder": 4, "snapgen_decoder": 2}
