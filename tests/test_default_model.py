"""The embedded default model (snapgen/assets/snapgen-shapes): the README's first command uses it."""

import json
import subprocess
import sys

import pytest
import torch

from snapgen.model_dir import DEFAULT_MODEL_DIR, describe_model, load_pipeline

PROMPT = "a red circle to the left of a blue square"


def test_default_model_is_shipped_small_and_safetensors_only():
    assert (DEFAULT_MODEL_DIR / "model_index.json").is_file()
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 50 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    info = describe_model(DEFAULT_MODEL_DIR)
    assert info["model_index"]["resolutions"] == [[128, 128]]
    assert info["config"]["unet"]["sample_size"] == 16 and info["config"]["unet"]["in_channels"] == 4


def test_generate_without_model_uses_the_default_and_is_reproducible(tmp_path):
    outs = []
    for name in ("a.png", "b.png"):
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "snapgen.cli", "generate", PROMPT, "--seed", "3", "--out", str(out)],
                       check=True, capture_output=True, timeout=300)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    info = json.loads(subprocess.run([sys.executable, "-m", "snapgen.cli", "info", "--json"], check=True,
                                     capture_output=True, text=True, timeout=300).stdout)
    assert info["model_dir"] == str(DEFAULT_MODEL_DIR.resolve())


def test_default_model_draws_shapes_not_noise():
    # A trained model, whatever its ShapesBench score: the pictures are mostly black background
    # with saturated palette-coloured objects, unlike a random-weight model's noise.
    pipe = load_pipeline()
    images = pipe([PROMPT, "three green triangles"], seeds=3, output_type="np").images
    for image in images:
        pixels = image.reshape(-1, 3).astype(int)
        dark = (pixels.max(axis=1) < 40).mean()
        assert 0.5 < dark < 0.99, dark
        colourful = (pixels.max(axis=1) - pixels.min(axis=1) > 100).mean()
        assert colourful > 0.01, colourful


def test_default_model_rejects_bad_size_with_a_clear_message():
    from snapgen.pipeline import InvalidRequestError

    pipe = load_pipeline()
    with pytest.raises(InvalidRequestError, match="128x128"):
        pipe(PROMPT, seeds=0, steps=1, height=256, width=256)


def test_saved_model_directories_carry_no_local_paths(tmp_path):
    # diffusers records where from_pretrained read a component (`_name_or_path`): a path on the
    # machine that trained it, which must not end up in a shipped or re-saved model directory.
    from snapgen.model_dir import save_model

    pipe = load_pipeline()
    saved = save_model(tmp_path / "copy", pipe.unet, pipe.decoder.model, pipe.text_encoder, pipe.sampler)
    for directory in (DEFAULT_MODEL_DIR, saved):
        for config in directory.glob("*/config.json"):
            assert "_name_or_path" not in json.loads(config.read_text()), config


def test_default_model_carries_the_encoder_of_its_latent_space():
    # What fine-tuning the default model starts from (docs/training.md): the autoencoder its
    # U-Net's latents came from. Its latents of unseen ShapesBench scenes are ~N(0, 1) after the
    # shipped normalisation, and the shipped (tiny) decoder turns them back into the pictures.
    from snapgen.model_dir import encoder_dir
    from snapgen.models.autoencoder import load_encoder
    from training.shapesbench import ShapesDataset

    encoder = load_encoder(encoder_dir(DEFAULT_MODEL_DIR))
    decoder = load_pipeline().decoder
    assert (encoder.scaling_factor, encoder.shift_factor) == (decoder.scaling_factor, decoder.shift_factor)
    scenes = ShapesDataset(32, seed=12345)
    pixels = torch.stack([scenes[i]["pixels"] for i in range(32)])
    with torch.no_grad():
        z = encoder.to_diffusion(encoder.encode(pixels))
        recon = decoder.decode(decoder.from_diffusion(z)).clamp(-1, 1)
    assert abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.2, (z.mean().item(), z.std().item())
    psnr = 10 * torch.log10(4 / ((recon - pixels) ** 2).mean()).item()
    assert psnr > 25, psnr


def test_weights_that_fp16_holds_exactly_are_saved_in_fp16_and_others_are_not(tmp_path):
    from safetensors.torch import load_file

    from snapgen.model_dir import save_model

    pipe = load_pipeline()  # the default's U-Net ships in fp16 and loads as fp32
    saved = save_model(tmp_path / "copy", pipe.unet, pipe.decoder.model, pipe.text_encoder, pipe.sampler)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (saved / weights).read_bytes() == (DEFAULT_MODEL_DIR / weights).read_bytes()
    # The copy draws the default's pictures bit for bit.
    copy_image = load_pipeline(saved)("a red circle", seeds=1, output_type="np").images[0]
    assert (copy_image == pipe("a red circle", seeds=1, output_type="np").images[0]).all()
    # One weight off the fp16 grid keeps the whole U-Net in fp32, so nothing is rounded.
    with torch.no_grad():
        next(pipe.unet.parameters()).view(-1)[0] += 1e-6
    resaved = save_model(tmp_path / "changed", pipe.unet, pipe.decoder.model, pipe.text_encoder, pipe.sampler)
    tensors = load_file(resaved / weights)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    state = pipe.unet.state_dict()
    assert all(torch.equal(tensors[k], state[k]) for k in tensors)
