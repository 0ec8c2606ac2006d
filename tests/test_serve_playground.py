"""The playground page (GET /) in headless Chromium: Debian's `chromium` binary driven by Playwright.

Playwright's own browser download is never used (`playwright install` fetches from the network); tests/run.sh
installs Debian's chromium with apt-get where it can, and these tests skip with the reason where it is absent.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import PIL.Image
import pytest

from tests.helpers import running_server

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

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


@pytest.fixture(scope="module")
def server(ort_engines, tmp_path_factory):
    with running_server(ort_engines, tmp_path_factory.mktemp("playground_logs")) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 640})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.set_default_navigation_timeout(WAIT_MS)
    page.goto(server.url + "/", wait_until="load")
    page.wait_for_selector("#sampler option", state="attached")  # /v1/info answered and filled the form
    yield page
    context.close()


def info(server) -> dict:
    status, body, _ = server.get("/v1/info")
    assert status == 200, body
    return json.loads(body)


def test_root_serves_the_page(server):
    status, body, headers = server.get("/")
    assert status == 200
    assert headers.get("content-type", headers.get("Content-Type", "")).startswith("text/html")
    assert b'id="generate"' in body


def test_type_click_image_appears(server, page, tmp_path: Path):
    meta = info(server)
    assert page.locator("#sampler option").count() == len(meta["samplers"])
    assert page.input_value("#sampler") == meta["defaults"]["sampler"]
    assert page.input_value("#width") == str(meta["width"])  # the engines' default size pre-filled
    # A size other than the default where the built profile allows one, so the page demonstrably sends it.
    step = meta["size_multiple"]
    width = meta["width"] + step if meta["width"] + step <= meta["profile"]["hi"]["width"] else meta["width"]
    height = meta["height"]

    page.fill("#prompt", "a red lighthouse on a cliff, oil painting")
    page.fill("#width", str(width))
    page.fill("#height", str(height))
    page.fill("#steps", "4")
    page.fill("#seed", "1234")
    # Record the button's disabled state on every change: it must be disabled while the request runs.
    page.evaluate("""() => {
        const b = document.getElementById("generate");
        window.__disabled = [];
        new MutationObserver(() => window.__disabled.push(b.disabled)).observe(b, {attributes: true});
    }""")
    with page.expect_response("**/v1/generate", timeout=GENERATE_MS) as answer:
        page.click("#generate")
    assert answer.value.status == 200, answer.value.text()
    img = page.wait_for_selector("#result img", state="visible", timeout=WAIT_MS)
    assert img is not None
    natural = page.evaluate("() => { const i = document.querySelector('#result img');"
                            " return [i.complete, i.naturalWidth, i.naturalHeight]; }")
    assert natural == [True, width, height]
    page.wait_for_function("() => !document.getElementById('generate').disabled", timeout=WAIT_MS)
    assert True in page.evaluate("() => window.__disabled")

    timings = page.inner_text("#timings")  # every figure the server gave, none missing ("–")
    assert re.search(r"queue [\d.]+ ms · compute [\d.]+ ms · total [\d.]+ ms · batch of 1 image\b", timings), timings
    assert "seed 1234" in page.inner_text("#used-seed")
    assert page.inner_text("#error") == ""

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True, timeout=WAIT_MS)
    assert shot.is_file()
    with PIL.Image.open(shot) as png:
        assert png.format == "PNG" and png.width > 0 and png.height > 0


def test_invalid_size_shows_the_server_error(page):
    page.fill("#prompt", "a cat")
    page.fill("#width", "70")  # not a multiple of 8
    page.fill("#steps", "2")
    with page.expect_response("**/v1/generate", timeout=GENERATE_MS) as answer:
        page.click("#generate")
    response = answer.value
    assert response.status == 400, response.text()
    message = response.json()["error"]["message"]
    page.wait_for_function("() => document.getElementById('error').textContent !== ''", timeout=WAIT_MS)
    assert page.inner_text("#error") == message
    assert "width" in message.lower() or "70" in message
    assert page.locator("#result img").count() == 0
    assert page.is_enabled("#generate")
