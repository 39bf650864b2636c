"""A snapgen model directory as a diffusers pipeline: real diffusers loading, keywords, saving."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from snapgen.cli import main
from snapgen.diffusers_pipeline import SnapGenDiffusionPipeline, SnapGenDiffusionPipelineOutput
from snapgen.image_files import encode_image, read_parameters
from snapgen.model_dir import DEFAULT_MODEL_DIR, load_pipeline
from snapgen.noise import randn_tensor
from snapgen.request import InvalidRequestError
from snapgen.sampling import SamplerConfig
from snapgen.text import MiniLMTextEncoder

PROMPT = "a red circle to the left of a blue square"


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def from_pretrained(directory, **kwargs) -> SnapGenDiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(directory, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def core(tiny_model):
    return load_pipeline(tiny_model)


@pytest.fixture(scope="module")
def default_pipe():
    return from_pretrained(DEFAULT_MODEL_DIR)


def test_model_index_names_classes_diffusers_can_resolve(tiny_model):
    for directory in (tiny_model, DEFAULT_MODEL_DIR):
        index = json.loads((directory / "model_index.json").read_text())
        assert index["_class_name"] == "SnapGenDiffusionPipeline"
        assert index["unet"] == ["snapgen.models.unet", "SnapGenUNet"]
        assert index["decoder"] == ["snapgen.models.tiny_decoder", "TinyDecoder"]
        assert index["text_encoder"] == ["snapgen.text", "MiniLMTextEncoder"]
        assert index["scheduler"] == ["snapgen.sampling", "SamplerConfig"]
    assert json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())["autoencoder"] == [
        "snapgen.models.autoencoder",
        "SmallAutoencoder",
    ]


def test_diffusion_pipeline_loads_a_model_directory_offline(tiny_model, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("loading a local model directory must not reach the network")

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(no_network))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for directory in (tiny_model, DEFAULT_MODEL_DIR):
        pipe = DiffusionPipeline.from_pretrained(directory)
        assert type(pipe) is SnapGenDiffusionPipeline
        assert isinstance(pipe.text_encoder, MiniLMTextEncoder) and isinstance(pipe.scheduler, SamplerConfig)
    assert sorted(pipe.components) == ["autoencoder", "decoder", "scheduler", "text_encoder", "unet"]
    assert SnapGenDiffusionPipeline.from_pretrained(tiny_model).autoencoder is None  # optional component


def test_same_png_bytes_as_snapgen_generate(default_pipe, tmp_path):
    cli_file = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "--seed", "3", "--out", str(cli_file)]) == 0
    written = cli_file.read_bytes()
    parameters = read_parameters(written)  # the CLI's file names how it was made; the pixels must match too
    diffusers_image = default_pipe(PROMPT, generator=seeded(3)).images[0]
    assert encode_image(np.asarray(diffusers_image), "png", parameters) == written
    # The fast path, load_pipeline, with the keywords it shares with diffusers.
    core_image = load_pipeline()(PROMPT, seeds=3, guidance_scale=None, height=128, width=128).images[0]
    assert encode_image(np.asarray(core_image), "png", parameters) == written
    assert np.array_equal(np.asarray(Image.open(cli_file)), np.asarray(diffusers_image))


def test_generator_maps_to_portable_seeds(pipe, core):
    prompts = ["a red circle", "a blue square"]
    expected = core(prompts, seeds=10, output_type="latent").latents
    out = pipe(prompts, generator=seeded(10), output_type="latent")
    assert out.seeds == [10, 11] and torch.equal(out.images, expected)  # one generator: seed + i
    generator = seeded(10)
    pipe(prompts, generator=generator, output_type="latent")
    assert torch.equal(pipe(prompts, generator=generator, output_type="latent").images, expected)  # not advanced
    assert torch.equal(pipe(prompts, seeds=10, output_type="latent").images, expected)  # snapgen's alias
    per_image = pipe(prompts, generator=[seeded(11), seeded(10)], output_type="latent")
    assert per_image.seeds == [11, 10]
    assert torch.equal(per_image.images, core(prompts, seeds=[11, 10], output_type="latent").latents)
    copies = pipe("a red circle", num_images_per_prompt=2, generator=seeded(4), output_type="latent")
    assert copies.seeds == [4, 5]
    assert len(pipe("a red circle", output_type="latent").seeds) == 1  # no generator: a random seed, reported


@pytest.mark.parametrize(
    "generator,needle",
    [
        ([torch.Generator().manual_seed(1)] * 3, "3 generators for 2 images"),
        (torch.Generator(), "manual_seed"),  # its default seed is beyond the uint32 seeds of the portable noise
        (7, "torch.Generator"),
        (torch.Generator().manual_seed(2**32 - 1), "4294967295"),  # image 1 would need seed 2**32
    ],
)
def test_bad_generator_names_the_keyword(pipe, generator, needle):
    with pytest.raises(InvalidRequestError, match=needle) as info:
        pipe(["a", "b"], generator=generator, output_type="latent")
    assert info.value.field == "generator"


def test_latents_replace_the_initial_noise(pipe):
    seed_noise = randn_tensor([42], (4, 16, 16))
    from_seed = pipe("a red circle", generator=seeded(42), output_type="latent").images
    assert torch.equal(pipe("a red circle", latents=seed_noise, output_type="latent").images, from_seed)
    other = pipe("a red circle", latents=torch.zeros(1, 4, 16, 16), output_type="latent").images
    assert not torch.allclose(other, from_seed)
    with pytest.raises(InvalidRequestError, match=r"\(1, 4, 16, 16\)") as info:
        pipe("a red circle", latents=torch.zeros(2, 4, 16, 16))
    assert info.value.field == "latents"


def test_output_types_and_return_dict(pipe):
    out = pipe("a red circle", generator=seeded(1))
    assert isinstance(out, SnapGenDiffusionPipelineOutput) and out[0] is out.images
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (128, 128)
    pixels = np.asarray(out.images[0])
    array = pipe("a red circle", generator=seeded(1), output_type="np").images
    assert array.dtype == np.float32 and array.shape == (1, 128, 128, 3) and 0 <= array.min() <= array.max() <= 1
    assert np.abs(np.round(array[0] * 255).astype(int) - pixels.astype(int)).max() <= 1
    tensor = pipe("a red circle", generator=seeded(1), output_type="pt").images
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (1, 3, 128, 128)
    np.testing.assert_array_equal(tensor.permute(0, 2, 3, 1).numpy(), array)
    latents = pipe("a red circle", generator=seeded(1), output_type="latent").images
    assert isinstance(latents, torch.Tensor) and latents.shape == (1, 4, 16, 16)
    as_tuple = pipe("a red circle", generator=seeded(1), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert np.array_equal(np.asarray(as_tuple[0][0]), pixels)


def test_callback_on_step_end_sees_and_replaces_latents(pipe, core):
    seen = []

    def record(p, step_index, timestep, callback_kwargs):
        assert p is pipe and set(callback_kwargs) == {"latents"}
        seen.append((step_index, float(timestep)))
        return callback_kwargs

    plain = pipe("a red circle", generator=seeded(2), output_type="latent", callback_on_step_end=record).images
    times = core.sampler.timesteps(2, 128, 128)
    assert seen == [(0, float(times[0]) * 1000), (1, float(times[1]) * 1000)] and pipe.num_timesteps == 2
    assert torch.equal(plain, pipe("a red circle", generator=seeded(2), output_type="latent").images)

    def zero_at_the_end(p, step_index, timestep, callback_kwargs):
        return {"latents": callback_kwargs["latents"] * 0} if step_index == 1 else {}

    zeroed = pipe("a red circle", generator=seeded(2), output_type="latent", callback_on_step_end=zero_at_the_end)
    assert torch.equal(zeroed.images, torch.zeros_like(plain))

    def shift_first(p, step_index, timestep, callback_kwargs):
        return {"latents": callback_kwargs["latents"] + 1} if step_index == 0 else callback_kwargs

    shifted = pipe("a red circle", generator=seeded(2), output_type="latent", callback_on_step_end=shift_first,
                   callback_on_step_end_tensor_inputs=["latents"]).images  # fmt: skip
    expected = core("a red circle", seeds=2, output_type="latent",
                    on_step=lambda i, n, x: x + 1 if i == 1 else None).latents  # fmt: skip
    assert torch.equal(shifted, expected) and not torch.allclose(shifted, plain)


def test_bad_callback_names_the_keyword(pipe):
    with pytest.raises(InvalidRequestError, match="latents") as info:
        pipe("a red circle", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert info.value.field == "callback_on_step_end_tensor_inputs"
    with pytest.raises(InvalidRequestError) as info:
        pipe("a red circle", output_type="latent", callback_on_step_end=lambda *a: {"latents": torch.zeros(1)})
    assert info.value.field == "callback_on_step_end"


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated:FutureWarning")  # diffusers 0.42 prefers dtype=
def test_torch_dtype_float16_loads_and_runs(tiny_model, pipe):
    half = from_pretrained(tiny_model, torch_dtype=torch.float16)
    assert half.dtype == half.unet.dtype == half.decoder.dtype == torch.float16
    assert next(half.text_encoder.parameters()).dtype == torch.float32  # kept; its embeddings are cast
    try:
        out = half("a red circle", generator=seeded(1), output_type="np")
    except RuntimeError as e:  # a CPU without a float16 kernel one of the models needs: run what can run
        pytest.skip(f"float16 does not run on this CPU ({e}); the load itself is checked above")
    assert out.images.shape == (1, 128, 128, 3) and np.isfinite(out.images).all()


def test_to_dtype_and_device(tiny_model, pipe):
    moved = from_pretrained(tiny_model)
    assert moved.to("cpu") is moved and moved.device == torch.device("cpu")
    assert moved.to(torch.float64) is moved
    assert moved.dtype == moved.unet.dtype == moved.decoder.dtype == torch.float64
    assert next(moved.text_encoder.parameters()).dtype == torch.float32
    double = moved("a red circle", generator=seeded(5), output_type="latent").images
    single = pipe("a red circle", generator=seeded(5), output_type="latent").images
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, atol=1e-3, rtol=1e-3)
    moved.to(device="cpu", dtype=torch.float32)
    assert moved.dtype == torch.float32
    with pytest.raises(TypeError, match="non_blocking"):
        moved.to(non_blocking=True)


def test_save_pretrained_round_trips(default_pipe, tmp_path):
    saved = tmp_path / "saved"
    default_pipe.save_pretrained(saved)
    index = json.loads((saved / "model_index.json").read_text())
    assert index == json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert (saved / "autoencoder").is_dir() and not list(saved.rglob("*.bin"))
    expected = default_pipe(PROMPT, generator=seeded(3), output_type="np").images
    reloaded = from_pretrained(saved)
    assert np.array_equal(reloaded(PROMPT, generator=seeded(3), output_type="np").images, expected)
    core_images = load_pipeline(saved)(PROMPT, seeds=3, output_type="np").images
    assert np.array_equal(core_images[0], np.asarray(default_pipe(PROMPT, generator=seeded(3)).images[0]))

    empty = tmp_path / "empty"
    empty.mkdir()
    default_pipe.save_pretrained(empty)  # e.g. a tempfile.TemporaryDirectory
    assert (empty / "model_index.json").is_file()
    reloaded.save_pretrained(saved)  # over a model directory: replaced, as diffusers overwrites
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="model_index.json"):
        default_pipe.save_pretrained(other)
    assert (other / "notes.txt").read_text() == "mine"


def test_components_build_the_same_pipeline(pipe):
    again = SnapGenDiffusionPipeline(**pipe.components, **pipe.parameters)
    again.set_progress_bar_config(disable=True)
    assert again.unet is pipe.unet and again.config.resolutions == [[128, 128]]
    assert torch.equal(
        again("a red circle", generator=seeded(8), output_type="latent").images,
        pipe("a red circle", generator=seeded(8), output_type="latent").images,
    )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(prompt=""), "prompt"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=51), "num_inference_steps"),
        (dict(steps=0), "steps"),
        (dict(steps=2, num_inference_steps=2), "num_inference_steps"),
        (dict(height=100), "height"),
        (dict(height=256, width=256), "size"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
        (dict(output_type="tensor"), "output_type"),
        (dict(seeds=1, generator=torch.Generator().manual_seed(1)), "generator"),
        (dict(seeds=-1), "seeds"),
        (dict(strength=0.5), "image"),
    ],
)
def test_bad_value_names_the_keyword(pipe, kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        pipe(**{"prompt": "a red circle", **kwargs})
    assert info.value.field == field


@pytest.mark.parametrize("keyword", ["eta", "prompt_embeds", "timesteps"])
def test_unknown_keyword_is_a_type_error_naming_it(pipe, keyword):
    with pytest.raises(TypeError, match=keyword):
        pipe("a red circle", **{keyword: None})


def test_guidance_up_to_one_is_no_guidance_as_in_diffusers(pipe):
    unguided = pipe("a red circle", generator=seeded(6), guidance_scale=1.0, output_type="latent").images
    assert torch.equal(pipe("a red circle", generator=seeded(6), guidance_scale=0.0, output_type="latent").images,
                       unguided)  # fmt: skip
    guided = pipe("a red circle", generator=seeded(6), guidance_scale=3.0, negative_prompt="blue", output_type="latent")
    assert not torch.allclose(guided.images, unguided)


def test_old_model_directories_still_load(tiny_model, core, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_model, old)
    index = json.loads((old / "model_index.json").read_text())
    index.update(_class_name="SnapGenPipeline", unet=["snapgen.models", "SnapGenUNet"],
                 decoder=["snapgen", "TinyDecoder"])  # fmt: skip
    del index["_diffusers_version"]
    (old / "model_index.json").write_text(json.dumps(index))
    expected = core("a red circle", seeds=9, output_type="latent").latents
    assert torch.equal(load_pipeline(old)("a red circle", seeds=9, output_type="latent").latents, expected)
    loaded = from_pretrained(old)
    assert type(loaded) is SnapGenDiffusionPipeline
    assert torch.equal(loaded("a red circle", generator=seeded(9), output_type="latent").images, expected)


def test_image_to_image_takes_diffusers_names(default_pipe):
    source = default_pipe("a red circle", generator=seeded(1)).images[0]
    text_only = np.asarray(default_pipe("a blue square", generator=seeded(3)).images[0])
    ignored = default_pipe("a blue square", generator=seeded(3), image=source, strength=1.0).images[0]
    # At strength 1 the start is the seed's noise; up to one grey level (kernel order between calls, see
    # tests/test_image_to_image.py).
    assert np.abs(np.asarray(ignored).astype(int) - text_only.astype(int)).max() <= 1
    steps = []
    edited = default_pipe("a blue square", generator=seeded(3), image=source, strength=0.5,
                          callback_on_step_end=lambda p, i, t, kw: steps.append(float(t)) or kw).images[0]  # fmt: skip
    assert edited.size == source.size and not np.array_equal(np.asarray(edited), text_only)
    assert steps == [500.0, 250.0]  # the last two of the distilled times 1, 0.75, 0.5, 0.25 (x 1000)


def test_the_fast_path_does_not_import_diffusers_pipelines():
    watched = ("snapgen.diffusers_pipeline", "diffusers.pipelines")
    imports = "import sys, snapgen.cli, snapgen.model_dir, snapgen.pipeline"
    code = f"{imports}; print([m for m in {watched} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"
