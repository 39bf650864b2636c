"""`snapgen export triton`: the repository's files and configs, and clear errors for bad input (no server here)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

from snapgen.cli import main
from triton_export.interface import read_shapes


def test_python_repository_layout_and_configs(python_repo, tiny_model):
    assert sorted(p.name for p in python_repo.iterdir()) == [
        "snapgen_decoder", "snapgen_text_encoder", "snapgen_triton.json", "snapgen_unet"]  # fmt: skip
    manifest = json.loads((python_repo / "snapgen_triton.json").read_text())
    assert manifest["backend"] == "python" and manifest["max_batch_size"] == 16 and manifest["instance_kind"] == "cpu"
    assert manifest["fingerprint"] == read_shapes(tiny_model).fingerprint
    # Self-contained: each model carries its component's weights, byte for byte the model directory's.
    for relative, digest in manifest["weights_sha256"].items():
        component = relative.split("/")[0]
        copy = python_repo / f"snapgen_{component}" / "1" / relative
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    for name in ("snapgen_text_encoder", "snapgen_unet", "snapgen_decoder"):
        assert (python_repo / name / "1" / "model.py").read_text().startswith('"""Triton python-backend model')

    unet = (python_repo / "snapgen_unet" / "config.pbtxt").read_text()
    assert 'name: "snapgen_unet"' in unet and 'backend: "python"' in unet and "max_batch_size: 16" in unet
    assert "dynamic_batching { }" in unet and "kind: KIND_CPU" in unet
    assert _tensors(unet) == {
        "sample": ("FP32", "4, -1, -1"),  # any size with the python backend
        "timestep": ("FP32", "1"),
        "encoder_hidden_states": ("FP32", "32, 384"),
        "encoder_attention_mask": ("BOOL", "32"),
        "pooled_projections": ("FP32", "384"),
        "velocity": ("FP32", "4, -1, -1"),
    }
    assert "reshape: { shape: [ ] }" in unet  # the flow time: a scalar per item
    assert 'key: "snapgen_component"\n  value: { string_value: "unet" }' in unet
    assert f'string_value: "{manifest["fingerprint"]}"' in unet

    text = (python_repo / "snapgen_text_encoder" / "config.pbtxt").read_text()
    assert _tensors(text) == {"input_ids": ("INT64", "32"), "attention_mask": ("INT64", "32"),
                              "tokens": ("FP32", "32, 384"), "pooled": ("FP32", "384")}  # fmt: skip
    decoder = (python_repo / "snapgen_decoder" / "config.pbtxt").read_text()
    assert _tensors(decoder) == {"latents": ("FP32", "4, -1, -1"), "image": ("FP32", "3, -1, -1")}


def _tensors(config: str) -> dict[str, tuple[str, str]]:
    """name -> (data type, dims) of every input and output block of a config.pbtxt."""
    found = re.findall(r'name: "(\w+)"\n    data_type: TYPE_(\w+)\n    dims: \[ ([^\]]*) \]', config)
    return {name: (dtype, dims) for name, dtype, dims in found}


def test_gpu_instances_and_batch_size(tiny_model, tmp_path):
    out = tmp_path / "gpu"
    assert main(["export", "triton", "--model", str(tiny_model), "--out", str(out), "--instance-kind", "gpu",
                 "--max-batch-size", "4"]) == 0  # fmt: skip
    for name in ("snapgen_text_encoder", "snapgen_unet", "snapgen_decoder"):
        config = (out / name / "config.pbtxt").read_text()
        assert "kind: KIND_GPU" in config and "KIND_CPU" not in config and "max_batch_size: 4" in config


def _export(capsys, *args) -> tuple[int, str]:
    code = main(["export", "triton", *args])
    return code, capsys.readouterr().err


def test_bad_inputs_give_clear_errors(tiny_model, tmp_path, capsys, monkeypatch):
    model = ["--model", str(tiny_model)]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("keep me")
    code, err = _export(capsys, *model, "--out", str(taken))
    assert code == 2 and "exists and is not empty" in err and "--force" in err
    assert (taken / "something").read_text() == "keep me"

    code, err = _export(capsys, *model, "--out", str(tmp_path / "a"), "--backend", "tensorrt")
    assert code == 2 and "--backend 'tensorrt': unknown; choose one of python, onnx" in err
    code, err = _export(capsys, *model, "--out", str(tmp_path / "a"), "--instance-kind", "tpu")
    assert code == 2 and "--instance-kind 'tpu': unknown; choose one of cpu, gpu" in err
    for bad in ("0", "-3", "2000", "many"):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "triton", *model, "--out", str(tmp_path / "a"), "--max-batch-size", bad])
        assert exit_info.value.code == 2
        assert "--max-batch-size: must be an integer from 1 to 1024" in capsys.readouterr().err

    code, err = _export(capsys, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "a"))
    assert code == 2 and "no such directory" in err
    code, err = _export(capsys, "--model", str(taken), "--out", str(tmp_path / "a"))
    assert code == 2 and "not a snapgen model directory" in err
    code, err = _export(capsys, "--model", str(tiny_model), "--out", str(tiny_model))
    assert code == 2 and "exists and is not empty" in err
    code, err = _export(capsys, "--model", str(tiny_model), "--out", str(tiny_model), "--force")
    assert code == 2 and "would replace the model directory" in err

    import snapgen.model_dir

    monkeypatch.delenv("SNAPGEN_MODEL", raising=False)
    monkeypatch.setattr(snapgen.model_dir, "DEFAULT_MODEL_DIR", tmp_path / "not-installed")
    code, err = _export(capsys, "--out", str(tmp_path / "a"))
    assert code == 2 and "default model is not installed" in err and "--model" in err
    assert not (tmp_path / "a").exists()


def test_onnx_needs_one_size_and_broken_weights_leave_nothing(tiny_model, tmp_path, capsys):
    two_sizes = tmp_path / "two-sizes"
    shutil.copytree(tiny_model, two_sizes)
    index = json.loads((two_sizes / "model_index.json").read_text())
    index["resolutions"] = [[128, 128], [64, 128]]
    (two_sizes / "model_index.json").write_text(json.dumps(index))
    code, err = _export(capsys, "--model", str(two_sizes), "--out", str(tmp_path / "r"), "--backend", "onnx")
    assert code == 2 and "traced at one latent size" in err and "use --backend python" in err

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for backend in ("python", "onnx"):
        code, err = _export(capsys, "--model", str(broken), "--out", str(tmp_path / "r"), "--backend", backend)
        assert code == 2 and "does not load" in err, err
    # Written atomically: neither the repository nor a temporary sibling is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "two-sizes"]


def test_force_replaces_a_repository(tiny_model, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["export", "triton", "--model", str(tiny_model), "--out", str(out), "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / "snapgen_unet" / "config.pbtxt").is_file()


def test_worker_flags(tmp_path, capsys, monkeypatch):
    for name in ("SNAPGEN_BACKEND", "SNAPGEN_TRITON_URL", "SNAPGEN_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    redis = ["worker", "--redis", "redis://127.0.0.1:1/0", "--model", str(tmp_path)]
    assert main([*redis, "--backend", "triton"]) == 2
    assert "backend triton needs a Triton URL" in capsys.readouterr().err
    assert main([*redis, "--backend", "triton", "--triton-url", "ftp://host:1"]) == 2
    assert "not a Triton URL; write grpc://HOST:8001 or http://HOST:8000" in capsys.readouterr().err
    assert main([*redis, "--triton-url", "grpc://host:8001"]) == 2
    assert "add --backend triton" in capsys.readouterr().err
