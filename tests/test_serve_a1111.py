"""AUTOMATIC1111's API (/sdapi/v1) through its own client, `webuiapi`, unchanged, against `python -m engine.serve`:
txt2img, img2img and inpainting give the pixels of POST /v1/generate for the same request, `<lora:name:weight>` those
of its `loras`; info and the PNG's `parameters` chunk agree; the lists name our model, samplers and adapters; what
the server cannot do is a 400 naming the field."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.png import model_name
from engine.sampler_registry import REGISTRY
from tests.helpers import b64_png, init_image, mask_image, max_diff, png_pixels, running_server, write_kohya

webuiapi = pytest.importorskip("webuiapi", reason="webuiapi (AUTOMATIC1111's client, the dev extra) is not installed")

SMALL = {"steps": 4, "width": 64, "height": 64, "cfg_scale": 7.0, "negative_prompt": "blurry"}
OURS = {"steps": 4, "width": 64, "height": 64, "guidance_scale": 7.0, "negative_prompt": "blurry"}
LORA = "kohya_21"


@pytest.fixture(scope="module")
def server(ort_engines, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("a1111_loras")
    write_kohya(lora_dir, 21, r=4, alpha=2.0)
    with running_server(ort_engines, tmp_path_factory.mktemp("serve_a1111"), "--lora-dir", str(lora_dir),
                        "--max-wait-ms", "0") as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


def generate(server, **body) -> list[np.ndarray]:
    """The pixels POST /v1/generate answers."""
    status, data, _ = server.post("/v1/generate", {**OURS, **body})
    assert status == 200, data
    return [png_pixels(image["b64_png"]) for image in json.loads(data)["images"]]


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in result.images]


def error(server, route: str, body: dict) -> dict:
    status, data, _ = server.post(f"/sdapi/v1/{route}", body)
    assert status == 400, (status, data)
    return json.loads(data)["error"]


def test_txt2img_gives_the_v1_generate_pixels_and_a1111_info(server, api):
    result = api.txt2img(prompt="a red bicycle", seed=7, sampler_name="Euler a", **SMALL)
    assert max_diff(pixels(result)[0], generate(server, prompt="a red bicycle", seed=7, sampler="euler_a")[0]) <= 1
    info = result.info
    assert (info["seed"], info["all_seeds"], info["sampler_name"], info["steps"]) == (7, [7], "Euler a", 4)
    assert (info["width"], info["height"], info["cfg_scale"], info["prompt"]) == (64, 64, 7.0, "a red bicycle")
    assert result.images[0].info["parameters"] == info["infotexts"][0]
    assert "Sampler: Euler a" in info["infotexts"][0] and "Seed: 7" in info["infotexts"][0]
    assert result.parameters["prompt"] == "a red bicycle" and result.parameters["seed"] == 7


def test_batch_size_and_n_iter_take_consecutive_seeds_and_minus_one_draws_one(server, api):
    result = api.txt2img(prompt="a lighthouse", seed=40, batch_size=2, n_iter=2, sampler_name="DPM++ 2M", **SMALL)
    assert result.info["all_seeds"] == [40, 41, 42, 43] and len(result.images) == 4
    assert [im.info["parameters"] for im in result.images] == result.info["infotexts"]
    want = generate(server, prompt="a lighthouse", seed=42, sampler="dpmpp_2m")[0]
    assert max_diff(pixels(result)[2], want) <= 1
    drawn = api.txt2img(prompt="a lighthouse", batch_size=2, sampler_name="DDIM", eta=0, **SMALL).info
    assert drawn["seed"] >= 0 and drawn["all_seeds"] == [drawn["seed"], drawn["seed"] + 1]


def test_img2img_gives_the_v1_generate_pixels(server, api):
    source = init_image(64, seed=3)
    result = api.img2img(images=[source], prompt="a watercolor", seed=5, denoising_strength=0.6,
                         sampler_name="Euler", **SMALL)
    want = generate(server, prompt="a watercolor", seed=5, sampler="euler", strength=0.6,
                    init_image=b64_png(np.asarray(source)))[0]
    assert max_diff(pixels(result)[0], want) <= 1
    assert result.info["denoising_strength"] == 0.6 and "Denoising strength: 0.6" in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # include_init_images is false


def test_inpainting_with_our_options_gives_the_v1_generate_pixels_and_defaults_are_refused(server, api):
    source, mask = init_image(64, seed=4), mask_image(64)
    result = api.img2img(images=[source], mask_image=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                         prompt="a door", seed=2, denoising_strength=0.8, sampler_name="Euler", **SMALL)
    want = generate(server, prompt="a door", seed=2, sampler="euler", strength=0.8,
                    init_image=b64_png(np.asarray(source)), mask=b64_png(np.asarray(mask)))[0]
    assert max_diff(pixels(result)[0], want) <= 1
    with pytest.raises(RuntimeError, match="mask_blur") as refused:  # webuiapi's defaults: blur 4, fill 0
        api.img2img(images=[source], mask_image=mask, prompt="a door", **SMALL)
    assert refused.value.args[0] == 400


def test_a_lora_tag_is_the_v1_generate_loras_and_an_unknown_one_is_refused(server, api):
    result = api.txt2img(prompt=f"a red bicycle <lora:{LORA}:0.8>", seed=9, sampler_name="Euler a", **SMALL)
    want = generate(server, prompt="a red bicycle", seed=9, sampler="euler_a", loras=[{"name": LORA, "scale": 0.8}])
    plain = generate(server, prompt="a red bicycle", seed=9, sampler="euler_a")
    assert max_diff(pixels(result)[0], want[0]) <= 1 and max_diff(pixels(result)[0], plain[0]) > 2
    assert f"<lora:{LORA}:0.8>" in result.images[0].info["parameters"]
    err = error(server, "txt2img", {"prompt": "x <lora:missing:1>", **SMALL})
    assert err["param"] == "prompt" and "'missing'" in err["message"], err
    assert "a1111_loras" not in err["message"]  # never the server's folder


def test_the_lists_name_our_model_samplers_and_loras(server, api):
    name = model_name(server.info["model"])
    models = api.get_sd_models()
    assert [(m["title"], m["model_name"]) for m in models] == [(name, name)]
    assert api.get_options()["sd_model_checkpoint"] == name
    assert [s["name"] for s in api.get_samplers()] == [s.a1111_name for s in REGISTRY.values()]
    assert api.get_loras() == [{"name": LORA, "alias": LORA, "path": f"{LORA}.safetensors", "metadata": {}}]
    progress = api.get_progress()
    assert progress["progress"] == 0.0 and progress["current_image"] is None
    assert progress["state"]["job_count"] == 0


def test_enable_hr_is_the_hires_fix_of_v1_generate(server, api):
    """webuiapi's hires fields (its defaults: hr_resize 0, no hr sampler, prompt or checkpoint) run engine/hires.py."""
    result = api.txt2img(prompt="a red fox", seed=3, sampler_name="Euler", enable_hr=True, hr_scale=2,
                         hr_upscaler="Latent (nearest)", hr_second_pass_steps=3, denoising_strength=0.6, **SMALL)
    want = generate(server, prompt="a red fox", seed=3, sampler="euler", hires_scale=2, hires_steps=3,
                    hires_strength=0.6, hires_upscaler="latent-nearest")[0]
    got = pixels(result)[0]
    assert got.shape == (128, 128, 3) and max_diff(got, want) <= 1
    text = result.info["infotexts"][0]
    assert "Hires upscale: 2" in text and "Hires steps: 3" in text and "Hires upscaler: Latent (nearest)" in text
    assert "Size: 64x64" in text and result.info["denoising_strength"] == 0.6


@pytest.mark.parametrize("route, field, value", [
    ("txt2img", "hr_upscaler", "R-ESRGAN 4x+"), ("txt2img", "hr_resize_x", 96), ("txt2img", "hr_prompt", "other"),
    ("txt2img", "hr_sampler_name", "DDIM"), ("txt2img", "hr_scheduler", "karras"), ("txt2img", "restore_faces", True), ("txt2img", "tiling", True),
    ("txt2img", "subseed_strength", 0.5), ("txt2img", "script_name", "x/y plot"), ("txt2img", "styles", ["cinema"]),
    ("txt2img", "alwayson_scripts", {"ControlNet": {"args": []}}), ("txt2img", "sampler_name", "Heun"),
    ("txt2img", "save_images", True), ("txt2img", "override_settings", {"sd_vae": "x"}),
    ("img2img", "resize_mode", 1), ("txt2img", "scheduler", "exponential"),
])
def test_what_the_server_cannot_do_is_a_400_naming_the_field(server, route, field, value):
    body = {"prompt": "x", **SMALL, field: value}
    if field.startswith("hr_"):  # checked with the hires fix on
        body["enable_hr"] = True
    if route == "img2img":
        body["init_images"] = [b64_png(np.asarray(init_image(64)))]
    err = error(server, route, body)
    assert err["param"].split(".")[0] == field and "allowed" in err["message"], err


def test_unknown_fields_are_ignored_and_a1111_field_names_are_in_errors(server):
    status, data, _ = server.post("/sdapi/v1/txt2img", {"prompt": "x", **SMALL, "seed": 1, "junk": 1,
                                                         "send_images": False})
    assert status == 200 and json.loads(data)["images"] == [], data
    assert error(server, "txt2img", {"prompt": "x", **SMALL, "cfg_scale": -1})["param"] == "cfg_scale"
    assert error(server, "txt2img", {"prompt": "x", **SMALL, "width": 60})["param"] == "width"
    assert error(server, "img2img", {"prompt": "x", **SMALL, "init_images": ["bad"]})["param"] == "init_images"


def test_the_openapi_document_has_the_a1111_routes_with_their_errors(server):
    status, data, _ = server.get("/openapi.json")
    doc = json.loads(data)
    assert status == 200
    for route in ("txt2img", "img2img"):
        responses = doc["paths"][f"/sdapi/v1/{route}"]["post"]["responses"]
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "get" in doc["paths"]["/sdapi/v1/sd-models"]



def test_every_a1111_route_is_counted_under_its_own_path(server):
    """The A1111 routes are labelled by their path in sd_http_requests_total (they were all "other")."""
    from engine.server.app import create_app
    from engine.server.config import ServeConfig
    from engine.server.guard import path_label

    paths = {getattr(r, "path", "") for r in create_app(ServeConfig()).routes}
    sdapi = sorted(p for p in paths if p.startswith("/sdapi/v1/"))
    assert len(sdapi) == 9, sdapi
    assert all(path_label(p) == p for p in sdapi), [p for p in sdapi if path_label(p) != p]
    server.get("/sdapi/v1/samplers")
    _, text, _ = server.get("/metrics")
    assert 'sd_http_requests_total{path="/sdapi/v1/samplers",status="200"}' in text.decode()


def test_progress_reports_the_running_step(server, api):
    """/progress names the running batch's step (request batching): polled during a 300-step txt2img, it is seen
    strictly between 0 and the step count, with its fraction; afterwards all is back to zero."""
    import threading
    import time

    answer: list = []
    body = {**SMALL, "prompt": "a long one", "steps": 300, "sampler_name": "Euler", "seed": 3}
    sender = threading.Thread(target=lambda: answer.append(server.post("/sdapi/v1/txt2img", body)))
    sender.start()
    seen: list[dict] = []
    deadline = time.monotonic() + 60
    while sender.is_alive() and time.monotonic() < deadline:
        state = api.get_progress()
        if 0 < state["state"]["sampling_step"] < state["state"]["sampling_steps"]:
            seen.append(state)
        time.sleep(0.02)
    sender.join(timeout=120)
    assert answer and answer[0][0] == 200, answer
    assert seen, "no step was reported while the request ran"
    assert all(s["state"]["sampling_steps"] == 300 and 0 < s["progress"] < 1 for s in seen), seen[:3]
    steps = [s["state"]["sampling_step"] for s in seen]
    assert steps == sorted(steps) and steps[-1] > steps[0], steps[:10]  # it moves forward
    assert api.get_progress()["state"]["sampling_step"] == 0
