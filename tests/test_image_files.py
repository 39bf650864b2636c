"""Generated images as files: the parameters inside a PNG, and the CLI and the pipeline agreeing on them."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from snapgen.cli import main
from snapgen.image_files import a1111_text, encode_image, image_parameters, read_parameters
from snapgen.model_dir import file_sha256, load_pipeline
from snapgen.request import GenerationRequest, ModelCard

CARD = ModelCard(id="m", sizes=((128, 128),), default_steps=4, max_steps=50, guidance_scale=1.0)


def test_a_png_carries_its_parameters_in_both_forms():
    request = GenerationRequest(["a red circle", "a blue square"], negative_prompt="green", seed=7,
                                guidance_scale=2.5).resolve(CARD)  # fmt: skip
    parameters = image_parameters(request, 1, "shapes", "ab" * 32)
    png = encode_image(np.zeros((128, 128, 3), np.uint8), "png", parameters)
    assert read_parameters(png) == parameters
    assert parameters["prompt"] == "a blue square" and parameters["seed"] == 8 and parameters["steps"] == 4
    text = Image.open(io.BytesIO(png)).info["parameters"]
    assert text == a1111_text(parameters)
    assert text.splitlines()[:2] == ["a blue square", "Negative prompt: green"]
    assert "Steps: 4, Sampler: Euler, CFG scale: 2.5, Seed: 8, Size: 128x128, Model hash: abababab" in text
    # The same parameters give the same bytes; JPEG and WebP carry none.
    assert png == encode_image(np.zeros((128, 128, 3), np.uint8), "png", dict(reversed(parameters.items())))
    assert read_parameters(encode_image(np.zeros((8, 8, 3), np.uint8), "jpeg", parameters)) is None


def test_snapgen_generate_writes_what_made_the_image(tiny_model, tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model), "--seed", "5", "--out", str(out)]) == 0
    parameters = read_parameters(out)
    assert parameters["prompt"] == "a red circle" and parameters["seed"] == 5 and parameters["steps"] == 2
    assert parameters["model"] == tiny_model.name
    assert parameters["unet_sha256"] == file_sha256(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    # The pipeline's own image with those parameters is the file, byte for byte.
    pipe = load_pipeline(tiny_model)
    request = pipe.resolve(GenerationRequest("a red circle", seed=5))
    array = pipe.run(request, output_type="np").images[0]
    assert encode_image(array, "png", image_parameters(request, 0, *pipe.provenance())) == out.read_bytes()


def test_info_prints_an_images_parameters_and_from_makes_it_again(tmp_path, capsys):
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a red circle", "--seed", "4", "--out", str(first)]) == 0  # the default model
    capsys.readouterr()
    assert main(["info", str(first), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_parameters(first)
    assert main(["generate", "--from", str(first), "--out", str(again)]) == 0
    assert again.read_bytes() == first.read_bytes()
    # A flag given on the command line wins over the file's value.
    other = tmp_path / "c.png"
    assert main(["generate", "--from", str(first), "--seed", "5", "--out", str(other)]) == 0
    assert read_parameters(other)["seed"] == 5 and other.read_bytes() != first.read_bytes()


def test_from_refuses_another_model_and_images_without_parameters(tiny_model, tmp_path, capsys):
    made = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--out", str(made)]) == 0  # the default model
    capsys.readouterr()
    assert main(["generate", "--from", str(made), "--model", str(tiny_model), "--out", str(tmp_path / "b.png")]) == 2
    assert "pass that model's directory with --model" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["info", str(plain)]) == 2 and "no snapgen parameters" in capsys.readouterr().err
    assert main(["generate", "--from", str(plain), "--out", str(tmp_path / "c.png")]) == 2
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


def test_image_to_image_from_the_cli(tiny_model, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.new("RGB", (128, 128), (200, 0, 0)).save(source)
    out = tmp_path / "out.png"
    assert main(["generate", "a blue square", "--image", str(source), "--strength", "0.5", "--out", str(out)]) == 0
    assert read_parameters(out)["strength"] == 0.5
    capsys.readouterr()
    for args, needle in (
        (["--image", str(source)], "--image and --strength go together"),
        (["--image", str(source), "--strength", "0.5", "--width", "64"], "--width"),
        (["--image", str(source), "--strength", "0.5", "--model", str(tiny_model)], "cannot take an input image"),
        (["--image", str(tmp_path / "nope.png"), "--strength", "0.5"], "--image"),
    ):
        assert main(["generate", "a blue square", *args, "--out", str(tmp_path / "x.png")]) == 2, args
        assert needle in capsys.readouterr().err, args
    assert not (tmp_path / "x.png").exists()
