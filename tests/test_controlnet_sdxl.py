"""ControlNet on `tiny-xl` (SDXL: the nets also take the added text and size conditioning): a seeded random SDXL
ControlNet built with ONNX Runtime against diffusers' StableDiffusionXLControlNetPipeline on the same folders."""
from __future__ import annotations

import numpy as np
import pytest

from engine.control import Control
from engine.pipeline import Pipeline
from engine.request import Request
from tests.helpers import PROMPTS, gens, max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

SIZE = 64


@pytest.fixture(scope="module")
def net(xl_conditioned_parts):
    return xl_conditioned_parts["edges"]


@pytest.fixture(scope="module")
def ours(xl_conditioned_engines):
    """The session's tiny-xl engines with this net (and an IP-Adapter no request here uses)."""
    pipe = Pipeline.load(xl_conditioned_engines)
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
