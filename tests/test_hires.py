"""A1111's hires fix (engine/hires.py) against the same two passes composed from diffusers' pipelines on `tiny`:
txt2img at 64² (`output_type="latent"` for the latent upscalers, an image for Lanczos), the upscale (torch's
interpolate on the latents, as A1111's "Latent"; PIL's Lanczos on the pixels), then StableDiffusionImg2ImgPipeline at
128² with a generator seeded again with the image's seed; ≤ 2/255. Both passes in the parameters; bad options
named."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.png import parameters_text
from engine.request import Request, RequestError
from tests.a1111 import parse_a1111
from tests.helpers import Wrapped, max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

PROMPT, NEGATIVE = "a lighthouse on a cliff", "blurry"
BASE, STEPS, SEED = 64, 4, 11


@pytest.fixture(scope="module")
def diffusers_pair(tiny_folder, ort_pipeline):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    txt = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None, requires_safety_checker=False,
                                                  local_files_only=True)
    txt.scheduler = diffusers_scheduler("euler", ort_pipeline.scheduler_config)
    img = StableDiffusionImg2ImgPipeline(**txt.components)
    for p in (txt, img):
        p.set_progress_bar_config(disable=True)
    return txt, img


def composed(pair, upscaler: str, scale: float, strength: float, steps2: int, seed: int) -> np.ndarray:
    """diffusers' txt2img then img2img, the upscale between them as A1111's hires fix does it."""
    txt, img = pair
    size = int(BASE * scale)
    common = {"negative_prompt": NEGATIVE, "guidance_scale": 7.5}
    if upscaler == "lanczos":
        first = txt(PROMPT, num_inference_steps=STEPS, height=BASE, width=BASE,
                    generator=torch.Generator().manual_seed(seed), **common).images[0]
        start = first.resize((size, size), Image.LANCZOS)
    else:
        latents = txt(PROMPT, num_inference_steps=STEPS, height=BASE, width=BASE, output_type="latent",
                      generator=torch.Generator().manual_seed(seed), **common).images
        mode = "nearest" if upscaler == "latent-nearest" else "bilinear"
        start = torch.nn.functional.interpolate(latents, size=(size // 8, size // 8), mode=mode, antialias=False)
    out = img(PROMPT, image=start, strength=strength, num_inference_steps=steps2, output_type="np",
              generator=torch.Generator().manual_seed(seed), **common).images
    return to_uint8(out)


def ours(pipe, upscaler: str, scale: float = 2.0, strength: float = 0.6, steps2: int | None = 5, images: int = 1):
    req = Request(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="euler", seed=SEED, height=BASE,
                  width=BASE, images=images, hires_scale=scale, hires_steps=steps2, hires_strength=strength,
                  hires_upscaler=upscaler)
    return pipe.run([req], progress=False)


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "lanczos"])
def test_hires_fix_matches_diffusers_txt2img_then_img2img(ort_pipeline, diffusers_pair, upscaler):
    (got,) = ours(ort_pipeline, upscaler)
    assert got.pixels.shape == (128, 128, 3)
    want = composed(diffusers_pair, upscaler, 2.0, 0.6, 5, SEED)
    assert max_diff(got.pixels[None], want) <= 2


def test_each_image_is_its_seeds_and_both_passes_are_recorded(ort_pipeline, diffusers_pair):
    got = ours(ort_pipeline, "latent", scale=1.5, strength=0.5, steps2=None, images=2)
    want = np.concatenate([composed(diffusers_pair, "latent", 1.5, 0.5, STEPS, SEED + k) for k in range(2)])
    assert max_diff(stack_pixels(got), want) <= 2 and got[0].pixels.shape == (96, 96, 3)
    fields = parse_a1111(parameters_text(got[1].params))
    assert (fields["Size-1"], fields["Size-2"]) == ("64", "64") and fields["Seed"] == str(SEED + 1) and fields["Hires upscale"] == "1.5"
    assert fields["Hires upscaler"] == "Latent" and fields["Denoising strength"] == "0.5"
    assert "Hires steps" not in fields  # none given: the first pass's steps, as A1111 writes it
    recorded = parse_a1111(parameters_text(ours(ort_pipeline, "lanczos", steps2=3)[0].params))
    assert recorded["Hires upscaler"] == "Lanczos" and recorded["Hires steps"] == "3"


@pytest.mark.parametrize(("fields", "field"), [
    ({"hires_scale": 1.0}, "hires_scale"), ({"hires_scale": 4.5}, "hires_scale"),
    ({"hires_scale": 1.1}, "hires_scale"),  # 70x70: not a multiple of the model's 16
    ({"hires_scale": 2.0, "hires_steps": 0}, "hires_steps"), ({"hires_scale": 2.0, "hires_strength": 0.0},
                                                             "hires_strength"),
    ({"hires_scale": 2.0, "hires_upscaler": "x4"}, "hires_upscaler"),
    ({"hires_scale": 2.0, "init_image": "x.png"}, "hires_scale"),
])
def test_bad_hires_options_are_named(ort_pipeline, fields, field):
    with pytest.raises(RequestError) as caught:
        ort_pipeline.prepare(Request(prompt="x", height=BASE, width=BASE, **fields))
    assert caught.value.field == field, str(caught.value)


def test_lanczos_needs_the_vae_encoder(torch_engines):
    from engine.pipeline import Pipeline

    pipe = Pipeline.load(torch_engines)  # built without the VAE encoder
    try:
        with pytest.raises(RequestError, match="needs the vae_encoder engine") as caught:
            pipe.prepare(Request(prompt="x", height=BASE, width=BASE, hires_scale=2.0, hires_upscaler="lanczos"))
        assert caught.value.field == "hires_upscaler"
        pipe.prepare(Request(prompt="x", height=BASE, width=BASE, hires_scale=2.0))  # latent: no encoder needed
    finally:
        pipe.close()


def test_the_cli_runs_it(ort_engines, ort_pipeline, tmp_path):
    from engine import generate

    out = tmp_path / "h.png"
    assert generate.main(["--engine-dir", str(ort_engines), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                          "--steps", str(STEPS), "--scheduler", "euler", "--seed", str(SEED), "--height", str(BASE),
                          "--width", str(BASE), "--hires-scale", "2", "--hires-steps", "5", "--hires-strength", "0.6",
                          "--output", str(out)]) == 0
    (want,) = ours(ort_pipeline, "latent")
    assert max_diff(np.asarray(Image.open(out).convert("RGB")), want.pixels) <= 1


def test_a_flight_refuses_a_two_pass_request(ort_pipeline):
    """Step batching's flight cannot run a second pass: it says so instead of running the first pass alone."""
    from engine.continuous import Flight

    prepared = ort_pipeline.prepare(Request(prompt="x", steps=2, height=BASE, width=BASE, hires_scale=2))
    with pytest.raises(ValueError, match="a request with hires_scale runs two passes, which a flight does not take"):
        Flight(ort_pipeline, max_batch=2).admit(prepared.rows(0), [None])


def test_sdxl_second_pass_takes_its_own_size_conditioning(xl_pipeline, xl_folder):
    """SDXL: the second pass's time ids are those of its own size (as diffusers' img2img at that size defaults them),
    not the first pass's; and the recorded request stays the one asked for."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    txt = StableDiffusionXLPipeline.from_pretrained(xl_folder, local_files_only=True)
    txt.scheduler = diffusers_scheduler("euler", xl_pipeline.scheduler_config)
    img = StableDiffusionXLImg2ImgPipeline(**txt.components)
    for p in (txt, img):
        p.set_progress_bar_config(disable=True)
    common = {"negative_prompt": NEGATIVE, "guidance_scale": 6.0}
    latents = txt(PROMPT, num_inference_steps=STEPS, height=BASE, width=BASE, output_type="latent",
                  generator=torch.Generator().manual_seed(SEED), **common).images
    start = torch.nn.functional.interpolate(latents, size=(2 * BASE // 8, 2 * BASE // 8), mode="bilinear",
                                            antialias=False)
    want = to_uint8(img(PROMPT, image=start, strength=0.6, num_inference_steps=5, output_type="np",
                        generator=torch.Generator().manual_seed(SEED), **common).images)
    seen: list[list[float]] = []  # each UNet call's first time ids row (a tiny model barely shows them in pixels)
    unet = xl_pipeline.runners["unet"]
    xl_pipeline.runners["unet"] = Wrapped(unet, lambda r, **x: seen.append(x["time_ids"][0].tolist()) or r(**x))
    try:
        (got,) = xl_pipeline.run([Request(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, sampler="euler",
                                          seed=SEED, guidance_scale=6.0, height=BASE, width=BASE, hires_scale=2,
                                          hires_steps=5, hires_strength=0.6)], progress=False)
    finally:
        xl_pipeline.runners["unet"] = unet
    first, second = [BASE, BASE, 0, 0, BASE, BASE], [2 * BASE, 2 * BASE, 0, 0, 2 * BASE, 2 * BASE]
    assert seen[0] == first and seen[-1] == second and len(seen) == STEPS + 3  # 5 steps at strength 0.6: 3
    assert got.pixels.shape == (2 * BASE, 2 * BASE, 3) and max_diff(got.pixels, want[0]) <= 2
    assert got.params["original_size"] == [BASE, BASE] and got.params["height"] == BASE
