"""DDIM's eta on Stable Diffusion: the seeded `tiny` (ONNX Runtime fp32) vs diffusers' StableDiffusionPipeline with
DDIMScheduler and the same eta: each step's noise from the image's own generator, after its latents (the pipeline
passes its generators to the scheduler's step); two seeds in one batch, ≤ 2/255; the metadata."""
from __future__ import annotations

import numpy as np
import pytest

from engine.png import parameters_text
from engine.request import Request
from tests.a1111 import parse_a1111
from tests.helpers import PROMPTS, gens, max_diff, sd_pipe, to_uint8
from tests.sampler_cases import diffusers_scheduler

SEEDS, STEPS, SIZE = [3, 8], 6, 64


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_diffusers(ort_pipeline, tiny_folder, eta):
    ref = sd_pipe(tiny_folder)
    ref.scheduler = diffusers_scheduler("ddim", ort_pipeline.scheduler_config)
    want = to_uint8(ref(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, eta=eta, generator=gens(SEEDS),
                        output_type="np").images)
    got = ort_pipeline.run([Request(prompt=p, height=SIZE, width=SIZE, steps=STEPS, sampler="ddim", eta=eta, seed=s)
                            for p, s in zip(PROMPTS, SEEDS, strict=True)], progress=False, batch_size=2)
    assert max_diff(np.stack([g.pixels for g in got]), want) <= 2
    plain = ort_pipeline.run(Request(prompt=PROMPTS[0], height=SIZE, width=SIZE, steps=STEPS, sampler="ddim",
                                     seed=SEEDS[0]), progress=False)[0]
    assert max_diff(plain.pixels, want[0]) > 10  # the noise is what matches
    assert parse_a1111(parameters_text(got[0].params))["Eta"] == str(eta)
