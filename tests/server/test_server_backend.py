"""The worker's backend seam: the staged loop gives the library pipeline's images, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from server.backends import Batch, TorchBackend
from server.worker import encode_image
from snapgen.model_dir import load_pipeline
from snapgen.pipeline import InvalidRequestError


@pytest.fixture(scope="module")
def backend(tiny_model):
    return TorchBackend(tiny_model)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_backend_matches_the_pipeline(backend, pipe, guidance):
    batch = Batch(["a red circle", "two blue squares"], [5, 6], 2, guidance, 128, 128, ["", "green"])
    ours = backend.generate(batch)
    theirs = pipe(batch.prompts, seeds=batch.seeds, steps=2, guidance_scale=guidance, height=128, width=128,
                  negative_prompt=batch.negative_prompts, output_type="np")  # fmt: skip
    for a, b in zip(ours.images, theirs.images, strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(ours.timings) == {"text_s", "unet_s", "decode_s"}
    # PNG bytes are those `snapgen generate` writes.
    assert encode_image(ours.images[0], "png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_backend_describes_and_validates(backend):
    info = backend.describe()
    assert info["id"] == "tiny" and info["sizes"] == [[128, 128]] and info["default_steps"] == 2
    assert info["max_prompt_tokens"] == 32 and info["backend"] == "TorchBackend"
    backend.validate(Batch(["ok"], [1], 2, 1.0, 128, 128))
    cases = [
        (Batch(["ok"], [1], 2, 1.0, 256, 128), "size"),
        (Batch(["ok"], [1], 51, 1.0, 128, 128), "steps"),
        (Batch([" ".join(["word"] * 40)], [1], 2, 1.0, 128, 128), "prompt"),
        (Batch(["ok"], [1], 2, 3.0, 128, 128, [" ".join(["word"] * 40)]), "negative_prompt"),
    ]
    for batch, field in cases:
        with pytest.raises(InvalidRequestError) as e:
            backend.validate(batch)
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
        backend.generate(Batch(["x"], [1], 5, 1.0, 128, 128), on_step)
    assert seen == [(1, 5), (2, 5)]
