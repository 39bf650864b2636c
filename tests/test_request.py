"""The generation contract (snapgen.request): defaults, limits and the seed rule, stated once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from snapgen.request import MAX_SEED, GenerationRequest, InvalidRequestError, ModelCard, ResolvedRequest, expand_seeds

CARD = ModelCard(
    id="m", sizes=((128, 128), (64, 128)), default_steps=4, max_steps=50, guidance_scale=1.0, max_prompt_tokens=5
)


def count_words(texts: list[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def test_defaults_come_from_the_card():
    r = GenerationRequest("a red circle", seed=7).resolve(CARD)
    assert (r.steps, r.guidance_scale, r.height, r.width) == (4, 1.0, 128, 128)
    assert r.prompts == ("a red circle",) and r.seeds == (7,) and r.negative_prompts == ("",)


def test_seed_rule_is_prompt_major_and_never_wraps():
    r = GenerationRequest(["a", "b"], n=2, seed=10, negative_prompt=["x", "y"]).resolve(CARD)
    assert r.prompts == ("a", "a", "b", "b") and r.seeds == (10, 11, 12, 13)
    assert r.negative_prompts == ("x", "x", "y", "y")
    # The largest seed holds one image; with two the second would pass MAX_SEED: refused, not wrapped to 0.
    assert GenerationRequest("a", seed=MAX_SEED).resolve(CARD).seeds == (MAX_SEED,)
    with pytest.raises(InvalidRequestError) as e:
        GenerationRequest("a", n=2, seed=MAX_SEED)
    assert e.value.field == "seed" and str(MAX_SEED - 1) in e.value.message
    assert GenerationRequest("a", n=2, seed=MAX_SEED - 1).resolve(CARD).seeds == (MAX_SEED - 1, MAX_SEED)
    assert expand_seeds(0, 3) == (0, 1, 2)


def test_drawn_seeds_leave_room_for_every_image():
    request = GenerationRequest("a", n=8).with_seed()
    assert isinstance(request.seed, int) and request.seed + 7 <= MAX_SEED
    assert request.with_seed() is request


@pytest.mark.parametrize(
    ("kwargs", "field", "needle"),
    [
        (dict(prompt=""), "prompt", "empty"),
        (dict(prompt=["ok", " "]), "prompt", "prompt 1 is empty"),
        (dict(n=0), "n", ">= 1"),
        (dict(seed=-1), "seed", f"0 to {MAX_SEED}"),
        (dict(seed=MAX_SEED + 1), "seed", f"0 to {MAX_SEED}"),
        (dict(seed=True), "seed", "integer"),
        (dict(seed=[1, 2]), "seed", "2 seeds for 1 images"),
        (dict(steps=2.5), "steps", "integer"),
        (dict(steps=0), "steps", ">= 1"),
        (dict(guidance_scale=float("nan")), "guidance_scale", "finite"),
        (dict(guidance_scale=-1), "guidance_scale", ">= 0"),
        (dict(height=0), "height", "positive"),
        (dict(output_format="gif"), "output_format", "png, jpeg, webp"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt", "one per prompt"),
    ],
)
def test_model_free_checks_on_construction(kwargs, field, needle):
    with pytest.raises(InvalidRequestError) as e:
        GenerationRequest(**{"prompt": "ok", **kwargs})
    assert e.value.field == field and needle in e.value.message


@pytest.mark.parametrize(
    ("kwargs", "field", "needle"),
    [
        (dict(steps=51), "steps", "from 1 to 50"),
        (dict(width=256), "width", "allowed: 128x128, 128x64"),
        (dict(height=256, width=256), "size", "256x256"),
        (dict(height=100), "height", "multiple of 8"),
        (dict(prompt="one two three four five six"), "prompt", "6 tokens; this model reads at most 5"),
        (dict(negative_prompt="one two three four five six"), "negative_prompt", "at most 5"),
    ],
)
def test_model_checks_on_resolve(kwargs, field, needle):
    with pytest.raises(InvalidRequestError) as e:
        GenerationRequest(**{"prompt": "ok", "seed": 1, **kwargs}).resolve(CARD, count_words)
    assert e.value.field == field and needle in e.value.message


def test_edges_that_are_allowed():
    r = GenerationRequest("ok", seed=0, steps=50, height=64, width=128).resolve(CARD, count_words)
    assert (r.steps, r.height, r.width) == (50, 64, 128)


def test_serialised_once_and_back():
    request = GenerationRequest(["a", "b"], negative_prompt="c", n=2, seed=3, steps=4, guidance_scale=2.5)
    text = request.to_json()
    assert GenerationRequest.from_json(text) == request
    assert json.loads(text)["prompt"] == ["a", "b"]
    with pytest.raises(InvalidRequestError) as e:
        GenerationRequest.from_dict({"prompt": "a", "cfg_scale": 7})
    assert e.value.field == "cfg_scale"


def test_card_round_trip_and_from_a_model_directory(tiny_model):
    card = ModelCard.from_model_dir(tiny_model)
    assert card.sizes == ((128, 128),) and card.default_steps == 2 and card.max_prompt_tokens == 32
    assert ModelCard.from_dict({**card.to_dict(), "device": "cpu"}) == card


def test_batches_concat_and_split():
    a = GenerationRequest("a", n=2, seed=1).resolve(CARD)
    b = GenerationRequest("b", seed=9).resolve(CARD)
    both = ResolvedRequest.concat([a, b])
    assert both.prompts == ("a", "a", "b") and both.seeds == (1, 2, 9)
    assert [c.seeds for c in both.chunks(2)] == [(1, 2), (9,)]
    with pytest.raises(ValueError, match="same size"):
        ResolvedRequest.concat([a, GenerationRequest("c", seed=1, steps=3).resolve(CARD)])


def test_the_request_type_imports_without_torch():
    code = "import sys, snapgen.request; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
