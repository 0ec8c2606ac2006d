"""The x4 upscaler (family `sd-upscaler`): the seeded tiny-upscaler built for ONNX Runtime fp32 vs diffusers'
StableDiffusionUpscalePipeline on the same folder (two samplers at two noise levels with two seeds in one batch,
every other sampler on one image), then the size and metadata, the bad input, the CLI and the server."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.pipeline import Pipeline
from engine.png import parameters_text
from engine.request import Request, RequestError
from engine.upscale import LowResImage
from export.families import UPSCALER
from tests.a1111 import parse_a1111
from tests.helpers import PROMPTS, b64_png, gens, init_image, max_diff, png_pixels, running_server, to_uint8
from tests.sampler_cases import diffusers_scheduler

SEEDS = [5, 17]
STEPS = 8
LOW = (24, 16)  # the low-resolution images' (width, height): the images out are 96x64


@pytest.fixture(scope="module")
def pipe(upscaler_engines):
    p = Pipeline.load(upscaler_engines)
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference(upscaler_folder):
    from diffusers import StableDiffusionUpscalePipeline

    ref = StableDiffusionUpscalePipeline.from_pretrained(upscaler_folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return ref


def _low(seed: int) -> Image.Image:
    return init_image(32, seed).resize(LOW, Image.BICUBIC)


def _requests(sampler: str, level: int, **kw) -> list[Request]:
    return [Request(prompt=p, init_image=_low(s), steps=STEPS, guidance_scale=7.0, sampler=sampler, seed=s,
                    noise_level=level, **kw) for p, s in zip(PROMPTS, SEEDS, strict=True)]


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
@pytest.mark.parametrize("level", [20, 200])
def test_upscaler_matches_diffusers(pipe, reference, sampler, level):
    """Each seed's image alone in a batch of two: its image noise, then its latents, from its own generator."""
    reference.scheduler = diffusers_scheduler(sampler, pipe.scheduler_config)
    want = to_uint8(reference(PROMPTS, image=[_low(s) for s in SEEDS], num_inference_steps=STEPS, guidance_scale=7.0,
                              noise_level=level, generator=gens(SEEDS), output_type="np").images)
    got = pipe.run(_requests(sampler, level), progress=False, batch_size=2)
    pixels = np.stack([g.pixels for g in got])
    assert want.std() > 5 and pixels.shape == want.shape == (2, 4 * LOW[1], 4 * LOW[0], 3)
    assert max_diff(pixels, want) <= 2, (sampler, level)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_2m_karras", "lcm"])
def test_every_other_sampler_matches_diffusers(pipe, reference, sampler):
    reference.scheduler = diffusers_scheduler(sampler, pipe.scheduler_config)
    want = to_uint8(reference(PROMPTS[:1], image=[_low(SEEDS[0])], num_inference_steps=STEPS, guidance_scale=7.0,
                              noise_level=20, generator=gens(SEEDS[:1]), output_type="np").images)
    got = pipe.run(_requests(sampler, 20)[:1], progress=False)[0].pixels
    assert want.std() > 5 and max_diff(got[None], want) <= 2, sampler


def test_the_noise_level_and_the_image_both_steer_it(pipe):
    """Not a txt2img that ignores its inputs: another level (the class label and the image's noise) or another
    image gives another picture."""
    one = pipe.run(_requests("ddim", 20)[:1], progress=False)[0].pixels
    other_level = pipe.run(_requests("ddim", 300)[:1], progress=False)[0].pixels
    other_image = pipe.run([Request(prompt=PROMPTS[0], init_image=_low(99), steps=STEPS, guidance_scale=7.0,
                                    sampler="ddim", seed=SEEDS[0], noise_level=20)], progress=False)[0].pixels
    assert max_diff(one, other_level) > 10 and max_diff(one, other_image) > 10


def test_the_image_out_is_4x_and_records_its_noise_level(pipe):
    got = pipe.run(Request(prompt="x", init_image=_low(1), steps=2), progress=False)[0]
    assert got.pixels.shape == (4 * LOW[1], 4 * LOW[0], 3)
    assert got.params["noise_level"] == UPSCALER.low_res.default_noise_level == 20
    info = parse_a1111(parameters_text(got.params))
    assert info["Noise level"] == "20" and (info["Size-1"], info["Size-2"]) == (str(4 * LOW[0]), str(4 * LOW[1]))


@pytest.mark.parametrize("kwargs, message, field", [
    ({"init_image": None}, r"img2img only: give an init image", "init_image"),
    ({"noise_level": 351}, r"noise_level 351 is outside \[0, 350\]", "noise_level"),
    ({"noise_level": -1}, r"noise_level -1 must be an integer >= 0", "noise_level"),
    ({"noise_level": 2.5}, r"noise_level 2.5 must be an integer", "noise_level"),
    ({"strength": 0.5}, r"strength 0.5 is not for the x4 upscaler", "strength"),
    ({"mask": "mask"}, r"cannot inpaint", "mask"),
    ({"init_image": "big"}, r"init image 2056x2056 would be upscaled to 8224x8224, past this engine's largest "
                            r"8192x8192: give a smaller image \(at most 2048x2048\)", "init_image"),
    ({"height": 100}, r"height 100 must be a positive multiple of 8", "height"),
    ({"hires_scale": 2}, r"hires", "hires_scale"),
    ({"original_size": (64, 64)}, r"takes no original_size", "original_size"),
])
def test_bad_upscales_are_refused_naming_the_field(pipe, kwargs, message, field):
    kw = {"prompt": "x", "steps": 2, "init_image": _low(0)}
    if kwargs.get("init_image") == "big":
        kwargs["init_image"] = init_image(2056)  # ONNX Runtime takes the export range: 8192 per side
    if kwargs.get("mask") == "mask":
        kwargs["mask"] = Image.new("L", LOW, 255)
    with pytest.raises(RequestError, match=message) as err:
        pipe.prepare(Request(**{**kw, **kwargs}))
    assert err.value.field == field


def test_a_model_max_noise_level_below_350_is_its_limit(tmp_path, pipe):
    files = tmp_path / "files"
    (files / "low_res_scheduler").mkdir(parents=True)
    (files / "low_res_scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "scaled_linear"}))
    (files / "model_index.json").write_text(json.dumps({"max_noise_level": 100}))
    noise = LowResImage.load(files, UPSCALER.low_res)
    assert noise.max_noise_level == 100
    noise.check(Request(noise_level=100))
    with pytest.raises(RequestError, match=r"noise_level 101 is over this model's max_noise_level 100") as err:
        noise.check(Request(noise_level=101))
    assert err.value.field == "noise_level"
    # the engine's own table is DDPM's on the folder's betas: 0.0001 .. 0.02, scaled_linear, 1000 steps
    from diffusers import DDPMScheduler

    want = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear").alphas_cumprod
    assert pipe.low_res is not None
    assert float((pipe.low_res.alphas_cumprod - want).abs().max()) == 0.0


def test_cli_upscales_a_file_and_refuses_a_bad_level(upscaler_engines, tmp_path, pipe):
    low, out = tmp_path / "low.png", tmp_path / "x.png"
    _low(2).save(low)
    args = [sys.executable, "-m", "engine.generate", "--engine-dir", str(upscaler_engines), "--prompt", PROMPTS[0],
            "--steps", "4", "--scheduler", "euler", "--seed", "3", "--init-image", str(low), "--output", str(out)]
    done = subprocess.run([*args, "--noise-level", "50"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = pipe.run(Request(prompt=PROMPTS[0], steps=4, sampler="euler", seed=3, init_image=low, noise_level=50),
                    progress=False)[0]
    pixels = png_pixels(out.read_bytes())
    assert pixels.shape == (4 * LOW[1], 4 * LOW[0], 3) and max_diff(pixels, want.pixels) <= 1
    assert "Noise level: 50" in Image.open(out).info["parameters"]
    bad = subprocess.run([*args, "--noise-level", "400"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--noise-level" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.fixture(scope="module")
def server(upscaler_engines, tmp_path_factory):
    with running_server(upscaler_engines, tmp_path_factory.mktemp("serve-upscaler"), "--max-size", "128") as s:
        yield s


def test_server_upscales_and_refuses_naming_the_field(server, pipe):
    """Warm-up ran an upscale (the model takes no txt2img); /v1/generate gives the library's image; a level past
    350 and an image whose 4x is over --max-size are 400s naming their field."""
    low = _low(4)
    want = pipe.run(Request(prompt=PROMPTS[1], steps=4, sampler="ddim", seed=4, init_image=low, noise_level=30),
                    progress=False)[0].pixels
    body = {"prompt": PROMPTS[1], "steps": 4, "sampler": "ddim", "seed": 4, "init_image": b64_png(np.asarray(low)),
            "noise_level": 30}
    status, data, _ = server.post("/v1/generate", body)
    assert status == 200, data
    got = png_pixels(json.loads(data)["images"][0]["b64_png"])
    assert got.shape == want.shape == (4 * LOW[1], 4 * LOW[0], 3) and max_diff(got, want) <= 1
    for change, field in (({"noise_level": 351}, "noise_level"),
                          ({"init_image": b64_png(np.asarray(init_image(48)))}, "init_image"),
                          ({"init_image": None}, "init_image")):
        status, data, _ = server.post("/v1/generate", {**body, **change})
        assert status == 400 and json.loads(data)["error"]["param"] == field, (change, data)
