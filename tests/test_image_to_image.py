"""Image-to-image (SDEdit on the rectified flow) through the pipeline, on the default model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snapgen.flow import interpolate
from snapgen.generation import image_to_image_start
from snapgen.model_dir import load_pipeline
from snapgen.request import InvalidRequestError
from training.shapesbench.recolour import recolour_check
from training.shapesbench.render import render_scene, scene_for_prompt


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()  # the default model: its autoencoder/ encodes input images


@pytest.fixture(scope="module")
def red_circle():
    return render_scene(scene_for_prompt(np.random.default_rng(0), "a red circle"))


def test_the_start_is_the_schedule_time_nearest_strength():
    times = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert [image_to_image_start(times, s) for s in (1.0, 0.8, 0.6, 0.3, 0.1, 0.0)] == [0, 1, 2, 3, 4, 4]


def test_strength_one_ignores_the_image_and_zero_keeps_it(pipe, red_circle):
    text_only = pipe("a blue square", seeds=3, output_type="np").images[0]
    ignored = pipe("a blue square", seeds=3, image=red_circle, strength=1.0, output_type="np").images[0]
    # At t = 1 the start is the seed's noise, bit for bit; the pictures agree up to one grey level, since in
    # a long test process CPU kernels may sum in another order from one call to the next.
    noise = torch.randn(1, 4, 16, 16)
    assert torch.equal(interpolate(torch.randn(1, 4, 16, 16), noise, 1.0), noise)
    assert np.abs(ignored.astype(int) - text_only.astype(int)).max() <= 1
    kept = pipe("a blue square", seeds=3, image=red_circle, strength=0.0, output_type="np").images[0]
    source = np.asarray(red_circle).astype(int)
    assert np.abs(kept.astype(int) - source).mean() < 8  # the autoencoder's round trip, no sampling step
    assert np.abs(text_only.astype(int) - source).mean() > 3 * np.abs(kept.astype(int) - source).mean()


def test_recolouring_by_prompt_works_more_often_than_not(pipe):
    middle = recolour_check(pipe, 0.5)
    assert middle["recoloured"] > 0.5 and middle["layout_iou"] > 0.6, middle
    assert recolour_check(pipe, 1.0)["layout_iou"] < 0.3  # at 1 the input is ignored


def test_images_per_prompt_and_errors(pipe, red_circle):
    out = pipe(["a blue circle", "a green circle"], seeds=1, image=[red_circle, red_circle], strength=0.5)
    assert len(out.images) == 2
    cases = [
        (dict(image=red_circle), "strength"),
        (dict(strength=0.5), "image"),
        (dict(image=red_circle.resize((64, 64)), strength=0.5), "size"),  # a size the model does not make
        (dict(image=red_circle, strength=0.5, width=128, height=128, prompts=["a", "b", "c"],
              seeds=[1, 2, 3]), None),  # fmt: skip
        (dict(image=red_circle, strength=1.5), "strength"),
    ]
    for kwargs, field in cases:
        kwargs = {"prompts": "a blue circle", "seeds": 1, **kwargs}
        if field is None:
            assert len(pipe(**kwargs).images) == 3
            continue
        with pytest.raises(InvalidRequestError) as e:
            pipe(**kwargs)
        assert e.value.field == field, e.value


def test_a_model_without_an_encoder_says_so(tiny_model, red_circle):
    tiny = load_pipeline(tiny_model)  # a random tiny decoder and no autoencoder/
    with pytest.raises(InvalidRequestError, match="cannot take an input image") as e:
        tiny("a blue circle", seeds=1, image=red_circle, strength=0.5)
    assert e.value.field == "image"
