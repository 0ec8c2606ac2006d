"""SDXL inpainting on `tiny-xl` (a 4-channel UNet: latent blending) vs diffusers' own
StableDiffusionXLInpaintPipeline on the same seeded model (ONNX Runtime fp32, 64x64)."""
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
STEPS = 6


@pytest.fixture(scope="module")
def xl_inpaint(xl_pipeline, xl_folder):
    """(our tiny-xl pipeline with the VAE encoder, its diffusers folder)."""
    return xl_pipeline, xl_folder


@pytest.fixture(scope="module")
def reference(xl_inpaint):
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(xl_inpaint[1], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_reference_is_a_latent_blending_sdxl_inpaint(reference):
    """What the parity below compares against: a 4-channel UNet (diffusers blends latents) and
    SDXL's zeroed unconditional rows for an empty negative prompt."""
    assert reference.unet.config.in_channels == 4
    assert reference.config.force_zeros_for_empty_prompt
    assert not reference.config.requires_aesthetics_score


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_sdxl_inpainting_matches_diffusers(xl_inpaint, reference, sampler, strength):
    pipe, _ = xl_inpaint
    assert pipe.family.can_inpaint(pipe.dims) and not pipe.dims.inpainting_unet
    _check_inpaint_parity(pipe, reference, sampler, strength, image_seed=1)


def _check_inpaint_parity(pipe, reference, sampler: str, strength: float, image_seed: int) -> None:
    """Our pipeline's inpainted images vs diffusers' on the same prompts, seeds, image and mask (≤ 2/255)."""
    reference.scheduler = diffusers_scheduler(sampler, pipe.scheduler_config)
    image, mask = init_image(seed=image_seed), mask_image()
    # one image per prompt: with a single image diffusers would encode it with the first generator only;
    # padding_mask_crop stays None (diffusers' default: no crop, no overlay)
    ref = to_uint8(reference(PROMPTS, image=[image] * 2, mask_image=[mask] * 2, strength=strength,
                             num_inference_steps=STEPS, guidance_scale=6.0, generator=gens(SEEDS), height=SIZE,
                             width=SIZE, output_type="np").images)
    reqs = [Request(prompt=p, steps=STEPS, guidance_scale=6.0, sampler=sampler, seed=s, init_image=image, mask=mask,
                    strength=strength, height=SIZE, width=SIZE) for p, s in zip(PROMPTS, SEEDS, strict=True)]
    got = np.stack([r.pixels for r in pipe.run(reqs, progress=False, batch_size=2)])
    assert got.shape == ref.shape == (2, SIZE, SIZE, 3) and ref.std() > 5
    assert max_diff(got, ref) <= 2, f"{sampler} strength {strength}"


@pytest.mark.parametrize("kind", ["inpaint", "img2img"])
def test_default_strength_is_diffusers_sdxl_default(xl_inpaint, kind):
    """No strength given: SDXL's pipelines use 0.9999 (inpainting) and 0.3 (img2img), not SD's 1.0 / 0.8."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    pipe, folder = xl_inpaint
    cls = StableDiffusionXLInpaintPipeline if kind == "inpaint" else StableDiffusionXLImg2ImgPipeline
    ref_pipe = cls.from_pretrained(folder, local_files_only=True)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = diffusers_scheduler("ddim", pipe.scheduler_config)
    image, mask = init_image(seed=2), mask_image()
    extra = {"mask_image": [mask] * 2} if kind == "inpaint" else {}
    ref = to_uint8(ref_pipe(PROMPTS, image=[image] * 2, num_inference_steps=STEPS, guidance_scale=6.0,
                            generator=gens(SEEDS), height=SIZE, width=SIZE, output_type="np", **extra).images)
    reqs = [Request(prompt=p, steps=STEPS, guidance_scale=6.0, sampler="ddim", seed=s, init_image=image,
                    mask=mask if kind == "inpaint" else None, height=SIZE, width=SIZE)
            for p, s in zip(PROMPTS, SEEDS, strict=True)]
    out = pipe.run(reqs, progress=False, batch_size=2)
    assert out[0].params["strength"] == (0.9999 if kind == "inpaint" else 0.3)
    assert max_diff(np.stack([r.pixels for r in out]), ref) <= 2


@pytest.fixture(scope="module")
def xl_inpaint_9ch(tmp_path_factory, engine_cache):
    """(our tiny-xl-inpaint pipeline: a 9-channel SDXL inpainting UNet, diffusers' pipeline on its folder)."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from export.models import materialize_preset
    from export.presets import ALL_PRESETS

    folder = materialize_preset(ALL_PRESETS["tiny-xl-inpaint"])
    engine_dir = tmp_path_factory.mktemp("xl_inpaint_9ch_engines")
    result = build_all(BuildConfig(model="tiny-xl-inpaint", backend="onnxruntime", precision="fp32",
                                   engine_dir=engine_dir, batch_size=2, height=SIZE, width=SIZE), progress=False)
    ref = StableDiffusionXLInpaintPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return Pipeline.load(engine_dir), ref, result


@pytest.mark.parametrize(("sampler", "strength"), [("ddim", 1.0), ("euler_a", 0.7)])
def test_sdxl_9_channel_inpainting_matches_diffusers(xl_inpaint_9ch, sampler, strength):
    pipe, reference, result = xl_inpaint_9ch
    assert reference.unet.config.in_channels == 9 and pipe.dims.inpainting_unet
    assert "vae_encoder" in result.record["components"]  # an inpainting UNet builds its encoder by default
    _check_inpaint_parity(pipe, reference, sampler, strength, image_seed=4)
