"""HTTP edge cases against the embedded server under uvicorn: bounded metrics labels, huge numbers in
headers, and an OpenAPI document that says what the server does."""

from __future__ import annotations

import hashlib
import http.client
import uuid

import pytest
from server_harness import metric_values

JSON = {"Content-Type": "application/json"}
ASYNC = {"Prefer": "respond-async"}
HUGE = "9" * 5000  # more digits than Python's int() converts
KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}


@pytest.fixture(scope="module")
def client(embedded):
    with embedded.client() as c:
        yield c


def request_labels(text: str) -> list[dict[str, str]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [s.labels for f in text_string_to_metric_families(text) if f.name == "snapgen_requests" for s in f.samples]


def test_metrics_labels_stay_bounded(client):
    made_up = [f"X{uuid.uuid4().hex[:10].upper()}" for _ in range(60)]
    for method in made_up:
        assert client.request(method, "/healthz").status_code == 405
        assert client.get(f"/no/such/{uuid.uuid4().hex}").status_code == 404
    text = client.get("/metrics").text
    labels = request_labels(text)
    assert {lab["method"] for lab in labels} <= KNOWN_METHODS | {"other"}
    assert not any("/no/such/" in lab["route"] for lab in labels)  # route templates, never raw paths
    values = metric_values(text)
    assert values['snapgen_requests_total{method="other",route="/healthz",status="405"}'] >= len(made_up)
    assert values['snapgen_requests_total{method="GET",route="unmatched",status="404"}'] >= len(made_up)


def test_huge_numbers_in_range_headers_keep_the_connection(embedded, mobile_dir):
    data = (mobile_dir / "snapgen-ios.zip").read_bytes()
    path = "/v1/models/mobile/snapgen-ios.zip"
    conn = http.client.HTTPConnection("127.0.0.1", embedded.port, timeout=60)
    try:
        expected = {
            f"bytes=0-{HUGE}": (206, data),  # a last position past the end means the end (RFC 9110 §14.1.2)
            f"bytes=-{HUGE}": (206, data),  # a suffix longer than the file is the whole file
            f"bytes={HUGE}-": (416, b""),  # a first position past the end is unsatisfiable
            f"bytes={HUGE}-{HUGE}": (416, b""),
            f"bytes={'0' * 80}10-19": (206, data[10:20]),
        }
        for value, (status, body) in expected.items():
            conn.request("GET", path, headers={"Range": value})
            sock = conn.sock
            response = conn.getresponse()
            assert (response.status, response.read()) == (status, body), value[:40]
            assert not response.will_close
            conn.request("GET", "/healthz")
            again = conn.getresponse()
            assert again.status == 200 and again.read() and conn.sock is sock  # the same keep-alive connection
    finally:
        conn.close()


def test_no_header_makes_a_500(client):
    cases = [
        ("GET", "/v1/models/mobile/snapgen-ios.zip", {"Range": f"bytes=0-{HUGE}"}),
        ("GET", "/v1/models/mobile/snapgen-ios.zip", {"Range": f"bytes=-{HUGE}", "If-Range": f'"{HUGE}"'}),
        ("GET", "/v1/models/mobile/snapgen-ios.zip", {"If-None-Match": f'W/"{HUGE}", "{HUGE}"'}),
        ("POST", "/v1/generate", {"Prefer": f"respond-async, wait={HUGE}", **JSON}),
        ("POST", "/v1/generate", {"Accept": f"image/png;q={HUGE}, application/json;q=0.{HUGE}", **ASYNC, **JSON}),
        ("POST", "/v1/generate", {"Idempotency-Key": HUGE, **ASYNC, **JSON}),
        ("GET", "/v1/models", {"Authorization": f"Bearer {HUGE}"}),
    ]
    for method, path, headers in cases:
        body = b'{"prompt": "a red circle", "steps": 1}' if method == "POST" else None
        response = client.request(method, path, headers=headers, content=body)
        assert response.status_code < 500, (path, headers, response.text)
        if response.status_code == 202:
            client.delete(f"/v1/jobs/{response.json()['id']}")


def test_openapi_says_what_the_server_does(client, mobile_dir):
    spec = client.get("/openapi.json").json()
    # No keys configured: no authentication declared (with keys: test_server_schemathesis).
    assert "securitySchemes" not in spec.get("components", {})
    assert not [op for path in spec["paths"].values() for op in path.values() if "security" in op]
    # Bodies that are not JSON at all (not UTF-8, nested too deep, a 5000-digit number): 400, documented.
    assert "400" in spec["paths"]["/v1/generate"]["post"]["responses"]
    for raw in (b'{"prompt": "\xff"}', b"[" * 5000 + b"]" * 5000, b'{"prompt": "x", "seed": ' + HUGE.encode() + b"}"):
        bad = client.post("/v1/generate", content=raw, headers=JSON)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    # A body that says it is not JSON: 415, even when its type's name contains "json".
    for content_type in ("text/notjson", "application/jsonx", "text/plain"):
        other = client.post("/v1/generate", content=b'{"prompt": "x"}', headers={"Content-Type": content_type})
        assert other.status_code == 415 and other.json()["error"]["code"] == "unsupported_media_type"
    # Allow names every method served at the path, whichever registration matched.
    jobs = client.options(f"/v1/jobs/{uuid.uuid4().hex}")
    assert jobs.status_code == 405 and set(jobs.headers["allow"].split(", ")) == {"GET", "DELETE"}
    assert set(client.options("/v1/models/mobile/x.zip").headers["allow"].split(", ")) == {"GET", "HEAD"}
    # Server-sent events: each event's name and data schema; errors are JSON.
    events = spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]
    item = events["200"]["content"]["text/event-stream"]["itemSchema"]
    names = {branch["properties"]["event"]["const"] for branch in item["oneOf"]}
    assert names == {"status", "progress", "result", "error", "canceled"}
    assert set(events["404"]["content"]) == {"application/json"}
    # The weak form of our ETag matches If-None-Match (weak comparison, RFC 9110 §13.1.2).
    digest = hashlib.sha256((mobile_dir / "snapgen-ios.zip").read_bytes()).hexdigest()
    url = "/v1/models/mobile/snapgen-ios.zip"
    assert client.get(url, headers={"If-None-Match": f'W/"{digest}"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": f'"other", W/"{digest}"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": 'W/"other"'}).status_code == 200
    # JSON Schema counts 4.0 as an integer: so does the API; 4.5 is still refused.
    accepted = client.post("/v1/generate", json={"prompt": "x", "steps": 4.0, "n": 1.0, "seed": 3.0}, headers=ASYNC)
    assert accepted.status_code == 202, accepted.text
    job = client.get(f"/v1/jobs/{accepted.json()['id']}").json()
    assert job["request"]["steps"] == 4 and job["request"]["seed"] == 3 and isinstance(job["request"]["steps"], int)
    client.delete(f"/v1/jobs/{job['id']}")
    refused = client.post("/v1/generate", json={"prompt": "x", "steps": 4.5}, headers=ASYNC)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "steps"
    assert client.post("/v1/generate", json={"prompt": "x", "n": True}, headers=ASYNC).status_code == 422
