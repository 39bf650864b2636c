"""Helpers for the real-browser tests: Debian's Chromium under Playwright, an offline guard, screenshots.

(Not named conftest, for the reason server_harness.py gives: import it as ``from browser_harness import ...``.)

Playwright's own browser download is not used (nothing outside the package registries can be fetched):
Playwright drives the system Chromium, ``/usr/bin/chromium`` from Debian (scripts/system-deps.sh installs it),
or the executable named by ``SNAPGEN_CHROMIUM``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# Beyond headless: nothing of the browser's own may go out (sync, updates, field trials, QUIC probes), and the
# host resolver answers "not found" for every name but localhost, so even a request that escaped the page's
# route guard (the browser's own, a service worker's) could not reach another machine by name.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Schemes that never touch the network; Playwright may still show them to a route handler.
LOCAL_SCHEMES = {"data", "blob", "about"}
# Where screenshots go: git-ignored, kept after the run so a person (or CI's log reader) can look at them.
ARTIFACTS = Path(os.environ.get("SNAPGEN_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"


def chromium_executable() -> str:
    """The Chromium to drive; fails the test (never skips) when there is none, saying how to install it."""
    configured = os.environ.get("SNAPGEN_CHROMIUM")
    candidate = configured or shutil.which("chromium") or DEFAULT_CHROMIUM
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        where = f"SNAPGEN_CHROMIUM={configured!r} is not an executable" if configured else "no chromium on PATH"
        pytest.fail(
            f"the browser tests need Chromium ({where}): run `bash scripts/system-deps.sh` (Debian's chromium "
            "package) or set SNAPGEN_CHROMIUM to a Chromium executable",
            pytrace=False,
        )
    return candidate


def is_local(url: str) -> bool:
    """Whether ``url`` stays on this machine (loopback) or off the network altogether."""
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or (parts.hostname or "") in LOCAL_HOSTS


@dataclass
class PageEvents:
    """What one page did: every request it made, those the offline guard blocked, and its errors."""

    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def route(self, route) -> None:
        """The context's handler for every request: loopback goes through, anything else is aborted."""
        url = route.request.url
        self.requests.append(url)
        if is_local(url):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")

    def on_console(self, message) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} ({message.location.get('url', '')})")

    def on_page_error(self, error) -> None:
        self.page_errors.append(str(error))

    def assert_offline(self) -> None:
        """Nothing was asked of another machine (what was blocked never left, but the page wanted it)."""
        assert not self.blocked, f"the page requested {len(self.blocked)} URL(s) off this machine: {self.blocked}"

    def assert_no_errors(self) -> None:
        assert not self.page_errors, f"uncaught errors in the page: {self.page_errors}"
        assert not self.console_errors, f"errors in the browser console: {self.console_errors}"


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """Save a PNG of ``page`` under ARTIFACTS as ``name``.png, print its path, and return it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path


def pixel_std(path: Path) -> float:
    """The standard deviation of the grey levels (0-255): 0 for a page of one colour."""
    with Image.open(path) as image:
        return float(np.asarray(image.convert("L"), dtype=np.float64).std())


def assert_not_blank(path: Path, min_std: float = 8.0) -> None:
    """The screenshot shows something: text and boxes, not one flat colour (a page whose scripts did not run)."""
    std = pixel_std(path)
    assert std >= min_std, f"{path} looks blank: grey-level standard deviation {std:.2f} < {min_std}"
