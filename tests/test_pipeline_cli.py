"""The pipeline and the `snapgen` CLI, end to end on a small random-weight model directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snapgen.cli import main
from snapgen.model_dir import ModelDirectoryError, load_pipeline
from snapgen.noise import randn_tensor
from snapgen.pipeline import InvalidRequestError

SNAPGEN = [sys.executable, "-m", "snapgen.cli"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["init-model", "--config", "snapgen-tiny", "--out", str(path), "--seed", "1"]) == 0
    return path


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load_pipeline(model_dir)


def test_model_directory_layout(model_dir):
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "SnapGenDiffusionPipeline"  # what diffusers resolves (docs/diffusers.md)
    assert index["latent_factor"] == 8 and index["resolutions"] == [[128, 128]]
    for component in ("unet", "decoder", "text_encoder", "scheduler"):
        assert (model_dir / component).is_dir()
    assert list(model_dir.rglob("*.safetensors")) and not list(model_dir.rglob("*.bin"))
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".tiny.")]  # no staging left


def test_pipeline_is_deterministic_and_starts_from_portable_noise(pipe):
    a = pipe("a red circle", seeds=3, steps=2, output_type="latent")
    b = pipe("a red circle", seeds=3, steps=2, output_type="latent")
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, pipe("a red circle", seeds=4, steps=2, output_type="latent").latents)

    start = {}
    pipe("a red circle", seeds=3, steps=1, on_step=lambda i, n, x: start.setdefault("x", x), output_type="latent")
    noise = randn_tensor([3], (4, 16, 16))
    velocity_step = start["x"] - noise  # one Euler step from t=1 to t=0 moves by -v
    assert velocity_step.abs().max() > 0
    with torch.no_grad():
        text = pipe.encode_text(["a red circle"])
        v = pipe.unet(noise, torch.ones(1), text.tokens, text.mask, text.pooled).sample
    torch.testing.assert_close(start["x"], noise - v)


def test_batch_uses_seed_plus_index(pipe):
    batch = pipe(["a red circle", "a blue square"], seeds=10, steps=2, output_type="latent")
    assert batch.seeds == [10, 11]
    single = pipe("a blue square", seeds=11, steps=2, output_type="latent")
    torch.testing.assert_close(batch.latents[1:], single.latents, atol=1e-5, rtol=1e-4)


def test_guidance_uses_negative_prompt(pipe):
    plain = pipe("a red circle", seeds=1, steps=2, guidance_scale=1.0, output_type="latent").latents
    guided = pipe("a red circle", seeds=1, steps=2, guidance_scale=4.0, output_type="latent").latents
    negative = pipe(
        "a red circle", seeds=1, steps=2, guidance_scale=4.0, negative_prompt="blue", output_type="latent"
    ).latents
    assert not torch.allclose(plain, guided) and not torch.allclose(guided, negative)


def test_images_progress_and_timings(pipe):
    seen = []
    out = pipe(["x", "y"], seeds=0, steps=3, on_step=lambda i, n, x: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert [im.size for im in out.images] == [(128, 128)] * 2 and out.images[0].mode == "RGB"
    assert set(out.timings) == {"text_s", "unet_s", "decode_s", "total_s"}
    arrays = pipe("x", seeds=0, steps=3, output_type="np").images
    assert arrays[0].dtype == np.uint8 and np.array_equal(arrays[0], np.asarray(out.images[0]))


@pytest.mark.parametrize(
    "kwargs,field,needle",
    [
        (dict(prompts=""), "prompt", "empty"),
        (dict(prompts=["ok", "   "]), "prompt", "prompt 1 is empty"),
        (dict(prompts=" ".join(["word"] * 60)), "prompt", "at most 32"),
        (dict(height=100), "height", "multiple of 8"),
        (dict(height=256, width=256), "size", "128x128"),
        (dict(steps=0), "steps", "an integer >= 1"),
        (dict(steps=51), "steps", "from 1 to 50"),
        (dict(guidance_scale=-1.0), "guidance_scale", ">= 0"),
        (dict(guidance_scale=float("nan")), "guidance_scale", ">= 0"),
        (dict(seeds=-5), "seed", "0 to 4294967295"),
    ],
)
def test_bad_input_names_the_field(pipe, kwargs, field, needle):
    kwargs = {"prompts": "a red circle", **kwargs}
    with pytest.raises(InvalidRequestError) as info:
        pipe(**kwargs)
    assert info.value.field == field and needle in str(info.value)


def test_missing_component_is_named(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "decoder")
    with pytest.raises(ModelDirectoryError, match="decoder"):
        load_pipeline(broken)
    assert main(["generate", "a red circle", "--model", str(broken), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def _run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run([*SNAPGEN, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_generate_is_byte_identical_across_runs(model_dir, tmp_path):
    outs = []
    for name in ("a.png", "b.png"):
        result = _run("generate", "a red circle to the left of a blue square", "--seed", "3", "--steps", "2",
                      "--model", str(model_dir), "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    assert Image.open(tmp_path / "a.png").size == (128, 128)


def test_cli_batch_form_writes_numbered_files_in_order(model_dir, tmp_path, pipe):
    prompts = ["a red circle", "two green triangles", "a blue square above a yellow star"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out_dir = tmp_path / "grid"
    code = main(["generate", "--prompt-file", str(tmp_path / "prompts.txt"), "--out-dir", str(out_dir),
                 "--seed", "5", "--steps", "2", "--batch-size", "2", "--model", str(model_dir)])
    assert code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["0000.png", "0001.png", "0002.png"]
    expected = pipe(prompts[2], seeds=7, steps=2, output_type="np").images[0]
    written = np.asarray(Image.open(out_dir / "0002.png"))
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--steps", "0"], "--steps"),
        (["--guidance", "-2"], "--guidance"),
        (["--height", "120"], "--height"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_cli_bad_values_fail_cleanly_and_write_nothing(model_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(model_dir), "--out", str(out), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_empty_prompt_and_missing_model(tmp_path, capsys):
    # The request is checked before any model is looked for: the empty prompt is named first.
    assert main(["generate", "", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "prompt: the prompt is empty" in capsys.readouterr().err
    assert main(["generate", "a red circle", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_cli_info_for_named_config(capsys):
    assert main(["info", "--config", "snapgen-379m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["unet_params"] - 379e6) / 379e6 < 0.03
    assert 1.2e6 < info["decoder_params"] < 1.6e6
    assert main(["info", "--config", "nope", "--json"]) == 2


def test_cli_info_for_model_dir(model_dir):
    result = _run("info", "--model", str(model_dir), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model_dir"] == str(Path(model_dir).resolve())
    assert info["unet_params"] > 0 and info["decoder_params"] > 0
    assert "unet/diffusion_pytorch_model.safetensors" in info["sha256"]
    assert all(len(d) == 64 for d in info["sha256"].values())


def test_init_model_refuses_to_overwrite(model_dir, capsys):
    assert main(["init-model", "--out", str(model_dir)]) == 2
    assert "--force" in capsys.readouterr().err
