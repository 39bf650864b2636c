"""/docs (Swagger UI) and /redoc (ReDoc) render in a real Chromium with every request off this machine blocked.

Their scripts, stylesheet and favicon come from the server itself (server/api/docs_pages.py, assets of the
fastapi-offline package), so the pages work on a machine without internet access.
"""

from __future__ import annotations

import re

import httpx
import pytest
from browser_harness import assert_not_blank, is_local, screenshot

EXTERNAL_URL = re.compile(r"""(?:https?:)?//[^\s"'<>)]+""")
# ReDoc's menu footer always asks cdn.redoc.ly for its logo; the pages' Content-Security-Policy stops that in the
# browser (no request is made) and ReDoc hides the image. That refusal is the one console error expected.
REDOC_LOGO_REFUSAL = re.compile(r"Loading the image 'https://cdn\.redoc\.ly/[^']*' violates the following Content")


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_html_names_no_other_host_and_its_assets_are_served(server_url, path):
    with httpx.Client(base_url=server_url, timeout=30) as client:
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert EXTERNAL_URL.findall(page.text) == [], "the page links another host: it would not work offline"
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert assets and all(url.startswith("/docs/assets/") for url in assets), assets
        for url in assets:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, (url, asset.status_code)
            again = client.get(url, headers={"If-None-Match": asset.headers["etag"]})
            assert again.status_code == 304, url


def test_docs_assets_are_only_the_bundled_files(server_url):
    with httpx.Client(base_url=server_url, timeout=30) as client:
        missing = client.get("/docs/assets/core.py")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert client.get("/docs/assets/..%2F__init__.py").status_code == 404
        posted = client.post("/docs/assets/swagger-ui.css")
        assert posted.status_code == 405 and posted.headers["allow"] == "GET, HEAD"
        assert client.get("/openapi.json").status_code == 200, "the spec the pages read stays public"


def test_with_api_keys_the_docs_stay_public_and_the_api_does_not(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as client:
        for path in ("/docs", "/redoc", "/docs/assets/redoc.standalone.js", "/openapi.json"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/models").status_code == 401
        assert "HTTPBearer" in client.get("/openapi.json").json()["components"]["securitySchemes"]


def test_the_offline_guard_blocks_other_hosts(page, page_events, server_url):
    """The fixture under the other tests: a request off this machine is aborted in the browser and recorded."""
    page.goto(f"{server_url}/healthz")
    page.set_content('<img src="http://cdn.invalid/logo.png"><p>guarded</p>')
    page.wait_for_function("() => document.images[0].complete")
    assert page_events.blocked == ["http://cdn.invalid/logo.png"]
    assert all(is_local(url) for url in page_events.requests if url not in page_events.blocked)


def test_swagger_ui_renders_offline_and_tries_a_request(page, page_events, server_url):
    page.goto(f"{server_url}/docs")
    page.wait_for_selector(".swagger-ui .opblock")
    assert page.title() == "snapgen - Swagger UI"
    assert "snapgen" in page.locator(".swagger-ui .info .title").inner_text()
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/v1/generate" in paths and "/v1/jobs/{job_id}" in paths, paths
    assert page.locator(".swagger-ui .opblock").count() == len(paths) >= 10
    path = screenshot(page, "swagger-ui")
    assert_not_blank(path)

    # "Try it out" on GET /healthz: the page's own request to this server goes through under its policy.
    healthz = page.locator(".opblock-get", has=page.locator(".opblock-summary-path", has_text="/healthz")).first
    healthz.locator(".opblock-summary").click()
    healthz.get_by_role("button", name="Try it out").click()
    healthz.get_by_role("button", name="Execute").click()
    status = healthz.locator(".live-responses-table tr.response .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip() == "200"

    page_events.assert_offline()
    page_events.assert_no_errors()
    assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url in page_events.requests)


def test_redoc_renders_offline_and_searches(page, page_events, server_url):
    page.goto(f"{server_url}/redoc")
    title = page.locator("h1", has_text="snapgen")
    title.wait_for()
    assert title.inner_text().strip() == "snapgen (0.1.0)"
    page.get_by_text("/v1/generate", exact=True).first.wait_for()
    assert page.locator("h2", has_text="Generate images").count() >= 1
    path = screenshot(page, "redoc", full_page=False)
    assert_not_blank(path)

    # ReDoc's search index runs in a blob: worker, which the pages' policy has to allow.
    page.get_by_placeholder("Search...").fill("Core ML")
    page.get_by_role("menuitem", name=re.compile("Download a Core ML bundle")).first.wait_for()

    page_events.assert_offline()
    assert not page_events.page_errors, page_events.page_errors
    unexpected = [e for e in page_events.console_errors if not REDOC_LOGO_REFUSAL.search(e)]
    assert not unexpected, f"errors in the browser console: {unexpected}"
