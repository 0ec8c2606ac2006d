"""The playground page (GET /) in headless Chromium: Debian's `chromium` binary driven by Playwright.

Every mode end to end against one tiny server (64x64, a LoRA in its --lora-dir): txt2img (pixels equal POST
/v1/generate's), seed reuse, img2img from an upload and from a result, inpainting with a mask painted by mouse drags
(brush, eraser, clear), the LoRA picker, the history and its downloads, the API key header.

Playwright's own browser download is never used (`playwright install` fetches from the network); tests/run.sh
installs Debian's chromium with apt-get where it can, and these tests skip with the reason where it is absent.
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from tests.browser import CHROMIUM_ARGS, GENERATE_MS, WAIT_MS, chromium_path, streamed_answer
from tests.helpers import init_image, max_diff, png_pixels, running_server, write_kohya

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

LORA = "style"  # the adapter in the server's --lora-dir
SIZE = 64  # the engines' default size (ort_engines)


@pytest.fixture(scope="module")
def server(ort_engines, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("playground_loras")
    shutil.move(write_kohya(lora_dir, 61, r=4, alpha=4.0), lora_dir / f"{LORA}.safetensors")
    logs = tmp_path_factory.mktemp("playground_logs")
    with running_server(ort_engines, logs, "--lora-dir", str(lora_dir)) as srv:
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
    context = browser.new_context(viewport={"width": 1000, "height": 640}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.set_default_navigation_timeout(WAIT_MS)
    page.goto(server.url + "/", wait_until="load")
    page.wait_for_selector("#sampler option", state="attached")  # /v1/info answered and filled the form
    yield page
    context.close()


# ---- helpers ----


def info(server) -> dict:
    status, body, _ = server.get("/v1/info")
    assert status == 200, body
    return json.loads(body)


def oracle(server, body: dict) -> np.ndarray:
    """The pixels POST /v1/generate answers for `body` (sent by the test, not by the page)."""
    status, data, _ = server.post("/v1/generate", body)
    assert status == 200, data
    return png_pixels(json.loads(data)["images"][0]["b64_png"])


def generate(page) -> tuple[dict, dict, dict]:
    """Click Generate; (the JSON body the page sent, its headers, the server's answer) once the page shows it."""
    with page.expect_response("**/v1/generate", timeout=GENERATE_MS) as answer:
        page.click("#generate")
    response = answer.value
    assert response.status == 200, response.text()
    page.wait_for_function("() => !document.getElementById('generate').disabled", timeout=WAIT_MS)
    assert page.inner_text("#error") == ""
    body = response.request.post_data_json
    assert body["stream"] is True  # the page asks for the streamed answer: progress, previews, then the images
    steps, answered = streamed_answer(response.text())
    assert steps and steps == list(range(1, len(steps) + 1))  # every step, in order
    return body, response.request.headers, answered


def shown_png(page, selector: str) -> bytes:
    """The bytes of the PNG an <img> shows (a blob: URL), read inside the page."""
    b64 = page.eval_on_selector(selector, """async (img) => {
        const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let s = ""; for (const b of bytes) s += String.fromCharCode(b);
        return btoa(s);
    }""")
    return base64.b64decode(b64)


def data_url_pixels(url: str, mode: str = "RGB") -> np.ndarray:
    assert url.startswith("data:image/"), url[:40]
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert(mode))


def b64_of(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def upload(page, path: Path) -> None:
    page.set_input_files("#init-file", str(path))
    page.wait_for_selector("#canvas-box", state="visible")


def drag(page, points: list[tuple[float, float]]) -> None:
    """A mouse drag over the mask canvas through `points` (image pixels)."""
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()  # mouse events land in the viewport only
    box = canvas.bounding_box()
    scale_x, scale_y = box["width"] / SIZE, box["height"] / SIZE
    at = [(box["x"] + x * scale_x, box["y"] + y * scale_y) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def set_range(page, selector: str, value: int) -> None:
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", value)


def watch_generate_requests(page) -> list:
    sent: list = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/generate") else None)
    return sent


# ---- tests ----


def test_root_serves_the_page(server):
    status, body, headers = server.get("/")
    assert status == 200
    assert headers.get("content-type", headers.get("Content-Type", "")).startswith("text/html")
    assert b'id="generate"' in body
    assert b"http://" not in body and b"https://" not in body  # self-contained: nothing fetched from elsewhere


def test_type_click_image_appears(server, page, tmp_path: Path):
    meta = info(server)
    assert page.locator("#sampler option").count() == len(meta["samplers"])
    assert page.input_value("#sampler") == meta["defaults"]["sampler"]
    assert page.input_value("#width") == str(meta["width"])  # the engines' default size pre-filled
    assert page.is_checked("#mode-txt2img") and page.is_hidden("#init-section")
    # A size other than the default where the built profile allows one, so the page demonstrably sends it.
    step = meta["size_multiple"]
    width = meta["width"] + step if meta["width"] + step <= meta["profile"]["hi"]["width"] else meta["width"]
    height = meta["height"]

    prompt = "a red lighthouse on a cliff, oil painting"
    page.fill("#prompt", prompt)
    page.fill("#width", str(width))
    page.fill("#height", str(height))
    page.fill("#steps", "4")
    page.fill("#seed", "1234")
    # Record the button's disabled state and the progress indicator on every change of the button.
    page.evaluate("""() => {
        const b = document.getElementById("generate"), p = document.getElementById("progress");
        window.__states = [];
        new MutationObserver(() => window.__states.push([b.disabled, p.hidden])).observe(b, {attributes: true});
    }""")
    body, _, answer = generate(page)
    assert body["seed"] == 1234 and body["width"] == width and body["steps"] == 4 and "init_image" not in body
    img = page.wait_for_selector("#result img", state="visible", timeout=WAIT_MS)
    assert img is not None
    natural = page.evaluate("() => { const i = document.querySelector('#result img');"
                            " return [i.complete, i.naturalWidth, i.naturalHeight]; }")
    assert natural == [True, width, height]
    assert [True, False] in page.evaluate("() => window.__states")  # disabled, progress shown while it ran
    assert page.is_hidden("#progress")
    # The image shown is the one POST /v1/generate gives for the same parameters.
    want = oracle(server, {"prompt": prompt, "width": width, "height": height, "steps": 4, "seed": 1234})
    assert max_diff(png_pixels(shown_png(page, "#result img")), want) <= 1

    timings = page.inner_text("#timings")  # every figure the server gave, none missing ("–")
    assert re.search(r"queue [\d.]+ ms · compute [\d.]+ ms · total [\d.]+ ms · batch of 1 image\b", timings), timings
    assert "seed 1234" in page.inner_text("#used-seed")
    assert answer["images"][0]["seed"] == 1234

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


def test_a_random_seed_is_shown_and_reused(page):
    page.fill("#prompt", "a blue door")
    page.fill("#steps", "2")
    page.fill("#seed", "-1")
    body, _, first = generate(page)
    assert body["seed"] == -1
    seed = first["images"][0]["seed"]
    assert seed >= 0 and f"seed {seed}" in page.inner_text("#used-seed")
    first_png = shown_png(page, "#result img")

    page.click("#reuse-seed")
    assert page.input_value("#seed") == str(seed)
    body, _, again = generate(page)
    assert body["seed"] == seed and again["images"][0]["seed"] == seed
    assert max_diff(png_pixels(shown_png(page, "#result img")), png_pixels(first_png)) <= 1

    page.fill("#seed", "-1")  # the history's "use seed" sets it too
    page.locator("#history .entry").nth(1).locator(".use-seed").click()
    assert page.input_value("#seed") == str(seed)


def test_img2img_from_an_upload(server, page, tmp_path: Path):
    sent = watch_generate_requests(page)
    page.check("#mode-img2img")
    assert page.is_visible("#init-section") and page.is_hidden("#mask-tools")
    page.fill("#prompt", "a watercolor harbour")
    page.click("#generate")  # no init image yet: the page says so and sends nothing
    page.wait_for_function("() => document.getElementById('error').textContent !== ''")
    assert "init image" in page.inner_text("#error") and sent == []

    path = tmp_path / "init.png"
    init_image(SIZE, seed=3).save(path)
    upload(page, path)
    assert page.input_value("#width") == str(SIZE) and page.input_value("#height") == str(SIZE)
    page.fill("#strength", "0.6")
    page.fill("#steps", "4")
    page.fill("#seed", "7")
    body, _, answer = generate(page)
    assert body["strength"] == 0.6 and "mask" not in body
    assert max_diff(data_url_pixels(body["init_image"]), np.asarray(PIL.Image.open(path).convert("RGB"))) == 0
    assert answer["images"][0]["params"]["kind"] == "img2img"
    want = oracle(server, {"prompt": "a watercolor harbour", "init_image": b64_of(path), "strength": 0.6,
                           "steps": 4, "seed": 7})
    assert max_diff(png_pixels(shown_png(page, "#result img")), want) <= 1
    assert "img2img · seed 7 · 4 steps" in page.inner_text("#history .entry >> nth=0")
    assert "strength 0.6" in page.inner_text("#history .entry >> nth=0")


def test_img2img_from_a_result_in_the_history(server, page):
    page.fill("#prompt", "a stone bridge")
    page.fill("#steps", "2")
    page.fill("#seed", "31")
    _, _, txt = generate(page)
    source = png_pixels(txt["images"][0]["b64_png"])

    page.locator("#history .entry").first.locator(".use-init").click()
    page.wait_for_selector("#canvas-box", state="visible")
    assert page.is_checked("#mode-img2img")
    page.fill("#prompt", "a stone bridge at night")
    page.fill("#strength", "0.5")
    page.fill("#seed", "32")
    body, _, answer = generate(page)
    assert max_diff(data_url_pixels(body["init_image"]), source) == 0  # the result itself is the init image
    want = oracle(server, {"prompt": "a stone bridge at night", "init_image": txt["images"][0]["b64_png"],
                           "strength": 0.5, "steps": 2, "seed": 32})
    assert max_diff(png_pixels(shown_png(page, "#result img")), want) <= 1
    assert page.locator("#history .entry").count() == 2
    assert "img2img · seed 32" in page.inner_text("#history .entry >> nth=0")


def test_inpainting_with_a_painted_mask(server, page, tmp_path: Path):
    sent = watch_generate_requests(page)
    path = tmp_path / "init.png"
    init_image(SIZE, seed=5).save(path)
    page.check("#mode-inpaint")
    upload(page, path)
    assert page.is_visible("#mask-tools") and page.is_visible("#mask-canvas")
    page.fill("#prompt", "a red balloon")
    page.fill("#steps", "3")
    page.fill("#seed", "41")

    set_range(page, "#brush", 12)
    drag(page, [(8, 16), (56, 16)])  # a band across the top: rows ~10-22 painted
    page.click("#clear-mask")
    page.click("#generate")  # an empty mask: the page asks for one and sends nothing
    page.wait_for_function("() => document.getElementById('error').textContent !== ''")
    assert "Paint" in page.inner_text("#error") and sent == []

    drag(page, [(8, 16), (56, 16)])
    page.check("#eraser")
    set_range(page, "#brush", 8)
    drag(page, [(32, 2), (32, 30)])  # erased again: columns ~28-36 of the band
    page.uncheck("#eraser")
    body, _, answer = generate(page)

    mask = data_url_pixels(body["mask"], "L")
    assert mask.shape == (SIZE, SIZE)
    assert set(np.unique(mask)) <= {0, 255}  # white where painted, black elsewhere: nothing in between
    for y, x in [(16, 12), (16, 20), (16, 44), (16, 52), (12, 16), (20, 48)]:
        assert mask[y, x] == 255, (y, x)
    for y, x in [(16, 32), (40, 16), (48, 48), (2, 2), (16, 62), (28, 20)]:
        assert mask[y, x] == 0, (y, x)
    assert answer["images"][0]["params"]["kind"] == "inpaint"
    assert max_diff(data_url_pixels(body["init_image"]), np.asarray(PIL.Image.open(path).convert("RGB"))) == 0
    want = oracle(server, {"prompt": "a red balloon", "init_image": b64_of(path), "mask": body["mask"],
                           "steps": 3, "seed": 41})
    shown = png_pixels(shown_png(page, "#result img"))
    assert max_diff(shown, want) <= 1
    assert "inpaint · seed 41" in page.inner_text("#history .entry >> nth=0")


def test_lora_picker(server, page):
    assert page.locator("#lora-name option").all_inner_texts() == [LORA]
    page.fill("#prompt", "a red bicycle")
    page.fill("#steps", "3")
    page.fill("#seed", "11")
    page.fill("#lora-scale", "0.8")
    page.click("#lora-add")
    assert page.locator("#lora-list li").count() == 1
    body, _, answer = generate(page)
    assert body["loras"] == [{"name": LORA, "scale": 0.8}]
    shown = png_pixels(shown_png(page, "#result img"))
    plain = {"prompt": "a red bicycle", "steps": 3, "seed": 11}
    assert max_diff(shown, oracle(server, {**plain, "loras": [{"name": LORA, "scale": 0.8}]})) <= 1
    assert max_diff(shown, oracle(server, plain)) > 1  # the adapter changed the picture
    assert f"LoRA {LORA} × 0.8" in page.inner_text("#history .entry >> nth=0")

    page.click("#lora-list .lora-remove")
    assert page.locator("#lora-list li").count() == 0


def test_history_download_and_api_key(page, tmp_path: Path):
    page.click("#key-box summary")
    page.fill("#api-key", "key-for-this-tab")
    page.press("#api-key", "Tab")  # change: stored for this tab
    assert page.evaluate("() => sessionStorage.getItem('sd-playground-api-key')") == "key-for-this-tab"
    page.fill("#prompt", "a green hill")
    page.fill("#steps", "2")
    answers = []
    for seed in (21, 22):
        page.fill("#seed", str(seed))
        _, headers, answer = generate(page)
        assert headers["authorization"] == "Bearer key-for-this-tab"
        answers.append(answer)
    entries = page.locator("#history .entry")
    assert entries.count() == 2
    sampler = answers[1]["images"][0]["params"]["sampler"]
    assert f"txt2img · seed 22 · 2 steps · {sampler} · {SIZE}×{SIZE}" in entries.nth(0).inner_text()  # newest first
    assert "seed 21" in entries.nth(1).inner_text() and "a green hill" in entries.nth(1).inner_text()

    with page.expect_download(timeout=WAIT_MS) as download:
        entries.nth(1).locator("a.download").click()
    assert download.value.suggested_filename == "sd-21.png"
    saved = tmp_path / "download.png"
    download.value.save_as(saved)
    with PIL.Image.open(saved) as png:
        assert png.format == "PNG"
        assert "Seed: 21" in png.text["parameters"]  # the server's A1111 parameters chunk, kept
        assert max_diff(np.asarray(png.convert("RGB")), png_pixels(answers[0]["images"][0]["b64_png"])) == 0
