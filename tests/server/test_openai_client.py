"""The OpenAI-compatible Images API, driven by OpenAI's own Python client against `snapgen serve` under uvicorn.

One server for the module: the default model (it has an encoder, so edits run) with an API key, so the
key checks are real too.
"""

from __future__ import annotations

import base64
import io
import signal
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from server_harness import JOB_TIMEOUT, Proc, Server, clean_env, free_port, snapgen

from training.shapesbench.render import render_scene, scene_for_prompt

KEY = "openai-client-key-0123456789"


@pytest.fixture(scope="module")
def server(log_dir) -> Iterator[Server]:
    port = free_port()
    env = clean_env(SNAPGEN_API_KEYS=KEY, SNAPGEN_TORCH_THREADS="1", SNAPGEN_DRAIN_TIMEOUT_S="2")
    proc = Proc("openai", snapgen("serve", "--port", str(port)), env, log_dir).start()  # the default model
    try:
        yield Server(proc, port).wait_ready()
    finally:
        proc.stop(signal.SIGTERM, timeout=30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=JOB_TIMEOUT)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    [model] = client.models.list().data
    return model.id


@pytest.fixture(scope="module")
def red_circle(tmp_path_factory) -> Image.Image:
    return render_scene(scene_for_prompt(np.random.default_rng(0), "a red circle"))


def picture(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_file(image: Image.Image) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return ("input.png", buffer.getvalue(), "image/png")


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b.convert("RGB"), dtype=int)).mean())


def test_generate_answers_a_png_of_the_size_asked_with_its_seed(client, model_id):
    raw = client.images.with_raw_response.generate(
        model=model_id,
        prompt="a red circle to the left of a blue square",
        size="128x128",
        response_format="b64_json",
        quality="high",  # accepted, ignored
        style="natural",
        user="user-1",
        extra_body={"seed": 11},
    )
    result = raw.parse()
    assert raw.headers["x-seeds"] == "11" and raw.headers["x-job-id"] == result.model_extra["id"]
    assert (result.size, result.output_format, result.background) == ("128x128", "png", "opaque")
    [image] = result.data
    assert image.model_extra["seed"] == 11 and image.url is None
    decoded = picture(image.b64_json)
    assert decoded.format == "PNG" and decoded.size == (128, 128)
    assert np.asarray(decoded.convert("L")).std() > 5  # a picture, not a blank


def test_n_images_take_seed_and_seed_plus_one_and_the_extensions_reach_the_job(client, server):
    raw = client.images.with_raw_response.generate(
        prompt="a green triangle", n=2, extra_body={"seed": 40, "steps": 2, "guidance_scale": 1.0}
    )
    result = raw.parse()
    assert [image.model_extra["seed"] for image in result.data] == [40, 41]
    assert raw.headers["x-seeds"] == "40,41"
    first, second = (base64.b64decode(image.b64_json) for image in result.data)
    assert first != second
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as http:
        job = http.get(f"/v1/jobs/{raw.headers['x-job-id']}").json()
    assert job["request"]["steps"] == 2 and job["request"]["n"] == 2 and job["request"]["seed"] == 40


def test_the_same_seed_gives_the_same_bytes_inline_or_by_url(client, server):
    ask = dict(prompt="a yellow square above a red circle", extra_body={"seed": 7})
    inline = base64.b64decode(client.images.generate(**ask).data[0].b64_json)
    again = base64.b64decode(client.images.generate(**ask, response_format="b64_json").data[0].b64_json)
    assert inline == again
    [linked] = client.images.generate(**ask, response_format="url").data
    assert linked.b64_json is None and linked.url.startswith(server.url)
    downloaded = httpx.get(linked.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    assert downloaded.content == inline


def test_a_size_the_model_does_not_make_is_a_bad_request_naming_the_sizes(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a red circle", size="1024x1024")
    error = e.value.body
    assert error["param"] == "size" and error["type"] == "invalid_request_error"
    assert "size" in error["message"] and "128x128" in error["message"] and "auto" in error["message"]


def test_unknown_model_field_and_refused_values(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="a red circle")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a red circle", extra_body={"cfg_scale": 3})
    assert e.value.body["param"] == "cfg_scale" and e.value.body["code"] == "unknown_parameter"
    assert "guidance_scale" in e.value.body["message"]  # the allowed fields are listed
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a red circle", background="transparent")
    assert e.value.body["param"] == "background" and "opaque" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a red circle", n=9)
    assert e.value.body["param"] == "n" and "1 to 8" in e.value.body["message"]


def test_a_wrong_key_is_an_authentication_error(server):
    wrong = openai.OpenAI(api_key="not-a-key", base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.images.generate(prompt="a red circle")
    assert e.value.body["code"] == "invalid_api_key" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.retrieve("snapgen-shapes")


def test_models_list_and_retrieve(client, model_id):
    [listed] = client.models.list().data
    retrieved = client.models.retrieve(model_id)
    for model in (listed, retrieved):
        assert (model.id, model.object, model.owned_by) == (model_id, "model", "snapgen")
        assert model.created > 1_600_000_000
        assert model.model_extra["sizes"] == [[128, 128]] and model.model_extra["image_input"] is True
    assert retrieved.created == listed.created
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_edit_runs_image_to_image(client, red_circle):
    prompt, seed = "a blue circle", 5
    edited = client.images.edit(
        image=png_file(red_circle), prompt=prompt, n=2, extra_body={"strength": 0.5, "seed": seed}
    )
    image, second = edited.data
    assert [image.model_extra["seed"], second.model_extra["seed"]] == [seed, seed + 1] and edited.size == "128x128"
    result = picture(image.b64_json)
    assert result.format == "PNG" and result.size == (128, 128)
    text_only = picture(client.images.generate(prompt=prompt, extra_body={"seed": seed}).data[0].b64_json)
    # Half way from the input: its layout stays, where the prompt alone draws the circle elsewhere.
    assert mean_difference(result, red_circle) < mean_difference(text_only, red_circle)


def test_edit_refuses_a_mask_and_a_file_that_is_not_an_image(client, red_circle):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=png_file(red_circle), mask=png_file(red_circle), prompt="a blue circle")
    assert e.value.body["param"] == "mask" and "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("notes.png", b"not a picture", "image/png"), prompt="a blue circle")
    assert e.value.body["param"] == "image"


def test_the_envelope_follows_the_route(server):
    """OpenAI's envelope on the OpenAI routes, ours everywhere else; a 413 before routing too."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with server.client() as http:
        too_big = http.post("/v1/images/generations", headers=headers, json={"prompt": "x" * 100_000})
        assert too_big.status_code == 413
        assert too_big.json()["error"]["type"] == "invalid_request_error"
        assert too_big.json()["error"]["code"] == "payload_too_large"
        ours = http.post("/v1/generate", headers={"Authorization": "Bearer wrong"}, json={"prompt": "x"})
        assert ours.status_code == 403 and ours.json() == {
            "error": {"code": "forbidden", "message": "this API key is not valid for this server"}
        }
        openai_style = http.post("/v1/images/generations", json={"prompt": "x"})  # no key at all
        assert openai_style.status_code == 401 and openai_style.headers["www-authenticate"] == "Bearer"
        assert set(openai_style.json()["error"]) == {"message", "type", "param", "code"}
        bundles = http.get("/v1/models/mobile", headers=headers)  # ours, not a model named "mobile"
        assert bundles.status_code == 200 and bundles.json()["object"] == "list"
