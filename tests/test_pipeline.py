"""txt2img end to end on `tiny` through the Request API: our pipeline vs diffusers' StableDiffusionPipeline,
per-image seeds, batch invariance, reuse of schedules and step graphs, bad input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine import samplers
from engine.config import Profile
from engine.pipeline import Pipeline
from engine.request import Request
from export.specs import Shape
from tests.helpers import PROMPTS, Wrapped, gens, max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler


@pytest.fixture(scope="module")
def ours(ort_engines) -> Pipeline:
    return Pipeline.load(ort_engines)  # the only model there: no name needed


@pytest.fixture(scope="module")
def reference(ours):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ours.info["source"], safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, scheduler: str, config: dict, steps: int, guidance: float, seeds: list[int], size: int,
                     negative: str = "", prompts: list[str] = PROMPTS) -> np.ndarray:
    pipe.scheduler = diffusers_scheduler(scheduler, config)
    out = pipe(prompts, negative_prompt=[negative] * len(prompts), num_inference_steps=steps,
               guidance_scale=guidance, height=size, width=size, output_type="np", generator=gens(seeds)).images
    return to_uint8(out)  # what diffusers' numpy_to_pil does


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras"])
def test_matches_diffusers_pipeline(ours, reference, scheduler):
    ref = diffusers_images(reference, scheduler, ours.scheduler_config, 12, 7.5, [1234, 77], 128, "low quality")
    reqs = [Request(prompt=p, negative_prompt="low quality", steps=12, sampler=scheduler, seed=s, height=128, width=128)
            for p, s in zip(PROMPTS, [1234, 77], strict=True)]
    got = stack_pixels(ours.run(reqs, progress=False, batch_size=2))
    assert got.shape == ref.shape == (2, 128, 128, 3) and got.dtype == np.uint8
    assert ref.std() > 10  # a real image, not a constant
    assert max_diff(got, ref) <= 2, scheduler


def test_ancestral_sampler_matches_with_same_noise(ours, reference):
    ref = diffusers_images(reference, "euler_a", ours.scheduler_config, 8, 5.0, [99, 100], 64)
    got = ours.run([Request(prompt=p, steps=8, guidance_scale=5.0, sampler="euler_a", seed=s, height=64, width=64)
                    for p, s in zip(PROMPTS, [99, 100], strict=True)], progress=False, batch_size=2)
    assert max_diff(stack_pixels(got), ref) <= 2


def test_no_guidance_runs_unet_once_per_step(ours, reference):
    unet = ours.runners["unet"]
    ours.runners["unet"] = spy = Wrapped(unet)
    try:
        got = ours.run([Request(prompt=p, steps=5, guidance_scale=1.0, sampler="ddim", seed=3, height=64, width=64)
                        for p in PROMPTS], progress=False, batch_size=2)
    finally:
        ours.runners["unet"] = unet
    assert [c["sample"][0] for c in spy.calls] == [2] * 5  # B rows, not 2B
    ref = diffusers_images(reference, "ddim", ours.scheduler_config, 5, 1.0, [3, 3], 64)
    assert max_diff(stack_pixels(got), ref) <= 2


def test_image_k_uses_seed_plus_k_and_regenerates_alone(ours):
    many = ours.run(Request(prompt="a cat", steps=3, seed=40, images=3, height=64, width=64), progress=False,
                    batch_size=3)
    assert [r.params["seed"] for r in many] == [40, 41, 42] and [r.params["index"] for r in many] == [0, 1, 2]
    for r in many:
        alone = ours.run(Request(prompt="a cat", steps=3, seed=r.params["seed"], height=64, width=64), progress=False)
        assert max_diff(alone[0].pixels, r.pixels) <= 1
    assert max_diff(many[0].pixels, many[1].pixels) > 10  # different seeds, different images


def test_random_seed_is_recorded_and_reproduces(ours):
    first = ours.run(Request(prompt="a dog", steps=3, seed=-1, height=64, width=64), progress=False)[0]
    seed = first.params["seed"]
    assert isinstance(seed, int) and seed >= 0
    again = ours.run(Request(prompt="a dog", steps=3, seed=seed, height=64, width=64), progress=False)[0]
    assert np.array_equal(first.pixels, again.pixels)


def test_pixels_do_not_depend_on_batch_mates(ours):
    """Per-row seeds, guidance and noise: the same request alone and inside a batch of others."""
    target = Request(prompt="a lighthouse", steps=6, sampler="euler_a", guidance_scale=6.0, seed=5, height=64, width=64)
    others = [Request(prompt="a storm", steps=6, sampler="euler_a", guidance_scale=9.0, seed=11, height=64, width=64,
                      negative_prompt="blurry"),
              Request(prompt="", steps=6, sampler="euler_a", guidance_scale=3.0, seed=12, images=2, height=64, width=64)]
    alone = ours.run(target, progress=False)[0]
    batched = ours.run([others[0], target, others[1]], progress=False, batch_size=4)
    assert [r.params["prompt"] for r in batched] == ["a storm", "a lighthouse", "", ""]
    assert max_diff(batched[1].pixels, alone.pixels) <= 1
    assert max_diff(batched[0].pixels, alone.pixels) > 10


def test_schedules_and_step_buffers_are_reused_without_warmup(ours, monkeypatch):
    built = []
    real = samplers.make_schedule
    monkeypatch.setattr(samplers, "make_schedule", lambda *a, **k: built.append(a) or real(*a, **k))
    unet = ours.runners["unet"]
    ours.runners["unet"] = spy = Wrapped(unet)
    try:
        req = Request(prompt="x", steps=4, sampler="lcm", seed=1, height=64, width=64)
        a = ours.run(req, progress=False)
        b = ours.run(dataclasses.replace(req, seed=2), progress=False)
    finally:
        ours.runners["unet"] = unet
    assert len(built) == 1  # the lcm tables of 4 steps were made once, then reused
    assert len(spy.calls) == 8  # 4 UNet calls per run, no warm-up step
    assert max_diff(a[0].pixels, b[0].pixels) > 0


@pytest.mark.parametrize("prompt", ["", "🚀 décor naïve 東京 \u200b\n\t", "word " * 200])
def test_odd_prompts_work(ours, prompt):
    req = Request(prompt=prompt, steps=2, sampler="ddim", height=64, width=64)  # 200 words: 3 chunks of 75 tokens
    if len(prompt) > 500:
        with pytest.warns(UserWarning, match="truncated"):  # plain syntax: cut at 77 tokens, with a warning
            ours.run(Request(**{**vars(req), "prompt_syntax": "plain"}), progress=False)
    r = ours.run(req, progress=False)
    assert r[0].pixels.shape == (64, 64, 3)
    assert set(r[0].timings_ms) >= {"clip", "unet", "unet_per_step", "vae", "total"}


def test_long_prompt_is_truncated_to_77_tokens(ours):
    ids = ours.tokenize(["word " * 200])
    assert ids.shape == (1, 77) and ids[0, 0].item() == 49406 and ids[0, -1].item() == 49407


def test_any_exported_size_and_batch_runs_without_a_profile(ours):
    """ONNX Runtime takes every batch and size the graphs were exported with, not only the built one."""
    r = ours.run([Request(prompt="x", steps=1, height=48, width=160, images=3)], progress=False, batch_size=3)
    assert [x.pixels.shape for x in r] == [(48, 160, 3)] * 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=100), "multiple of 16"),
        (dict(steps=0), r"steps 0 must be in \[1, 1000\]"),
        (dict(steps=1001), r"steps 1001 must be in \[1, 1000\]"),
        (dict(guidance_scale=-1.0), "guidance scale -1.0"),
        (dict(sampler="plms"), "dpmpp_2m_karras"),
        (dict(seed=2**64), r"seed 18446744073709551616 must be in \[0, 2\*\*64-1\]"),
        (dict(seed=-2), r"seed -2 must be in"),
        (dict(images=0), r"images per prompt 0 must be in \[1, 64\]"),
        (dict(strength=0.5), "strength needs an init image"),
    ],
)
def test_bad_input_is_named(ours, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ours.run(Request(**(dict(prompt="x", steps=2, height=64, width=64) | kwargs)), progress=False)


def test_static_profile_limits_are_named(ours):
    static = Pipeline(ours.runners, ours.tokenizers, ours.scheduler_config, ours.family, ours.dims,
                      Profile(Shape(2, 64, 64), Shape(2, 64, 128), Shape(2, 128, 128)), ours.info)
    with pytest.raises(ValueError, match=r"height 256 is outside the built profile \[64, 128\]"):
        static.run(Request(prompt="x", height=256, width=64), progress=False)
    # one image on a batch-2 static profile: padded to the profile's batch, one image back
    r = static.run(Request(prompt="x", steps=2), progress=False)
    assert len(r) == 1 and r[0].pixels.shape == (64, 128, 3)


def test_nan_output_is_an_error_not_an_image(ours):
    vae = ours.runners["vae_decoder"]
    # what an fp16 overflow looks like downstream
    ours.runners["vae_decoder"] = Wrapped(vae, lambda r, **inputs: {"images": r(**inputs)["images"] * float("inf")})
    try:
        with pytest.raises(RuntimeError, match="vae_decoder produced NaN/Inf"):
            ours.run(Request(prompt="x", steps=2, height=64, width=64), progress=False)
    finally:
        ours.runners["vae_decoder"] = vae
