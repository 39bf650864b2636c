"""Small API behaviours in process (no model, no worker): CORS, sync wait limits, header parsing, ranges."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from server.api import create_app, negotiate, parse_prefer
from server.mobile import _parse_range
from server.queue import MemoryJobQueue
from server.security import ApiKeys, is_loopback, safe_name
from server.settings import Settings


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
