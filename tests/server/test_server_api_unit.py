"""Small API behaviours in process (no model, no worker): CORS, sync wait limits, header parsing, ranges, and
single routers and dependencies on their own."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from fastapi import FastAPI
from fastapi.security import HTTPAuthorizationCredentials

from server.api import create_app, errors
from server.api.dependencies import ModelInfoCache, authenticate
from server.api.errors import APIError
from server.api.routes import generate, jobs, ops
from server.api.routes.generate import negotiate, new_job, parse_prefer
from server.api.schemas import GenerateRequest
from server.mobile import _parse_range
from server.queue import Job, MemoryJobQueue, QueueUnavailable
from server.security import ApiKeys, is_loopback, safe_name
from server.settings import Settings
from snapgen.request import MAX_SEED, GenerationRequest


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


@pytest.fixture
def app():
    settings = Settings(cors_origins=["https://app.example"], sync_timeout_s=0.2)
    return create_app(settings, queue=MemoryJobQueue(), start_worker=False)


def test_cors_allows_configured_origins_only(app):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,prefer"}
    ok = call(app, "OPTIONS", "/v1/generate", headers={"Origin": "https://app.example", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    other = call(app, "OPTIONS", "/v1/generate", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    simple = call(app, "GET", "/healthz", headers={"Origin": "https://app.example"})
    assert simple.headers["access-control-allow-origin"] == "https://app.example"


def test_a_sync_request_without_a_worker_turns_into_a_job(app):
    # No worker has described a model yet: the request is queued; the sync wait ends with 202.
    response = call(app, "POST", "/v1/generate", json={"prompt": "a red circle"})
    assert response.status_code == 202 and response.json()["status"] == "queued"
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    waited = call(app, "POST", "/v1/generate", json={"prompt": "x"}, headers={"Prefer": "wait=0"})
    assert waited.status_code == 202
    assert call(app, "GET", "/readyz").status_code == 503  # no model loaded here


def test_header_parsing():
    assert negotiate(None) == "json" and negotiate("*/*") == "json"
    assert negotiate("image/png") == "png" and negotiate("image/webp, application/json;q=0.5") == "webp"
    assert negotiate("application/json, image/png;q=0.9") == "json" and negotiate("text/html") == "json"
    assert negotiate("image/png;q=0, image/jpeg") == "jpeg"
    assert parse_prefer("respond-async, wait=10") == (True, 10.0)
    assert parse_prefer("wait=abc") == (False, None) and parse_prefer(None) == (False, None)


def test_ranges_names_keys_and_hosts():
    assert _parse_range("bytes=0-9", 100) == (0, 9)
    assert _parse_range("bytes=90-", 100) == (90, 99) and _parse_range("bytes=-5", 100) == (95, 99)
    assert _parse_range("bytes=50-500", 100) == (50, 99)
    assert _parse_range("bytes=100-", 100) == "unsatisfiable"
    assert _parse_range("bytes=0-1,5-6", 100) is None and _parse_range("items=0-1", 100) is None
    huge = "9" * 5000  # past int()'s digit limit: positions past the end are the end
    assert _parse_range(f"bytes=0-{huge}", 100) == (0, 99) and _parse_range(f"bytes=-{huge}", 100) == (0, 99)
    assert _parse_range(f"bytes={huge}-", 100) == "unsatisfiable"
    assert _parse_range(f"bytes={'0' * 50}7-8", 100) == (7, 8)
    assert safe_name("snapgen-ios-1.0.zip") and not safe_name("../x.zip") and not safe_name(".x.zip")
    assert not safe_name("a/b.zip") and not safe_name("a..zip")
    keys = ApiKeys(["k1", "k2"])
    assert keys.enabled and keys.lookup("k1") != keys.lookup("k2") and keys.lookup("k3") is None
    assert not ApiKeys([]).enabled
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.2") and not is_loopback("example.com")


def test_bundle_listing_reads_the_exporter_manifest(tmp_path):
    import json
    import zipfile

    from server.mobile import BundleStore

    manifest = {"format": "snapgen-coreml-bundle", "created": "2026-01-02T03:04:05+00:00", "model": {"version": "v7"}}
    with zipfile.ZipFile(tmp_path / "tiny-fp16.zip", "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
    (tmp_path / "plain-1.2.zip").write_bytes(b"not even a zip")
    (tmp_path / ".tiny-fp16.zip.abc.part").write_bytes(b"an export in progress")
    bundles = {b.name: b for b in BundleStore(tmp_path).list()}
    assert set(bundles) == {"tiny-fp16.zip", "plain-1.2.zip"}
    assert bundles["tiny-fp16.zip"].version == "v7" and bundles["tiny-fp16.zip"].created == manifest["created"]
    assert bundles["plain-1.2.zip"].version == "1.2" and bundles["plain-1.2.zip"].created.endswith("Z")


# -- the parts on their own: one router in a bare app, dependencies and helpers called directly -------------------
def bare_app(*routers, queue=None, keys=(), **settings) -> FastAPI:
    """A FastAPI app with only ``routers`` and the state they read (what create_app sets up)."""
    app = FastAPI()
    app.state.settings = Settings(**settings)
    app.state.queue = queue or MemoryJobQueue()
    app.state.keys = ApiKeys(list(keys))
    app.state.model_info = ModelInfoCache()
    app.state.worker = None
    errors.install(app)
    for router in routers:
        app.include_router(router)
    return app


def test_the_jobs_router_alone_keeps_jobs_private_to_their_key():
    queue = MemoryJobQueue()
    app = bare_app(jobs.router, queue=queue, keys=["k1", "k2"])
    job = Job(id=uuid.uuid4().hex, request=GenerationRequest("x", steps=2), owner=ApiKeys(["k1"]).lookup("k1"))
    asyncio.run(queue.submit(job, 10))
    mine = call(app, "GET", f"/v1/jobs/{job.id}", headers={"Authorization": "Bearer k1"})
    assert mine.status_code == 200 and mine.json()["status"] == "queued" and mine.json()["progress"]["steps"] == 2
    theirs = call(app, "GET", f"/v1/jobs/{job.id}", headers={"Authorization": "Bearer k2"})
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "not_found"
    assert call(app, "GET", f"/v1/jobs/{job.id}").status_code == 401
    allow = call(app, "OPTIONS", f"/v1/jobs/{job.id}").headers["allow"]
    assert set(allow.split(", ")) == {"GET", "DELETE"}  # both registrations of the path


class _FullQueue(MemoryJobQueue):
    async def ping(self):
        raise QueueUnavailable("Redis is out of memory (maxmemory reached)")

    async def get(self, job_id):
        raise QueueUnavailable("Redis is out of memory (maxmemory reached)")


def test_an_unavailable_queue_says_why():
    app = bare_app(ops.router, jobs.router, queue=_FullQueue())
    ready = call(app, "GET", "/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["queue"] == "Redis is out of memory (maxmemory reached)"
    job = call(app, "GET", f"/v1/jobs/{uuid.uuid4().hex}")
    assert job.status_code == 503 and job.headers["retry-after"] == "1"
    assert job.json()["error"]["code"] == "queue_unavailable" and "out of memory" in job.json()["error"]["message"]


def test_principal_called_directly():
    async def who(keys, token):
        credentials = None if token is None else HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)
        return authenticate(credentials, keys)

    assert asyncio.run(who(ApiKeys([]), None)) == "anonymous"
    assert asyncio.run(who(ApiKeys(["k1"]), "k1")) == ApiKeys(["k1"]).lookup("k1")
    for token, status in ((None, 401), ("nope", 403)):
        with pytest.raises(APIError) as refused:
            asyncio.run(who(ApiKeys(["k1"]), token))
        assert refused.value.status == status


def test_new_job_fills_in_the_model_defaults():
    info = {"id": "m", "sizes": [[128, 128]], "default_size": [128, 128], "default_steps": 2, "max_steps": 8,
            "guidance_scale": 1.5, "device": "cpu"}  # fmt: skip
    body = GenerateRequest(prompt="a red circle", steps=4.0, seed=7)
    job = new_job(body, "png", "anonymous", info)
    assert job.request == GenerationRequest("a red circle", seed=7, steps=4, guidance_scale=1.5, height=128,
                                            width=128, output_format="png")  # fmt: skip
    assert job.response_format == "b64_json" and len(job.id) == 32
    with pytest.raises(APIError) as too_many:
        new_job(GenerateRequest(prompt="x", steps=9), "json", "anonymous", info)
    assert too_many.value.field == "steps" and "from 1 to 8" in too_many.value.message
    unknown_model = new_job(GenerateRequest(prompt="x", n=3), "json", "anonymous", None).request
    assert unknown_model.steps is None and unknown_model.seed + 2 <= MAX_SEED  # the worker fills in the rest


def test_the_generate_router_alone_states_its_prompt_limit():
    app = bare_app(generate.router(max_prompt_chars=10))
    schema = app.openapi()["components"]["schemas"]["GenerateRequest"]["properties"]["prompt"]
    assert schema["maxLength"] == 10
    too_long = call(app, "POST", "/v1/generate", json={"prompt": "x" * 11})
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "prompt"
    accepted = call(app, "POST", "/v1/generate", json={"prompt": "x", "n": 2.0}, headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202 and accepted.headers["location"] == f"/v1/jobs/{accepted.json()['id']}"
