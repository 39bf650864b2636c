"""Screenshot of the playground page after a generation: docs/images/playground.png.

    .venv/bin/python scripts/playground_screenshot.py [--out docs/images/playground.png] [--model DIR]

Starts `snapgen serve` (the embedded default model unless --model) on a free loopback port, opens ``/`` in
Debian's Chromium (``/usr/bin/chromium``, or ``SNAPGEN_CHROMIUM``) under Playwright, generates four images of one
prompt and seed, and saves the page as a palette PNG (small enough to commit). Nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle to the left of a blue square"
# Headless, and no host name but localhost resolves: the browser's own background requests cannot go out either.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"snapgen serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"snapgen serve was not ready after {timeout:.0f} s")


def capture(url: str, out: Path, chromium: str, width: int, n: int, seed: int) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(url + "/")
        page.wait_for_selector("#size option", state="attached")
        page.fill("#prompt", PROMPT)
        page.fill("#n", str(n))
        page.fill("#seed", str(seed))  # typing a seed locks it
        page.click("#generate")
        # Selectors, not a JS predicate: the page's Content-Security-Policy forbids eval.
        page.wait_for_selector("body[data-runs='1']", state="attached", timeout=120_000)
        state = page.get_attribute("#status", "data-state")
        if state != "succeeded":
            raise SystemExit(f"the generation ended {state!r}: {page.inner_text('#alert')}")
        page.locator("#bundles-empty, #bundles li").first.wait_for()
        page.evaluate("document.activeElement.blur()")  # no focus ring in the picture
        png = page.screenshot(full_page=True)
        browser.close()
    # A palette keeps the flat page and the few shape colours; the file stays well under 300 KB.
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    print(f"{out}: {image.width}x{image.height}, {out.stat().st_size // 1024} KiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "playground.png")
    parser.add_argument("--model", help="model directory (default: the embedded default model)")
    parser.add_argument("--chromium", default=os.environ.get("SNAPGEN_CHROMIUM", "/usr/bin/chromium"))
    parser.add_argument("--width", type=int, default=1100, help="viewport width in CSS pixels")
    parser.add_argument("--n", type=int, default=4, help="images to generate")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    port = free_port()
    command = [sys.executable, "-m", "snapgen.cli", "serve", "--port", str(port)]
    if args.model:
        command += ["--model", args.model]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPGEN_")}
    env.update({"HF_HUB_OFFLINE": "1", "SNAPGEN_MAX_BATCH_IMAGES": "8"})
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, server)
            capture(url, args.out, args.chromium, args.width, args.n, args.seed)
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
