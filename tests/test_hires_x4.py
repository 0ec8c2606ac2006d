"""The hires fix with the x4 upscaler between its passes (`hires_upscaler="x4"`): tiny and tiny-upscaler in one
engine dir (ONNX Runtime fp32) vs the same three steps composed from diffusers' pipelines on the same seeded folders:
StableDiffusionPipeline at 64², StableDiffusionUpscalePipeline on its image (the image's seed), the 4x image resized
with Lanczos to the target, then StableDiffusionImg2ImgPipeline there with a generator seeded again; ≤ 2/255."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from engine.pipeline import Pipeline
from engine.png import parameters_text
from engine.request import Request, RequestError
from tests.a1111 import parse_a1111
from tests.helpers import max_diff, to_uint8
from tests.sampler_cases import diffusers_scheduler

PROMPT, NEGATIVE = "a lighthouse on a cliff", "blurry"
BASE, STEPS, SEED = 32, 4, 11


@pytest.fixture(scope="module")
def pipe(upscaler_pair_engines):
    p = Pipeline.load(upscaler_pair_engines, "tiny")
    yield p
    p.close()


def _request(**kw) -> Request:
    return Request(**{"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": STEPS, "sampler": "euler", "seed": SEED,
                      "height": BASE, "width": BASE, "hires_scale": 3.0, "hires_steps": 5, "hires_strength": 0.6,
                      "hires_upscaler": "x4", **kw})


def test_hires_x4_matches_diffusers_txt2img_upscale_img2img(pipe, tiny_folder, upscaler_folder):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionUpscalePipeline

    txt = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None, requires_safety_checker=False,
                                                  local_files_only=True)
    txt.scheduler = diffusers_scheduler("euler", pipe.scheduler_config)
    img = StableDiffusionImg2ImgPipeline(**txt.components)
    up = StableDiffusionUpscalePipeline.from_pretrained(upscaler_folder, local_files_only=True)
    up.scheduler = diffusers_scheduler("euler", up.scheduler.config)
    for p in (txt, img, up):
        p.set_progress_bar_config(disable=True)
    common = {"negative_prompt": NEGATIVE, "guidance_scale": 7.5}
    first = txt(PROMPT, num_inference_steps=STEPS, height=BASE, width=BASE,
                generator=torch.Generator().manual_seed(SEED), **common).images[0]
    big = up(PROMPT, image=first, num_inference_steps=STEPS, noise_level=40,
             generator=torch.Generator().manual_seed(SEED), **common).images[0]
    assert big.size == (4 * BASE, 4 * BASE)
    start = big.resize((3 * BASE, 3 * BASE), Image.LANCZOS)
    want = to_uint8(img(PROMPT, image=start, strength=0.6, num_inference_steps=5, output_type="np",
                        generator=torch.Generator().manual_seed(SEED), **common).images)
    (got,) = pipe.run([_request(noise_level=40)], progress=False)
    assert got.pixels.shape == (3 * BASE, 3 * BASE, 3) and want.std() > 5
    assert max_diff(got.pixels[None], want) <= 2
    # not the Lanczos upscale of the first pass: the upscaler's image is what matches
    (lanczos,) = pipe.run([_request(hires_upscaler="lanczos")], progress=False)
    assert max_diff(lanczos.pixels, want[0]) > 10
    fields = parse_a1111(parameters_text(got.params))
    assert fields["Hires upscaler"] == "SD x4 upscaler" and fields["Noise level"] == "40"


def test_hires_x4_refusals_name_the_field(pipe, ort_pipeline):
    for kw, field, message in (
            ({"noise_level": 400}, "noise_level", r"noise_level 400 is outside \[0, 350\]"),
            ({"hires_upscaler": "latent", "noise_level": 30}, "noise_level", "noise_level is the x4 upscaler's"),
    ):
        with pytest.raises(RequestError, match=message) as err:
            pipe.prepare(_request(**kw))
        assert err.value.field == field
    with pytest.raises(RequestError, match=r"hires_upscaler x4 needs the x4 upscaler: .* holds no sd-upscaler model") \
            as err:
        ort_pipeline.prepare(_request())  # an engine dir without one
    assert err.value.field == "hires_upscaler"
