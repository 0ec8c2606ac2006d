"""ControlNet on `tiny-xl` (SDXL: the nets also take the added text and size conditioning): a seeded random SDXL
ControlNet built with ONNX Runtime against diffusers' StableDiffusionXLControlNetPipeline on the same folders."""
from __future__ import annotations

import numpy as np
import pytest

from engine.control import Control
from engine.pipeline import Pipeline
from engine.request import Request
from export.control import random_controlnet
from tests.helpers import PROMPTS, gens, max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

SIZE = 64


@pytest.fixture(scope="module")
def xl_folder(engine_cache):
    from export.models import resolve_model

    return resolve_model("tiny-xl")[0]


@pytest.fixture(scope="module")
def net(tmp_path_factory, xl_folder):
    return random_controlnet(xl_folder, tmp_path_factory.mktemp("xl_nets") / "xl_edges", 21, (8, 16, 16, 32), std=0.3)


@pytest.fixture(scope="module")
def ours(tmp_path_factory, net):
    from engine.build import build_all
    from engine.config import BuildConfig

    engine_dir = tmp_path_factory.mktemp("xl_control_engines")
    build_all(BuildConfig(model="tiny-xl", backend="onnxruntime", precision="fp32", height=SIZE, width=SIZE,
                          engine_dir=engine_dir, controlnets=(str(net),)), progress=False)
    pipe = Pipeline.load(engine_dir)
    yield pipe
    pipe.close()


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((SIZE, SIZE, 3)) > 0.9).astype(np.uint8) * 255  # sparse white dots on black


@pytest.mark.parametrize("guess", [False, True])
def test_sdxl_controlnet_matches_diffusers(ours, xl_folder, net, guess):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    image = _image(1)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(xl_folder, controlnet=ControlNetModel.from_pretrained(net),
                                                               local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("euler", ours.scheduler_config)
    ref = to_uint8(pipe(PROMPTS, image=Image.fromarray(image), num_inference_steps=6, guidance_scale=5.0, height=SIZE,
                        width=SIZE, output_type="np", generator=gens([3, 4]), controlnet_conditioning_scale=0.7,
                        control_guidance_end=0.8, guess_mode=guess).images)
    reqs = [Request(prompt=p, steps=6, sampler="euler", seed=s, guidance_scale=5.0, height=SIZE, width=SIZE,
                    controls=(Control("xl_edges", image, 0.7, 0.0, 0.8),), guess_mode=guess)
            for p, s in zip(PROMPTS, [3, 4], strict=True)]
    got = stack_pixels(ours.run(reqs, progress=False))
    assert max_diff(got, ref) <= 2
    plain = stack_pixels(ours.run([Request(prompt=r.prompt, steps=6, sampler="euler", seed=r.seed, guidance_scale=5.0,
                                           height=SIZE, width=SIZE) for r in reqs], progress=False))
    assert max_diff(got, plain) > 8  # the net changes the image
