"""The SDXL refiner on `tiny-xl-refiner` (a StableDiffusionXLImg2ImgPipeline folder: text_encoder_2 only,
aesthetic-score time ids) through the Request API vs diffusers' own StableDiffusionXLImg2ImgPipeline on the
same seeded model (ONNX Runtime fp32, 64x64)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.pipeline import Pipeline
from engine.request import Request
from export.families import SDXL_REFINER, detect_family, get_family
from export.families.sdxl import REFINER_TIME_IDS
from export.specs import Dims
from tests.helpers import PROMPTS, gens, init_image, max_diff, to_uint8
from tests.sampler_cases import diffusers_scheduler

SEEDS = [11, 29]
SIZE = 64
STEPS = 10


@pytest.fixture(scope="module")
def refiner(xl_pair_engines, xl_refiner_folder):
    """(our tiny-xl-refiner pipeline with its default components, its diffusers folder)."""
    pipe = Pipeline.load(xl_pair_engines, "tiny-xl-refiner")
    yield pipe, xl_refiner_folder
    pipe.close()


@pytest.fixture(scope="module")
def reference(refiner):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner[1], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_refiner_folder_and_family(refiner):
    from export.models import folder_dims
    from export.presets import SDXL_PRESETS

    pipe, folder = refiner
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"]
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert not (folder / "text_encoder").exists() and (folder / "text_encoder_2").is_dir()
    assert detect_family(folder) is SDXL_REFINER is get_family("sdxl-refiner") and pipe.family is SDXL_REFINER
    preset = SDXL_PRESETS["tiny-xl-refiner"]
    assert preset.family == "sdxl-refiner" and preset.time_ids == REFINER_TIME_IDS == 5
    assert folder_dims(folder) == pipe.dims == Dims(text_dim=32, text2_dim=32, pooled_dim=32, time_ids=5,
                                                    vae_scale=8, unet_scale=2, residual_channels=(32, 32, 32, 64, 64),
                                                    residual_scales=(1, 1, 2, 2, 2), vae_sample_size=128)  # tiny-xl's UNet down path
    assert set(pipe.runners) == {"clip2", "unet", "vae_decoder", "vae_encoder"}  # the default components
    assert SDXL_REFINER.spec("unet").input_shapes(pipe.dims, 2, SIZE, SIZE)["time_ids"] == (2, 5)


@pytest.mark.parametrize("strength", [0.3, 0.7])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_refiner_matches_diffusers(refiner, reference, sampler, strength):
    pipe, _ = refiner
    reference.scheduler = diffusers_scheduler(sampler, pipe.scheduler_config)
    image = init_image(SIZE, seed=9)
    ref = reference(PROMPTS, image=[image] * 2, strength=strength, num_inference_steps=STEPS, guidance_scale=6.0,
                    output_type="np", generator=gens(SEEDS)).images
    ref = to_uint8(ref)
    got = pipe.run([Request(prompt=p, steps=STEPS, guidance_scale=6.0, sampler=sampler, seed=s, init_image=image,
                            strength=strength, height=SIZE, width=SIZE) for p, s in zip(PROMPTS, SEEDS, strict=True)],
                   progress=False, batch_size=2)
    assert got[0].params["aesthetic_score"] == 6.0 and got[0].params["negative_aesthetic_score"] == 2.5
    assert got[0].params["original_size"] == [SIZE, SIZE] and "target_size" not in got[0].params
    got = np.stack([g.pixels for g in got])
    assert ref.std() > 5 and got.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert max_diff(got, ref) <= 2, (sampler, strength)


def test_refiner_time_ids_match_diffusers(refiner, reference):
    """Non-default aesthetic scores, original size and crop (the negative rows: crop (0, 0), as diffusers)."""
    pipe, _ = refiner
    reference.scheduler = diffusers_scheduler("ddim", pipe.scheduler_config)
    image, kw = init_image(SIZE, seed=9), dict(aesthetic_score=8.0, negative_aesthetic_score=1.0)
    ref = reference(PROMPTS, image=[image] * 2, strength=0.7, num_inference_steps=STEPS, guidance_scale=6.0,
                    original_size=(160, 96), crops_coords_top_left=(16, 8), output_type="np",
                    generator=gens(SEEDS), **kw).images
    ref = to_uint8(ref)
    got = pipe.run([Request(prompt=p, steps=STEPS, guidance_scale=6.0, sampler="ddim", seed=s, init_image=image,
                            strength=0.7, height=SIZE, width=SIZE, original_size=(160, 96), crop=(16, 8), **kw)
                    for p, s in zip(PROMPTS, SEEDS, strict=True)], progress=False, batch_size=2)
    assert got[1].params["crop"] == [16, 8] and got[1].params["aesthetic_score"] == 8.0
    got = np.stack([g.pixels for g in got])
    assert max_diff(got, ref) <= 2


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"\(sdxl-refiner\) is img2img only: give an init image"),
    ({"target_size": (64, 64)}, "model family 'sdxl-refiner' takes no target_size"),
    ({"crop": (64, 0), "init": True}, r"crop 64 0 is outside original_size 64 64"),
    ({"aesthetic_score": float("nan"), "init": True}, "aesthetic_score nan must be a finite number"),
])
def test_refiner_refuses(refiner, kwargs, message):
    pipe, _ = refiner
    init = init_image(SIZE, seed=9) if kwargs.pop("init", False) or "target_size" in kwargs else None
    with pytest.raises(ValueError, match=message):
        pipe.run(Request(prompt="x", steps=2, height=SIZE, width=SIZE, init_image=init, **kwargs), progress=False)
