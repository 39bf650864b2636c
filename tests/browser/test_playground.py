"""The playground page at ``/`` in a real Chromium, against a live `snapgen serve`.

Most tests run on the embedded default model (it has an encoder, so image-to-image works, and its pictures are
shapes, not noise) with a Core ML bundle directory; the API key flow runs on conftest's ``keyed_server``.
Each test reads what the page shows and checks it against the API itself.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from browser_harness import ROOT
from PIL import Image
from server_harness import Proc, Server, clean_env, free_port, snapgen

from snapgen.model_dir import DEFAULT_MODEL_DIR

PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("playground-mobile")
    with zipfile.ZipFile(directory / "snapgen-ios.zip", "w") as z:
        z.writestr("manifest.json", json.dumps({"name": "snapgen-ios", "version": "0.1.0"}))
        z.writestr("Unet.mlmodelc/weights.bin", os.urandom(50_000))  # incompressible: a real size
    return directory


@pytest.fixture(scope="module")
def shapes_server(bundle_dir, browser_log_dir) -> Iterator[Server]:
    """The embedded server on the default model, with one bundle; jobs run alone (byte-exact repeats)."""
    port = free_port()
    env = clean_env(
        SNAPGEN_TORCH_THREADS="1",
        SNAPGEN_DRAIN_TIMEOUT_S="2",
        SNAPGEN_MOBILE_DIR=str(bundle_dir),
        SNAPGEN_MAX_BATCH_IMAGES="1",
    )
    args = snapgen("serve", "--model", str(DEFAULT_MODEL_DIR), "--port", str(port))
    proc = Proc("browser-playground", args, env, browser_log_dir).start()
    try:
        yield Server(proc, port).wait_ready()
    finally:
        code = proc.stop(signal.SIGTERM, timeout=30)
        assert code in (0, -signal.SIGTERM), f"the playground server did not stop cleanly ({code}):\n{proc.log_tail()}"


@pytest.fixture(scope="module")
def model(shapes_server) -> dict:
    with shapes_server.client() as client:
        return client.get("/v1/models").json()["data"][0]


def page_url(server: Server) -> str:
    """The playground's address for the browser: by the name localhost, which the browser's host resolver rules
    (browser_harness.CHROMIUM_ARGS) let through; they map the literal 127.0.0.1 to "not found"."""
    return f"http://localhost:{server.port}/"


def open_page(page, server: Server) -> None:
    page.goto(page_url(server))
    page.wait_for_selector("#size option", state="attached")


def runs(page) -> int:
    return int(page.evaluate("Number(document.body.dataset.runs || 0)"))


def wait_runs(page, count: int) -> None:
    """Until the page has ended ``count`` runs (selectors, not a JS predicate: the page's CSP forbids eval)."""
    page.wait_for_selector(f"body[data-runs='{count}']", state="attached")


def run(page, click: str = "#generate", expect: str = "succeeded") -> None:
    """Click ``click`` and wait until the run it starts has ended; its final state must be ``expect``."""
    before = runs(page)
    page.click(click)
    wait_runs(page, before + 1)
    state = page.get_attribute("#status", "data-state")
    assert state == expect, f"run ended {state!r}: {page.inner_text('#status')} / alert: {page.inner_text('#alert')}"


def shown_image(page, index: int = 0) -> tuple[int, bytes]:
    """(seed, PNG bytes) of the ``index``-th result on the page (the newest first)."""
    item = page.locator("#results li").nth(index)
    src = item.locator("img").get_attribute("src")
    assert src.startswith("data:image/png;base64,"), src[:40]
    return int(item.get_attribute("data-seed")), base64.b64decode(src.split(",", 1)[1])


def rendered_std(page, index: int = 0) -> float:
    """The grey-level standard deviation of the result as the browser decoded it (drawn into a canvas)."""
    return (
        page.locator("#results li img")
        .nth(index)
        .evaluate(
            """img => {
            const canvas = document.createElement('canvas');
            [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
            const context = canvas.getContext('2d');
            context.drawImage(img, 0, 0);
            const { data } = context.getImageData(0, 0, canvas.width, canvas.height);
            let sum = 0, squares = 0;
            for (let i = 0; i < data.length; i += 4) {
                const grey = (data[i] + data[i + 1] + data[i + 2]) / 3;
                sum += grey; squares += grey * grey;
            }
            const n = data.length / 4;
            return Math.sqrt(squares / n - (sum / n) ** 2);
        }"""
        )
    )


def job(server: Server, job_id: str) -> dict:
    with server.client() as client:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()


def test_the_page_needs_no_key_and_stays_out_of_the_api_document(keyed_server):
    page = httpx.get(keyed_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = httpx.get(keyed_server.url + "/static/playground/playground.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(keyed_server.url + "/static/playground/app.py").status_code == 404
    assert httpx.get(keyed_server.url + "/v1/models").status_code == 401  # the API itself still needs the key
    paths = httpx.get(keyed_server.url + "/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/static")]


def test_generate_shows_progress_a_preview_and_the_image(page, page_events, shapes_server):
    open_page(page, shapes_server)
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "8")
    before = runs(page)
    page.press("#prompt", "Control+Enter")  # the shortcut submits
    wait_runs(page, before + 1)
    assert page.get_attribute("#status", "data-state") == "succeeded", page.inner_text("#alert")
    assert page.inner_text("#status").startswith("Done: 1 image")
    assert int(page.get_attribute("#progress", "data-events")) >= 1
    assert page.get_attribute("#progress", "data-steps") == "8"
    assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")
    assert page.is_visible("#preview")

    seed, png = shown_image(page)
    assert page.input_value("#seed") == str(seed)
    assert f"Seed {seed}" in page.locator("#results li figcaption").inner_text()
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (128, 128)
        assert np.asarray(image.convert("L"), dtype=float).std() > 5
    assert rendered_std(page) > 5
    # The image is the API's own: the job's result carries the same bytes.
    result = job(shapes_server, page.get_attribute("#status", "data-job-id"))["result"]
    assert base64.b64decode(result["data"][0]["b64_json"]) == png
    page_events.assert_offline()
    page_events.assert_no_errors()


def test_same_again_gives_the_same_bytes_and_vary_seed_a_new_seed(page, page_events, shapes_server):
    open_page(page, shapes_server)
    page.fill("#prompt", PROMPT)
    run(page)
    seed, png = shown_image(page)

    run(page, "#results li:first-child button:text('Same again')")
    assert page.locator("#results li").count() == 2
    again_seed, again = shown_image(page)
    assert (again_seed, again) == (seed, png)

    run(page, "#results li:first-child button:text('Vary seed')")
    varied_seed, varied = shown_image(page)
    assert varied_seed != seed and varied != png
    assert page.input_value("#seed") == str(varied_seed)

    link = page.locator("#results li").nth(2).locator("a[download]")
    assert link.get_attribute("download") == f"snapgen-{seed}.png"
    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == f"snapgen-{seed}.png"
    assert Path(download.value.path()).read_bytes() == png
    page_events.assert_no_errors()


def test_the_seed_lock_keeps_the_seed_and_unlocked_draws_new_ones(page, shapes_server):
    open_page(page, shapes_server)
    page.fill("#prompt", PROMPT)
    run(page)
    first = page.input_value("#seed")
    run(page)
    assert page.input_value("#seed") != first  # unlocked: a new seed each run
    page.check("#seed-lock")
    kept = page.input_value("#seed")
    run(page)
    assert page.input_value("#seed") == kept and shown_image(page)[0] == int(kept)
    page.click("#seed-random")
    assert page.input_value("#seed") != kept


def test_cancel_a_long_job(page, page_events, shapes_server, model):
    open_page(page, shapes_server)
    page.fill("#prompt", PROMPT)
    page.fill("#steps", str(model["max_steps"]))
    page.fill("#n", str(model["max_n"]))
    before = runs(page)
    page.click("#generate")
    page.wait_for_selector("#progress[data-events]:not([data-events='0'])", state="attached")
    assert page.is_enabled("#cancel") and page.is_disabled("#generate")
    page.click("#cancel")
    wait_runs(page, before + 1)
    assert page.get_attribute("#status", "data-state") == "canceled", page.inner_text("#alert")
    assert page.inner_text("#status") == "Canceled."
    assert page.locator("#results li").count() == 0
    assert page.is_disabled("#cancel") and page.is_enabled("#generate")
    body = job(shapes_server, page.get_attribute("#status", "data-job-id"))
    assert body["status"] == "canceled" and body["progress"]["step"] < model["max_steps"]
    page_events.assert_no_errors()


@pytest.mark.parametrize("steps", ["-3", "too many"])
def test_a_bad_value_shows_the_servers_message_naming_the_field(page, shapes_server, model, steps):
    value = str(model["max_steps"] + 1) if steps == "too many" else steps
    open_page(page, shapes_server)
    page.fill("#prompt", PROMPT)
    page.fill("#steps", value)
    run(page, expect="failed")
    alert = page.locator("[role=alert]")
    message = alert.inner_text()
    assert message.startswith("steps: got " + value) and "allowed" in message, message
    if steps == "too many":
        assert f"from 1 to {model['max_steps']}" in message, message
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    # The next good run clears the error.
    page.fill("#steps", "2")
    run(page)
    assert alert.inner_text() == "" and page.get_attribute("#steps", "aria-invalid") is None


def test_api_key_flow(page, page_events, keyed_server, api_key):
    page.goto(page_url(keyed_server))
    page.wait_for_selector("#api-key", state="visible")  # GET /v1/models answered 401
    assert "API key" in page.inner_text("[role=alert]")
    page.fill("#api-key", "not-the-key")
    page.click("#api-key-save")
    page.wait_for_selector("#api-key", state="visible")  # 403: asked again
    assert "not valid" in page.inner_text("[role=alert]")
    page.fill("#api-key", api_key)
    page.click("#api-key-save")
    page.wait_for_selector("#size option", state="attached")
    assert page.is_hidden("#key-form")
    assert page.evaluate("sessionStorage.getItem('snapgen.apiKey')") == api_key
    assert page.evaluate("localStorage.length") == 0
    # The tiny test model has no encoder (GET /v1/models says image_input false): no image input is offered.
    assert page.is_disabled("#image-file") and "no encoder" in page.inner_text("#image-help")
    page.fill("#prompt", PROMPT)
    run(page)
    assert page.locator("#results li").count() == 1
    page_events.assert_offline()


def test_image_to_image_from_a_file_and_a_drop(page, page_events, shapes_server, tmp_path):
    open_page(page, shapes_server)
    page.fill("#prompt", PROMPT)
    page.check("#seed-lock")
    page.fill("#seed", "11")
    run(page)
    _, text_only = shown_image(page)

    source = Image.new("RGB", (160, 120), (255, 255, 255))
    source.paste((0, 160, 0), (40, 30, 120, 90))
    path = tmp_path / "input.png"
    source.save(path)
    page.set_input_files("#image-file", str(path))
    page.wait_for_selector("#image-chosen", state="visible")
    page.locator("#strength").evaluate("el => { el.value = '0.5'; el.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#strength-value") == "0.50"
    run(page)
    seed, from_image = shown_image(page)
    assert seed == 11 and from_image != text_only
    assert job(shapes_server, page.get_attribute("#status", "data-job-id"))["request"]["strength"] == 0.5
    assert "strength 0.5" in page.locator("#results li figcaption").first.inner_text()

    page.click("#image-clear")
    assert page.is_hidden("#image-chosen")
    run(page)
    assert shown_image(page)[1] == text_only  # back to text-to-image: the first image again
    assert job(shapes_server, page.get_attribute("#status", "data-job-id"))["request"].get("strength") is None

    # A file dropped on the page is taken like a chosen one.
    encoded = base64.b64encode(path.read_bytes()).decode()
    page.evaluate(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'dropped.png', { type: 'image/png' }));
            document.body.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true }));
        }""",
        encoded,
    )
    page.wait_for_selector("#image-chosen", state="visible")
    page_events.assert_offline()
    page_events.assert_no_errors()


def human(size: int) -> str:
    value, unit = float(size), 0
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{size} B" if unit == 0 else f"{value:.{1 if value < 10 else 0}f} {units[unit]}"


def test_the_core_ml_bundles_are_listed(page, shapes_server):
    with shapes_server.client() as client:
        bundles = client.get("/v1/models/mobile").json()["data"]
    assert len(bundles) == 1
    open_page(page, shapes_server)
    item = page.locator("#bundles li")
    item.wait_for()
    text = item.inner_text()
    assert bundles[0]["name"] in text and bundles[0]["sha256"] in text and human(bundles[0]["size"]) in text
    assert human(bundles[0]["size"]) == "49 KiB"
    # The link is the API's download (its base URL is the one the browser used) and gives the bytes of that hash.
    href = item.locator("a").get_attribute("href")
    assert href == page_url(shapes_server) + "v1/models/mobile/" + bundles[0]["name"]
    with shapes_server.client() as client:
        assert hashlib.sha256(client.get(urlsplit(href).path).content).hexdigest() == bundles[0]["sha256"]


def test_accessible_labels_focus_and_tab_order(page, shapes_server):
    open_page(page, shapes_server)
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
                 .filter(c => c.type !== 'hidden' && c.labels.length === 0).map(c => c.id)"""
    )
    assert unlabelled == []
    assert page.get_attribute("#status", "aria-live") == "polite"
    assert page.locator("[role=alert]").count() == 1
    order, outlines = [], {}
    page.focus("#prompt")
    for _ in range(11):
        element, outline = page.evaluate(
            "[document.activeElement.id, getComputedStyle(document.activeElement).outlineStyle]"
        )
        order.append(element)
        outlines[element] = outline
        page.keyboard.press("Tab")
    expected = ["prompt", "negative", "steps", "guidance", "size", "n", "seed", "seed-random", "seed-lock"]
    expected += ["image-file", "generate"]  # the disabled Cancel is skipped
    assert order == expected
    # Focus reached with the keyboard is drawn (:focus-visible) on every control.
    assert [e for e, outline in outlines.items() if outline == "none"] == []


def test_readable_at_375_px_without_horizontal_scroll(page, shapes_server):
    page.set_viewport_size({"width": 375, "height": 800})
    open_page(page, shapes_server)
    page.locator("#bundles li").wait_for()
    page.fill("#prompt", PROMPT)
    page.fill("#n", "2")
    run(page)
    page.fill("#steps", "-1")
    run(page, expect="failed")  # a long alert too
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_the_screenshot_script_exists_and_the_committed_screenshot_is_small():
    shot = ROOT / "docs" / "images" / "playground.png"
    assert (ROOT / "scripts" / "playground_screenshot.py").is_file()
    assert shot.is_file() and shot.stat().st_size < 300_000
    with Image.open(shot) as image:
        assert image.width >= 800 and np.asarray(image.convert("L"), dtype=float).std() > 8
