"""The app in a real browser: start it, upload images, read the page, take a screenshot.

Used by `python main.py screenshot` (the README picture, against the served model) and by
the browser test. Needs the dev requirements (Playwright) and Debian's chromium; Playwright's
own browser download is never used.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metal_defect.errors import ConfigError

CHROMIUM = Path(os.environ.get("METAL_DEFECT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_app(env: dict[str, str], port: int, timeout: float = 90) -> subprocess.Popen:
    """The app through its launcher on 127.0.0.1:port, once /_stcore/health answers."""
    server = subprocess.Popen([sys.executable, "-m", "metal_defect.launch_app", "--port", str(port), "--address", "127.0.0.1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise TimeoutError(f"the app did not answer its health check on port {port} within {timeout:.0f} s")


def capture(uploads: Sequence[Path], screenshot: Path, env: dict[str, str] | None = None, wait_for: str = "— confidence",
            width: int = 1400, height: int = 1250) -> dict[str, Any]:
    """Start the app, upload `uploads` at once, wait until `wait_for` is on the page; returns the page
    text and the seconds from upload to answer, and saves a screenshot."""
    port = free_port()
    server = start_app(dict(os.environ if env is None else env, PYTHONUNBUFFERED="1"), port)
    try:
        return browse(f"http://127.0.0.1:{port}/", uploads, screenshot, wait_for, width, height)
    finally:
        server.terminate()
        server.wait(timeout=30)


def browse(url: str, uploads: Sequence[Path], screenshot: Path, wait_for: str | Sequence[str] = "— confidence",
           width: int = 1400, height: int = 1250, ready: str = "Images of steel surfaces") -> dict[str, Any]:
    """Open a running app at `url` in Chromium, wait for `ready`, upload `uploads` at once (none: only
    read the page), wait until `wait_for` (or any of several texts) is on the page; returns the page text and the seconds from
    upload to answer, and saves a screenshot."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise ConfigError("screenshot: Playwright is missing; install requirements-dev.txt") from exc
    if not CHROMIUM.exists():
        raise ConfigError(f"screenshot: no chromium at {CHROMIUM}; apt-get install chromium (or set METAL_DEFECT_CHROMIUM)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_text(ready).first.wait_for(timeout=90_000)
        started = time.perf_counter()
        if uploads:
            page.locator("input[type=file]").set_input_files([str(p) for p in uploads])
        texts = [wait_for] if isinstance(wait_for, str) else list(wait_for)
        page.wait_for_function(f"{json.dumps(texts)}.some(t => document.body.innerText.includes(t))", timeout=90_000)
        page.wait_for_function("!document.body.innerText.includes('Running...')", timeout=90_000)
        seconds = time.perf_counter() - started
        time.sleep(3.0)  # let the charts and images finish drawing
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot))
        text = page.inner_text("body")
        browser.close()
    return {"text": text, "seconds": round(seconds, 2), "screenshot": str(screenshot)}


def time_page(url: str, selector: str, count: int, screenshot: Path, visits: int = 3, width: int = 1400, height: int = 1250) -> list[float]:
    """Seconds from opening `url` (a new browser page each visit: a new app session) until `count`
    elements match `selector` and the app has stopped running; a screenshot of the last visit."""
    from playwright.sync_api import sync_playwright

    seconds = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        for _ in range(visits):
            page = browser.new_page(viewport={"width": width, "height": height})
            started = time.perf_counter()
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_function(f"document.querySelectorAll({json.dumps(selector)}).length >= {count}", timeout=120_000)
            page.wait_for_function("!document.body.innerText.includes('Running...')", timeout=120_000)
            seconds.append(round(time.perf_counter() - started, 2))
            if len(seconds) == visits:
                time.sleep(2.0)  # let the charts finish drawing
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
            page.close()
        browser.close()
    return seconds
