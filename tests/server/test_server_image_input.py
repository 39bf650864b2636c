"""Image-to-image and step previews through the server: an input image travels with the job to the worker,
and a job that asks for previews gets a picture of each step on its event stream."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from server_harness import decode, sse_events

from snapgen.image_files import fit_input_image
from snapgen.model_dir import load_pipeline


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def red_circle() -> np.ndarray:
    y, x = np.mgrid[:128, :128]
    image = np.full((128, 128, 3), 235, np.uint8)
    image[(x - 64) ** 2 + (y - 64) ** 2 < 40**2] = (220, 30, 30)
    return image


def test_an_input_image_makes_what_the_pipeline_makes(embedded_default, red_circle):
    body = {
        "prompt": "a blue circle",
        "seed": 5,
        "strength": 0.5,
        "image": base64.b64encode(png_bytes(red_circle)).decode(),
    }
    with embedded_default.client() as client:
        response = client.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        served = np.asarray(decode(response.json()["data"][0]["b64_json"]).convert("RGB"))
        echoed = client.get(f"/v1/jobs/{response.json()['id']}").json()["request"]
    pipe = load_pipeline()
    expected = pipe("a blue circle", seeds=5, image=red_circle, strength=0.5, output_type="np").images[0]
    # Up to one grey level: the server runs one torch thread here, and CPU kernels may sum in another order.
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1
    assert echoed["strength"] == 0.5 and "image" not in echoed  # the echo says how, not the upload itself


def test_a_data_url_and_the_default_strength(embedded_default, red_circle):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(red_circle)).decode()
    with embedded_default.client() as client:
        response = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 1, "image": url})
        assert response.status_code == 200, response.text
        job = client.get(f"/v1/jobs/{response.json()['id']}").json()
    assert job["request"]["strength"] == 0.6


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"image": "not base64!"}, "image", "base64"),
        ({"image": base64.b64encode(b"GIF89a not really").decode()}, "image", "PNG, JPEG or WebP"),
        ({"image": "data:text/plain;base64,aGk="}, "image", "data:image/png"),
        ({"strength": 0.5}, "strength", "send an image"),
    ],
)
def test_bad_input_images_are_refused_by_name(embedded_default, body, field, words):
    with embedded_default.client() as client:
        response = client.post("/v1/generate", json={"prompt": "x", **body})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and words in error["message"]


def test_a_model_without_an_encoder_refuses_an_image(embedded, red_circle):
    with embedded.client() as client:
        client.get("/v1/models")  # the API knows the model once a worker described it
        body = {"prompt": "x", "image": base64.b64encode(png_bytes(red_circle)).decode()}
        response = client.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "image"
    assert "encoder" in response.json()["error"]["message"]


def test_an_image_is_fit_to_the_requested_size():
    wide = np.zeros((60, 200, 3), np.uint8)
    wide[:, 90:110] = 255  # a white band, a third of the centre square's width
    fitted = fit_input_image(png_bytes(wide), 32, 32)
    assert fitted.shape == (32, 32, 3)
    # Cut to the centre square, then resized: the band is a third as wide. Squeezed, it would be 3 px.
    assert fitted[:, 13:19].mean() > 200 and fitted[:, :4].mean() < 40 and fitted[:, -4:].mean() < 40


def test_previews_arrive_with_progress(embedded_default):
    with embedded_default.client() as client:
        response = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 2, "steps": 4, "preview": True},
                               headers={"Prefer": "respond-async"})  # fmt: skip
        assert response.status_code == 202, response.text
        events = sse_events(client, f"/v1/jobs/{response.json()['id']}/events")
    previews = [data["preview"] for name, data in events if name == "progress" and "preview" in data]
    assert previews, events
    prefix = "data:image/jpeg;base64,"
    assert all(p.startswith(prefix) for p in previews)
    picture = Image.open(io.BytesIO(base64.b64decode(previews[-1][len(prefix) :])))
    assert picture.format == "JPEG" and max(picture.size) <= 256
    assert np.asarray(picture).std() > 1  # a picture, not a blank
    assert events[-1][0] == "result"


def test_no_previews_unless_asked(embedded_default):
    with embedded_default.client() as client:
        response = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 2, "steps": 4},
                               headers={"Prefer": "respond-async"})  # fmt: skip
        events = sse_events(client, f"/v1/jobs/{response.json()['id']}/events")
    assert not any("preview" in data for name, data in events if name == "progress")
