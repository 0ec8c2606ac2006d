"""SDXL base -> refiner in one request (`refiner_switch`): tiny-xl and tiny-xl-refiner built into one engine dir
(ONNX Runtime fp32, 64x64) vs diffusers' StableDiffusionXLPipeline (`denoising_end`, `output_type="latent"`) whose
latents go to its StableDiffusionXLImg2ImgPipeline (`denoising_start`), on the same seeded models; then the
metadata, the bad input, the CLI and the server (its own route and A1111's refiner fields)."""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest

from engine.pipeline import Pipeline
from engine.png import parameters_text
from engine.request import Request, RequestError
from tests.a1111 import parse_a1111
from tests.helpers import PROMPTS, gens, init_image, max_diff, png_pixels, running_server, to_uint8
from tests.sampler_cases import diffusers_scheduler

SEEDS = [5, 17]
SIZE = 64
STEPS = 10


@pytest.fixture(scope="module")
def base(xl_pair_engines):
    pipe = Pipeline.load(xl_pair_engines, "tiny-xl")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def reference(xl_folder, xl_refiner_folder):
    """diffusers' base and refiner pipelines on the same folders."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    first = StableDiffusionXLPipeline.from_pretrained(xl_folder, local_files_only=True)
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(xl_refiner_folder, local_files_only=True)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    return first, second


def _requests(sampler: str, switch: float, **kw) -> list[Request]:
    return [Request(prompt=p, steps=STEPS, guidance_scale=6.0, sampler=sampler, seed=s, height=SIZE, width=SIZE,
                    refiner_switch=switch, **kw) for p, s in zip(PROMPTS, SEEDS, strict=True)]


@pytest.mark.parametrize("sampler, switch", [("euler_a", 0.8), ("dpmpp_2m", 0.5), ("ddim", 0.8)])
def test_handoff_matches_diffusers_base_then_refiner(base, reference, sampler, switch):
    """euler_a: both passes' per-step noise from generators seeded again; dpmpp_2m: the refiner's first step is
    first order (a fresh scheduler), the base's last is not; each seed's image alone, in a batch of two."""
    first, second = reference
    first.scheduler = diffusers_scheduler(sampler, base.scheduler_config)
    refiner = base.companion("sdxl-refiner")
    second.scheduler = diffusers_scheduler(sampler, refiner.scheduler_config)
    latents = first(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=6.0, denoising_end=switch,
                    output_type="latent", generator=gens(SEEDS)).images
    want = second(PROMPTS, image=latents, num_inference_steps=STEPS, guidance_scale=6.0, denoising_start=switch,
                  output_type="np", generator=gens(SEEDS)).images
    want = to_uint8(want)
    got = base.run(_requests(sampler, switch), progress=False, batch_size=2)
    pixels = np.stack([g.pixels for g in got])
    assert want.std() > 5 and pixels.shape == want.shape == (2, SIZE, SIZE, 3)
    assert max_diff(pixels, want) <= 2, (sampler, switch)
    # not the base alone, nor the refiner's img2img of something else: the handoff is what matches
    alone = base.run(Request(prompt=PROMPTS[0], steps=STEPS, guidance_scale=6.0, sampler=sampler, seed=SEEDS[0],
                             height=SIZE, width=SIZE), progress=False)[0].pixels
    assert max_diff(alone, want[0]) > 10


def test_handoff_records_both_models_as_a1111_does(base):
    got = base.run(_requests("euler", 0.8, aesthetic_score=7.0)[:1], progress=False)[0]
    params = got.params
    assert params["refiner_switch"] == 0.8 and params["refiner"] == "tiny-xl-refiner"
    assert params["model"] == "tiny-xl" and params["aesthetic_score"] == 7.0
    info = parse_a1111(parameters_text(params))
    assert info["Refiner"] == "tiny-xl-refiner" and info["Refiner switch at"] == "0.8"
    plain = base.run(Request(prompt="x", steps=2, height=SIZE, width=SIZE), progress=False)[0].params
    assert "refiner_switch" not in plain and "Refiner" not in parse_a1111(parameters_text(plain))


def test_the_refiner_takes_its_aesthetic_score(base, reference):
    """aesthetic_score reaches the refiner's time ids (the base takes none): as diffusers' refiner call with it."""
    first, second = reference
    first.scheduler = diffusers_scheduler("ddim", base.scheduler_config)
    second.scheduler = diffusers_scheduler("ddim", base.companion("sdxl-refiner").scheduler_config)
    latents = first(PROMPTS[:1], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=6.0, denoising_end=0.6,
                    output_type="latent", generator=gens(SEEDS[:1])).images
    want = to_uint8(second(PROMPTS[:1], image=latents, num_inference_steps=STEPS, guidance_scale=6.0,
                           denoising_start=0.6, aesthetic_score=9.0, negative_aesthetic_score=1.0, output_type="np",
                           generator=gens(SEEDS[:1])).images)
    got = base.run(_requests("ddim", 0.6, aesthetic_score=9.0, negative_aesthetic_score=1.0)[:1], progress=False)
    assert max_diff(got[0].pixels, want[0]) <= 2


@pytest.mark.parametrize("kwargs, message, field", [
    ({"refiner_switch": 1.0}, r"refiner_switch 1.0 must be a number in \(0, 1\)", "refiner_switch"),
    ({"refiner_switch": 0}, r"refiner_switch 0 must be a number in \(0, 1\)", "refiner_switch"),
    ({"refiner_switch": True}, r"refiner_switch True must be", "refiner_switch"),
    ({"refiner_switch": float("nan")}, r"refiner_switch nan must be", "refiner_switch"),
    ({"refiner_switch": 0.05}, r"at 10 steps gives the base 0 and the refiner 10 steps: each needs one at least",
     "refiner_switch"),
    ({"refiner_switch": 0.99}, r"gives the base 10 and the refiner 0 steps", "refiner_switch"),
    ({"refiner_switch": 0.8, "hires_scale": 2}, "hires_scale and refiner_switch cannot be combined", "refiner_switch"),
    ({"refiner_switch": 0.8, "init": True}, "the refiner handoff is a txt2img option", "refiner_switch"),
])
def test_bad_handoffs_are_refused_naming_the_field(base, kwargs, message, field):
    kw = {"prompt": "x", "steps": STEPS, "height": SIZE, "width": SIZE}
    if kwargs.pop("init", False):
        kw["init_image"] = init_image(SIZE)
    with pytest.raises(RequestError, match=message) as err:
        base.prepare(Request(**{**kw, **kwargs}))
    assert err.value.field == field


def test_a_model_without_a_refiner_beside_it_says_so(xl_pipeline, ort_pipeline):
    with pytest.raises(RequestError, match=r"holds no sdxl-refiner model \(it holds tiny-xl \(sdxl\)\): build one") \
            as err:
        xl_pipeline.prepare(Request(prompt="x", steps=4, refiner_switch=0.8))
    assert err.value.field == "refiner_switch"
    with pytest.raises(RequestError, match=r"\(sd\) hands over to no refiner: the handoff is for SDXL base models"):
        ort_pipeline.prepare(Request(prompt="x", steps=4, refiner_switch=0.8))


def test_cli_hands_over_and_refuses_a_bad_switch(xl_pair_engines, tmp_path, base):
    out = tmp_path / "x.png"
    args = [sys.executable, "-m", "engine.generate", "--engine-dir", str(xl_pair_engines), "--model", "tiny-xl",
            "--prompt", PROMPTS[0], "--steps", str(STEPS), "--scheduler", "euler", "--seed", "3", "--guidance-scale",
            "6", "--height", str(SIZE), "--width", str(SIZE), "--output", str(out)]
    done = subprocess.run([*args, "--refiner-switch", "0.8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = base.run(Request(prompt=PROMPTS[0], steps=STEPS, sampler="euler", seed=3, guidance_scale=6.0, height=SIZE,
                            width=SIZE, refiner_switch=0.8), progress=False)[0]
    assert max_diff(png_pixels(out.read_bytes()), want.pixels) <= 1
    bad = subprocess.run([*args, "--refiner-switch", "1.5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--refiner-switch" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.fixture(scope="module")
def server(xl_pair_engines, tmp_path_factory):
    with running_server(xl_pair_engines, tmp_path_factory.mktemp("serve-refiner"), "--model", "tiny-xl") as s:
        yield s


def test_server_and_a1111_route_hand_over(server, base):
    assert json.loads(server.get("/v1/info")[1])["refiner"] == "tiny-xl-refiner"
    want = base.run(Request(prompt=PROMPTS[1], steps=STEPS, sampler="euler", seed=4, guidance_scale=6.0, height=SIZE,
                            width=SIZE, refiner_switch=0.7), progress=False)[0].pixels
    status, data, _ = server.post("/v1/generate", {"prompt": PROMPTS[1], "steps": STEPS, "sampler": "euler",
                                                   "seed": 4, "guidance_scale": 6.0, "height": SIZE, "width": SIZE,
                                                   "refiner_switch": 0.7})
    assert status == 200, data
    assert max_diff(png_pixels(json.loads(data)["images"][0]["b64_png"]), want) <= 1
    body = {"prompt": PROMPTS[1], "steps": STEPS, "sampler_name": "Euler", "seed": 4, "cfg_scale": 6.0,
            "height": SIZE, "width": SIZE, "refiner_checkpoint": "tiny-xl-refiner", "refiner_switch_at": 0.7}
    status, data, _ = server.post("/sdapi/v1/txt2img", body)
    assert status == 200, data
    answer = json.loads(data)
    want = base.run(Request(prompt=PROMPTS[1], negative_prompt="", steps=STEPS, sampler="euler", seed=4,
                            guidance_scale=6.0, height=SIZE, width=SIZE, refiner_switch=0.7), progress=False)[0].pixels
    assert max_diff(png_pixels(base64.b64decode(answer["images"][0])), want) <= 1  # A1111's negative prompt: ""
    assert "Refiner: tiny-xl-refiner, Refiner switch at: 0.7" in json.loads(answer["info"])["infotexts"][0]
    for change, field in (({"refiner_checkpoint": "other"}, "refiner_checkpoint"),
                          ({"refiner_switch_at": None}, "refiner_switch_at"),
                          ({"refiner_switch_at": 1.2}, "refiner_switch_at")):
        status, data, _ = server.post("/sdapi/v1/txt2img", {**body, **change})
        assert status == 400 and json.loads(data)["error"]["param"] == field, (change, data)
    status, data, _ = server.post("/v1/generate", {"prompt": "x", "refiner_switch": 1})
    assert status == 400 and json.loads(data)["error"]["param"] == "refiner_switch", data
