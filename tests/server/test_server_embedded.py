"""The embedded default (`snapgen serve --model DIR`): the real app under uvicorn, httpx as the client."""

from __future__ import annotations

import base64
import hashlib
import io
import uuid

import httpx
import pytest
from PIL import Image
from server_harness import assert_same_picture, decode, finished, metric_values, sse_events, wait_job

JSON = {"Content-Type": "application/json"}
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture(scope="module")
def client(embedded):
    with embedded.client() as c:
        yield c


def generate(client, **body) -> httpx.Response:
    body.setdefault("prompt", "a red circle to the left of a blue square")
    body.setdefault("steps", 2)
    return client.post("/v1/generate", json=body)


def submit(client, **body) -> str:
    body.setdefault("prompt", "a red circle")
    response = client.post("/v1/generate", json=body, headers=ASYNC)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def blocker(client, steps=50) -> str:
    """A job that keeps the single embedded worker busy until it is canceled (4 images x 50 steps)."""
    job_id = submit(client, prompt="keep the worker busy", steps=steps, n=4)
    wait_job(client, job_id, lambda b: b["status"] == "running" and b["progress"]["step"] >= 1, "the blocker to run")
    return job_id


def test_health_ready_and_model_card(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"queue": "ok", "model": "ok"}
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == "tiny" and card["sizes"] == [[128, 128]] and card["default_steps"] == 2
    assert card["max_steps"] == 50 and card["max_prompt_tokens"] == 32 and card["workers"] == 1
    assert card["output_formats"] == ["png", "jpeg", "webp"] and card["max_n"] == 8
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/models/mobile"} <= set(spec["paths"])


def test_sync_generate_returns_seeded_deterministic_images(client):
    response = generate(client, seed=7, n=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny" and len(body["id"]) == 32 and body["created"] > 0
    assert [d["seed"] for d in body["data"]] == [7, 8]
    images = [decode(d["b64_json"]) for d in body["data"]]
    assert all(im.format == "PNG" and im.size == (128, 128) for im in images)
    assert set(body["timings"]) == {"queue_s", "text_s", "unet_s", "decode_s", "total_s"}
    assert body["timings"]["total_s"] >= body["timings"]["unet_s"] > 0
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    # The same request again: the same bytes.
    repeat = generate(client, seed=7, n=2).json()
    assert [d["b64_json"] for d in repeat["data"]] == [d["b64_json"] for d in body["data"]]
    # Image 1 of the batch is image 0 of seed 8, and not seed 7's picture.
    again = generate(client, seed=8).json()
    assert_same_picture(again["data"][0]["b64_json"], body["data"][1]["b64_json"])
    with pytest.raises(AssertionError):
        assert_same_picture(again["data"][0]["b64_json"], body["data"][0]["b64_json"])
    assert again["id"] not in (body["id"], repeat["id"])
    # No seed: a random one is drawn and returned.
    drawn = generate(client).json()["data"][0]["seed"]
    assert 0 <= drawn < 2**32


def test_accept_image_returns_the_raw_image(client):
    response = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 7}, headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n") and response.headers["x-seed"] == "7"
    reference = generate(client, prompt="a red circle", seed=7).json()["data"][0]["b64_json"]
    assert base64.b64decode(reference) == response.content
    jpeg = client.post("/v1/generate", json={"prompt": "x", "seed": 1}, headers={"Accept": "image/jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    several = client.post("/v1/generate", json={"prompt": "x", "n": 2}, headers={"Accept": "image/png"})
    assert several.status_code == 422 and several.json()["error"]["field"] == "n"


def test_url_results(client):
    body = generate(client, n=2, response_format="url", output_format="webp", seed=11).json()
    urls = [d["url"] for d in body["data"]]
    assert urls == [f"{client.base_url}/v1/images/{body['id']}/{i}.webp" for i in range(2)]
    for url in urls:
        image = client.get(url)
        assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
        assert Image.open(io.BytesIO(image.content)).format == "WEBP"
    assert client.get(f"/v1/images/{body['id']}/2.webp").status_code == 404
    assert client.get(f"/v1/images/{body['id']}/0.png").status_code == 404
    assert client.get(f"/v1/images/{uuid.uuid4().hex}/0.webp").json()["error"]["code"] == "not_found"


def test_async_job_and_polling(client):
    response = client.post("/v1/generate", json={"prompt": "a blue square", "seed": 5, "steps": 3}, headers=ASYNC)
    assert response.status_code == 202
    accepted = response.json()
    assert response.headers["location"] == f"/v1/jobs/{accepted['id']}"
    assert response.headers["preference-applied"] == "respond-async"
    assert accepted["status"] in ("queued", "running", "succeeded")
    done = wait_job(client, accepted["id"], finished, "the async job")
    assert done["status"] == "succeeded" and done["progress"] == {"step": 3, "steps": 3}
    assert done["request"]["seed"] == 5 and done["request"]["steps"] == 3 and done["error"] is None
    assert done["result"]["data"][0]["seed"] == 5 and decode(done["result"]["data"][0]["b64_json"]).size == (128, 128)


def test_server_sent_events(client):
    # The job waits behind a blocker until the stream is subscribed, so no progress can be missed.
    running = blocker(client)
    job_id = submit(client, prompt="a green triangle", steps=12)
    events = sse_events(
        client, f"/v1/jobs/{job_id}/events", after_first=lambda: client.delete(f"/v1/jobs/{running}").raise_for_status()
    )
    names = [name for name, _ in events]
    assert names[0] == "status" and events[0][1]["status"] == "queued"
    assert names[-1] == "result" and names.count("status") >= 2
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps) and steps and steps[-1] <= 12
    final = events[-1][1]
    assert final["status"] == "succeeded" and final["result"]["data"][0]["b64_json"]
    # A finished job's stream is just its final state.
    assert [name for name, _ in sse_events(client, f"/v1/jobs/{job_id}/events")] == ["status", "result"]
    assert client.get(f"/v1/jobs/{uuid.uuid4().hex}/events").status_code == 404


def test_cancel_running_and_queued_jobs(client):
    running = blocker(client)
    queued = submit(client, prompt="never runs", steps=3)
    status = client.get(f"/v1/jobs/{queued}").json()
    assert status["status"] == "queued" and status["queue_position"] == 0
    canceled = client.delete(f"/v1/jobs/{queued}")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    stopping = client.delete(f"/v1/jobs/{running}").json()
    assert stopping["cancel_requested"] is True
    stopped = wait_job(client, running, finished, "the running job to stop")
    assert stopped["status"] == "canceled" and stopped["progress"]["step"] < 50
    assert stopped["error"]["code"] == "canceled" and stopped["result"] is None
    # The queued one never ran, even after the worker became free.
    assert generate(client).status_code == 200
    never = client.get(f"/v1/jobs/{queued}").json()
    assert never["status"] == "canceled" and never["progress"]["step"] == 0
    assert client.delete(f"/v1/jobs/{uuid.uuid4().hex}").status_code == 404


def test_idempotency_key(client):
    key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    body = {"prompt": "idempotent circle", "steps": 2}
    first = client.post("/v1/generate", json=body, headers={**ASYNC, **key})
    second = client.post("/v1/generate", json=body, headers={**ASYNC, **key})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    conflict = client.post("/v1/generate", json={**body, "steps": 3}, headers={**ASYNC, **key})
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    # Synchronous retries get the same job and the same (randomly seeded) images.
    sync_key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    a = client.post("/v1/generate", json=body, headers=sync_key).json()
    b = client.post("/v1/generate", json=body, headers=sync_key).json()
    assert a["id"] == b["id"] and a["data"] == b["data"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "steps": 51}, "steps"),
        ({"prompt": "x", "n": 9}, "n"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**32}, "seed"),
        ({"prompt": "x", "width": 256}, "width"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x", "cfg_scale": 7}, "cfg_scale"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({}, "prompt"),
        ({"prompt": " ".join(["word"] * 60)}, "prompt"),  # 60 tokens; the model reads 32 (checked by the worker)
    ],
)
def test_invalid_input_is_422_naming_the_field(client, body, field):
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field and error["message"]


def test_error_format_for_other_failures(client):
    # /v1/generate may carry an input image: its limit is the body's plus the image's (64 KiB here), in base64.
    big = client.post("/v1/generate", json={"prompt": "x" * 160_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    streamed = client.post("/v1/generate", content=(b"x" * 1024 for _ in range(160)), headers=JSON)  # chunked
    assert streamed.status_code == 413
    other = client.post("/v1/jobs/x", content=b"x" * 70_000)  # the other routes: SNAPGEN_MAX_BODY_BYTES
    assert other.status_code == 413
    long_prompt = client.post("/v1/generate", json={"prompt": "x" * 2001})
    assert long_prompt.status_code == 422 and long_prompt.json()["error"]["field"] == "prompt"
    broken = client.post("/v1/generate", content=b"{not json", headers=JSON)
    assert broken.status_code == 422 and broken.json()["error"]["field"] == "body"
    form = client.post(
        "/v1/generate", content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    assert client.get("/nope").json() == {"error": {"code": "not_found", "message": "no such route: GET /nope"}}
    assert client.put("/v1/generate").json()["error"]["code"] == "method_not_allowed"
    assert client.get("/v1/jobs/../../etc/passwd").status_code == 404
    assert client.get("/v1/jobs/not-a-job").json()["error"]["code"] == "not_found"


def test_auth_is_off_on_loopback_without_keys(client):
    assert generate(client, seed=1).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_backpressure_429_with_retry_after(client):
    running = blocker(client)
    queued = [submit(client, prompt=f"waiting {i}", steps=3) for i in range(4)]  # SNAPGEN_MAX_QUEUE_DEPTH=4
    full = client.post("/v1/generate", json={"prompt": "one too many"}, headers=ASYNC)
    assert full.status_code == 429, full.text
    assert full.json()["error"]["code"] == "queue_full" and int(full.headers["retry-after"]) >= 1
    sync_full = client.post("/v1/generate", json={"prompt": "one too many"})
    assert sync_full.status_code == 429
    for job_id in [*queued, running]:
        client.delete(f"/v1/jobs/{job_id}")
    wait_job(client, running, finished, "the blocker to stop")
    assert client.post("/v1/generate", json={"prompt": "room again", "steps": 1}).status_code == 200


def test_metrics_follow_the_work(client):
    before = metric_values(client.get("/metrics").text)
    running = blocker(client, steps=50)
    batched = [submit(client, prompt=f"batched {i}", steps=2, n=2) for i in range(3)]  # compatible: one batch
    mid = metric_values(client.get("/metrics").text)
    assert mid["snapgen_queue_depth"] == 3 and mid["snapgen_jobs_in_flight"] == 1
    client.delete(f"/v1/jobs/{running}")
    for job_id in batched:
        assert wait_job(client, job_id, finished, "a batched job")["status"] == "succeeded"
    after = metric_values(client.get("/metrics").text)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta("snapgen_images_generated_total") == 6
    assert delta("snapgen_batch_size_count") == 1 and delta("snapgen_batch_size_sum") == 6  # 3 jobs x 2 images
    assert delta('snapgen_jobs_finished_total{status="succeeded"}') == 3
    assert delta('snapgen_jobs_finished_total{status="canceled"}') == 1
    assert delta('snapgen_requests_total{method="POST",route="/v1/generate",status="202"}') == 4
    assert delta('snapgen_stage_seconds_count{stage="unet"}') == 1
    assert delta("snapgen_queue_wait_seconds_count") == 3 and delta("snapgen_e2e_latency_seconds_count") == 3
    assert after["snapgen_queue_depth"] == 0 and after["snapgen_workers"] == 1 and after["snapgen_queue_up"] == 1
    assert 'snapgen_worker_heartbeat_timestamp_seconds{worker="embedded"}' in after


def test_mobile_bundles(client, mobile_dir):
    listing = client.get("/v1/models/mobile").json()["data"]
    assert [b["name"] for b in listing] == ["snapgen-ios.zip"]  # not notes.txt, not ../secret.zip
    [bundle] = listing
    data = (mobile_dir / "snapgen-ios.zip").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert bundle["version"] == "0.1.0" and bundle["size"] == len(data) and bundle["sha256"] == digest
    assert bundle["created"] and bundle["url"] == f"{client.base_url}/v1/models/mobile/snapgen-ios.zip"
    full = client.get(bundle["url"])
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{digest}"' and full.headers["x-content-sha256"] == digest
    assert full.headers["accept-ranges"] == "bytes" and full.headers["content-type"] == "application/zip"
    part = client.get(bundle["url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = client.get(bundle["url"], headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    resume = client.get(bundle["url"], headers={"Range": f"bytes={len(data) - 5}-", "If-Range": f'"{digest}"'})
    assert resume.content == data[-5:]
    stale = client.get(bundle["url"], headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == data
    assert client.get(bundle["url"], headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    assert client.get(bundle["url"], headers={"If-None-Match": f'"{digest}"'}).status_code == 304
    head = client.head(bundle["url"])
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data)) and not head.content
    for name in ("secret.zip", "..%2Fsecret.zip", "notes.txt", ".hidden.zip", "nothing.zip"):
        response = client.get(f"/v1/models/mobile/{name}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    raw = httpx.get(f"{client.base_url}/v1/models/mobile/../../secret.zip")  # normalised by the client
    assert raw.status_code == 404
