"""The playground page in headless Chromium: Debian's `chromium` binary driven by Playwright, with the flags the
serving stack fixes (no sandbox, no GPU, no background network or component updates). Tests that use it skip with
the reason where Playwright or chromium is absent (tests/run.sh installs chromium with apt-get where it can)."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
WAIT_MS = 30_000  # page loads, the server's /v1/info
GENERATE_MS = 120_000  # one small tiny generation on CPU, queue included


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip("Debian's chromium is not installed (tests/run.sh installs it with apt-get where apt is "
                    "available); the playground page is tested in it")
    return path


@contextmanager
def playground(url: str) -> Iterator[Any]:
    """A page on the server's playground at `url`, loaded; the browser is closed afterwards."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    path = chromium_path()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(url + "/", wait_until="load")
            yield page
        finally:
            browser.close()


def generate(page: Any, prompt: str, steps: int, seed: int) -> tuple[int, dict, dict]:
    """Fill the prompt, steps and seed, press Generate: (status, the JSON body sent, the JSON answer)."""
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.fill("#seed", str(seed))
    with page.expect_response("**/v1/generate", timeout=GENERATE_MS) as answer:
        page.click("#generate")
    return answer.value.status, answer.value.request.post_data_json, streamed_answer(answer.value.text())[1]


def streamed_answer(text: str) -> tuple[list[int], dict]:
    """(the steps its `progress` events reported, the JSON answer of its `result` event) of the server-sent events
    the page reads from /v1/generate (engine/server/stream.py)."""
    events = [(b.split("\n")[0].removeprefix("event: "), b.split("\n")[1].removeprefix("data: "))
              for b in text.strip().split("\n\n")]
    assert events[-1][0] == "result", events[-1]
    return [json.loads(d)["step"] for e, d in events if e == "progress"], json.loads(events[-1][1])
