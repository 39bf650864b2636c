"""Fixtures for the real-browser tests: Debian's Chromium driven by Playwright, against a live `snapgen serve`.

Chromium is ``/usr/bin/chromium`` (Debian's package, installed by scripts/system-deps.sh) or ``SNAPGEN_CHROMIUM``;
without it every browser test FAILS saying how to install it (CI installs it, so a skip would hide a gap).

Fixtures:

- ``browser`` (module: Playwright's sync API keeps an asyncio loop running in this thread until it stops,
  which would break every later test that runs a loop of its own): a Playwright ``Browser`` on that
  Chromium, headless, launched with ``browser_harness.CHROMIUM_ARGS`` (no background networking; no host
  name but localhost resolves).
- ``page`` (function): a ``Page`` in a fresh context (1280x900, service workers blocked) whose every request
  off loopback is aborted. Default timeout 60 s (two shared cores). When the test fails, a full-page screenshot
  is saved under ``test-artifacts/browser/`` (path printed).
- ``page_events`` (function): the ``browser_harness.PageEvents`` of that page: ``requests`` (every URL asked for),
  ``blocked`` (those aborted as off this machine), ``console_errors``, ``page_errors``; ``assert_offline()`` and
  ``assert_no_errors()`` check them.
- ``live_server`` (session): the embedded server (API + in-memory queue + one worker) on the tiny random model
  (``tiny_model`` from tests/conftest.py), no API keys, on a free loopback port: a ``server_harness.Server``
  (``.url``, ``.port``, ``.client()`` for httpx, ``.proc.log_tail()``).
- ``server_url`` (session): ``live_server.url``, e.g. ``http://127.0.0.1:PORT`` (no trailing slash).
- ``keyed_server`` (session): the same with API keys on; ``api_key`` (session) is the key it accepts.

Helpers in browser_harness.py: ``screenshot(page, name)`` (saves ``test-artifacts/browser/NAME.png``, or under
``SNAPGEN_TEST_ARTIFACTS``, prints and returns the path) and ``assert_not_blank(path)`` (grey-level variance).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_harness import CHROMIUM_ARGS, PageEvents, chromium_executable, screenshot
from playwright.sync_api import sync_playwright

# The server tests' harness (real uvicorn processes, free ports, readiness polls): one way to run a server.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_harness import Proc, Server, clean_env, free_port, snapgen  # noqa: E402

API_KEY = "browser-test-key"
PAGE_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page_events() -> PageEvents:
    return PageEvents()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the item, so ``page`` can tell at teardown whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def page(browser, page_events, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    context.route("**/*", page_events.route)
    page = context.new_page()
    page.on("console", page_events.on_console)
    page.on("pageerror", page_events.on_page_error)
    try:
        yield page
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            try:
                screenshot(page, f"failed-{request.node.name}")
            except Exception as e:  # the page may be what broke; the test's own failure is the one to report
                print(f"no failure screenshot: {e}")
        context.close()


@pytest.fixture(scope="session")
def browser_log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser-logs")


def run_embedded(name: str, model: Path, log_dir: Path, **env: str) -> Iterator[Server]:
    """`snapgen serve` (embedded: API, in-memory queue, one worker) on a free loopback port, stopped after."""
    port = free_port()
    environment = clean_env(SNAPGEN_TORCH_THREADS="1", SNAPGEN_DRAIN_TIMEOUT_S="2", **env)
    proc = Proc(name, snapgen("serve", "--model", str(model), "--port", str(port)), environment, log_dir).start()
    try:
        yield Server(proc, port).wait_ready()
    finally:
        code = proc.stop(signal.SIGTERM, timeout=30)
        assert code in (0, -signal.SIGTERM), f"{name} did not stop cleanly ({code}):\n{proc.log_tail()}"


@pytest.fixture(scope="session")
def live_server(tiny_model, browser_log_dir) -> Iterator[Server]:
    yield from run_embedded("browser-embedded", tiny_model, browser_log_dir)


@pytest.fixture(scope="session")
def server_url(live_server) -> str:
    return live_server.url


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def keyed_server(tiny_model, browser_log_dir, api_key) -> Iterator[Server]:
    yield from run_embedded("browser-keyed", tiny_model, browser_log_dir, SNAPGEN_API_KEYS=api_key)
