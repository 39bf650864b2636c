"""The worker's backend seam: the staged loop gives the library pipeline's images, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from server.backends import TorchBackend
from snapgen.image_files import encode_image
from snapgen.model_dir import load_pipeline
from snapgen.request import GenerationRequest, InvalidRequestError


@pytest.fixture(scope="module")
def backend(tiny_model):
    return TorchBackend(tiny_model)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_backend_matches_the_pipeline(backend, pipe, guidance):
    prompts, seeds, negatives = ["a red circle", "two blue squares"], [5, 6], ["", "green"]
    batch = backend.resolve(GenerationRequest(prompts, negatives, seed=seeds, steps=2, guidance_scale=guidance))
    ours = backend.generate(batch)
    theirs = pipe(prompts, seeds=seeds, steps=2, guidance_scale=guidance, height=128, width=128,
                  negative_prompt=negatives, output_type="np")  # fmt: skip
    for a, b in zip(ours.images, theirs.images, strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(ours.timings) == {"text_s", "unet_s", "decode_s", "total_s"}
    # PNG bytes are those `snapgen generate` writes.
    assert encode_image(ours.images[0], "png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_backend_describes_and_validates(backend):
    info = backend.describe()
    assert info["id"] == "tiny" and info["sizes"] == [[128, 128]] and info["default_steps"] == 2
    assert info["max_prompt_tokens"] == 32 and info["backend"] == "TorchBackend"
    resolved = backend.resolve(GenerationRequest("ok", seed=1))
    assert (resolved.steps, resolved.height, resolved.width, resolved.seeds) == (2, 128, 128, (1,))
    long = " ".join(["word"] * 40)
    cases = [
        (dict(height=256), "height"),
        (dict(height=256, width=256), "size"),
        (dict(steps=51), "steps"),
        (dict(prompt=long), "prompt"),
        (dict(guidance_scale=3.0, negative_prompt=long), "negative_prompt"),
    ]
    for kwargs, field in cases:
        with pytest.raises(InvalidRequestError) as e:
            backend.resolve(GenerationRequest(**{"prompt": "ok", "seed": 1, **kwargs}))
        assert e.value.field == field


def test_on_step_reports_progress_and_can_stop(backend):
    seen = []

    class Stop(Exception):
        pass

    def on_step(step, steps, latents):
        seen.append((step, steps))
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        backend.generate(backend.resolve(GenerationRequest("x", seed=1, steps=5)), on_step)
    assert seen == [(1, 5), (2, 5)]
