"""img2img and inpainting (4-channel latent blending and 9-channel inpainting UNets) vs diffusers' own
StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline on the same seeded tiny models."""
from __future__ import annotations

import numpy as np
import pytest

from engine.build import build_all
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from engine.request import Request
from tests.helpers import PROMPTS, gens, init_image, mask_image, max_diff, to_uint8
from tests.sampler_cases import diffusers_scheduler

SEEDS = [21, 8]
SIZE = 64


def diffusers_inpaint(ref_pipe, sampler, config, image, mask, strength) -> np.ndarray:
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = diffusers_scheduler(sampler, config)
    # one image per prompt: with a single image diffusers would encode it with the first generator only
    return to_uint8(ref_pipe(PROMPTS, image=[image] * 2, mask_image=[mask] * 2, strength=strength,
                             num_inference_steps=8, guidance_scale=7.5, generator=gens(SEEDS), height=SIZE,
                             width=SIZE, output_type="np").images)


@pytest.fixture(scope="module")
def ours(ort_pipeline) -> Pipeline:
    return ort_pipeline  # tiny on ONNX Runtime with the VAE encoder, shared by the session


@pytest.fixture(scope="module")
def components(ours):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(ours.info["source"], safety_checker=None,
                                                   local_files_only=True).components


def ours_images(pipe, sampler, steps, guidance, strength, image, mask=None):
    reqs = [Request(prompt=p, steps=steps, guidance_scale=guidance, sampler=sampler, seed=s, init_image=image,
                    mask=mask, strength=strength, height=SIZE, width=SIZE) for p, s in zip(PROMPTS, SEEDS, strict=True)]
    return np.stack([r.pixels for r in pipe.run(reqs, progress=False, batch_size=2)])


@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_img2img_matches_diffusers(ours, components, sampler, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref_pipe = StableDiffusionImg2ImgPipeline(**components)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = diffusers_scheduler(sampler, ours.scheduler_config)
    image = init_image()
    ref = to_uint8(ref_pipe(PROMPTS, image=image, strength=strength, num_inference_steps=10, guidance_scale=7.5,
                            generator=gens(SEEDS), output_type="np").images)
    got = ours_images(ours, sampler, 10, 7.5, strength, image)
    assert got.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert max_diff(got, ref) <= 2, f"{sampler} strength {strength}"
    assert max_diff(got[0], np.asarray(image)) > 5  # it did change the picture


def test_lower_strength_stays_closer_to_the_init_image(ours):
    image = init_image(seed=3)
    far = [max_diff(ours_images(ours, "ddim", 10, 7.5, s, image)[0], np.asarray(image)) for s in (0.2, 0.9)]
    assert far[0] < far[1]


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_inpainting_by_latent_blending_matches_diffusers(ours, components, sampler, strength):
    from diffusers import StableDiffusionInpaintPipeline

    image, mask = init_image(seed=1), mask_image()
    ref = diffusers_inpaint(StableDiffusionInpaintPipeline(**components), sampler, ours.scheduler_config, image,
                            mask, strength)
    got = ours_images(ours, sampler, 8, 7.5, strength, image, mask)
    assert max_diff(got, ref) <= 2, f"{sampler} strength {strength}"


@pytest.fixture(scope="module")
def inpaint_engines(tmp_path_factory, engine_cache):
    from export.models import materialize_preset
    from export.presets import PRESETS

    folder = materialize_preset(PRESETS["tiny-inpaint"])
    engine_dir = tmp_path_factory.mktemp("inpaint_engines")
    build_all(BuildConfig(model="tiny-inpaint", backend="onnxruntime", engine_dir=engine_dir, batch_size=2,
                          height=SIZE, width=SIZE), progress=False)
    return engine_dir, folder


@pytest.fixture(scope="module")
def inpaint_pipes(inpaint_engines):
    """(our tiny-inpaint pipeline, diffusers' StableDiffusionInpaintPipeline on its folder), loaded once."""
    from diffusers import StableDiffusionInpaintPipeline

    engine_dir, folder = inpaint_engines
    pipe = Pipeline.load(engine_dir)
    yield pipe, StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    pipe.close()


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_inpainting_unet_matches_diffusers(inpaint_pipes, sampler, strength):
    pipe, ref_pipe = inpaint_pipes
    assert pipe.dims.unet_in_channels == 9 and "vae_encoder" in pipe.runners  # built by default for inpainting
    image, mask = init_image(seed=2), mask_image()
    ref = diffusers_inpaint(ref_pipe, sampler, pipe.scheduler_config, image, mask, strength)
    got = ours_images(pipe, sampler, 8, 7.5, strength, image, mask)
    assert max_diff(got, ref) <= 2, f"{sampler} strength {strength}"


def test_inpainting_model_refuses_txt2img(inpaint_pipes):
    pipe, _ = inpaint_pipes
    with pytest.raises(ValueError, match="inpainting model .*give an init image and a mask"):
        pipe.run(Request(prompt="x", steps=2), progress=False)


def test_mask_on_a_model_that_cannot_inpaint(ours):
    import dataclasses

    eight = Pipeline(ours.runners, ours.tokenizers, ours.scheduler_config, ours.family,
                     dataclasses.replace(ours.dims, unet_in_channels=8), ours.profile, ours.info)
    with pytest.raises(ValueError, match="cannot inpaint: its UNet takes 8 channels"):
        eight.run(Request(prompt="x", steps=2, init_image=init_image(), mask=mask_image(), height=SIZE, width=SIZE),
                  progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=0.0), r"strength 0.0 is outside \(0, 1\]"),
        (dict(strength=1.5), r"strength 1.5 is outside \(0, 1\]"),
        (dict(init_image=init_image(96)), "is 96x96 but the requested size is 64x64"),
        (dict(mask=mask_image(128)), "mask .*is 128x128 but the requested size is 64x64"),
        (dict(mask=mask_image()), None),  # a fine request, for contrast
    ],
)
def test_bad_images_are_named(ours, kwargs, message):
    req = Request(**(dict(prompt="x", steps=2, init_image=init_image(), height=SIZE, width=SIZE) | kwargs))
    if message is None:
        assert ours.run(req, progress=False)[0].pixels.shape == (SIZE, SIZE, 3)
    else:
        with pytest.raises(ValueError, match=message):
            ours.run(req, progress=False)


def test_resize_flag_resizes_instead_of_refusing(ours):
    r = ours.run(Request(prompt="x", steps=2, init_image=init_image(128), mask=mask_image(96), resize=True,
                         height=SIZE, width=SIZE), progress=False)
    assert r[0].pixels.shape == (SIZE, SIZE, 3)


def test_img2img_without_vae_encoder_names_the_rebuild(torch_engines):
    pipe = Pipeline.load(torch_engines)  # built with the default components: no vae_encoder
    with pytest.raises(ValueError, match="needs the vae_encoder engine.*--components clip,unet,vae_decoder,vae_encoder"):
        pipe.run(Request(prompt="x", steps=2, init_image=init_image()), progress=False)
