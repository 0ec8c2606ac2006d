"""txt2img end to end on `tiny`: our pipeline vs diffusers' own StableDiffusionPipeline, same seed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.pipeline import Pipeline
from engine.samplers import diffusers_scheduler

PROMPTS = ["a watercolor painting of a lighthouse", "a red bicycle"]


@pytest.fixture(scope="module")
def ours(ort_engines) -> Pipeline:
    return Pipeline.from_engines(ort_engines, "tiny")


@pytest.fixture(scope="module")
def reference(ours):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ours.info["model_path"], safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, scheduler: str, config: dict, steps: int, guidance: float, seed: int, size: int,
                     negative: str = "") -> np.ndarray:
    pipe.scheduler = diffusers_scheduler(scheduler, config)
    out = pipe(PROMPTS, negative_prompt=[negative] * len(PROMPTS), num_inference_steps=steps,
               guidance_scale=guidance, height=size, width=size, output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed)).images
    return (out * 255).round().astype(np.uint8)  # what diffusers' numpy_to_pil does


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras"])
def test_matches_diffusers_pipeline(ours, reference, scheduler):
    ref = diffusers_images(reference, scheduler, ours.scheduler_config, 12, 7.5, 1234, 128, "low quality")
    got = ours(PROMPTS, "low quality", 12, 7.5, scheduler, 1234, 128, 128, progress=False).images
    assert got.shape == ref.shape == (2, 128, 128, 3) and got.dtype == np.uint8
    assert ref.std() > 10  # a real image, not a constant
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 2, f"{scheduler}: max pixel difference {diff.max()}"


def test_ancestral_sampler_matches_with_same_noise(ours, reference):
    ref = diffusers_images(reference, "euler_a", ours.scheduler_config, 8, 5.0, 99, 64)
    got = ours(PROMPTS, "", 8, 5.0, "euler_a", 99, 64, 64, progress=False).images
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2


def test_no_guidance_runs_unet_once_per_step(ours, reference):
    calls = []
    unet = ours.runners["unet"]

    def spy(**inputs):
        calls.append(inputs["sample"].shape[0])
        return unet(**inputs)

    ours.runners["unet"] = spy
    try:
        got = ours(PROMPTS, "", 5, 1.0, "ddim", 3, 64, 64, progress=False).images
    finally:
        ours.runners["unet"] = unet
    assert calls == [2] * 5  # B rows, not 2B
    ref = diffusers_images(reference, "ddim", ours.scheduler_config, 5, 1.0, 3, 64)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2


def test_seed_and_negative_prompt_change_the_image(ours):
    a = ours(PROMPTS, "", 4, 7.5, "euler", 1, 64, 64, progress=False).images
    assert np.array_equal(a, ours(PROMPTS, "", 4, 7.5, "euler", 1, 64, 64, progress=False).images)
    assert not np.array_equal(a, ours(PROMPTS, "", 4, 7.5, "euler", 2, 64, 64, progress=False).images)
    assert not np.array_equal(a, ours(PROMPTS, "dark", 4, 7.5, "euler", 1, 64, 64, progress=False).images)


@pytest.mark.parametrize("prompt", ["", "🚀 décor naïve 東京 \u200b\n\t", "word " * 200])
def test_odd_prompts_work(ours, prompt):
    if len(prompt) > 500:
        with pytest.warns(UserWarning, match="truncated"):
            r = ours([prompt], "", 2, 7.5, "ddim", 0, 64, 64, progress=False)
    else:
        r = ours([prompt], "", 2, 7.5, "ddim", 0, 64, 64, progress=False)
    assert r.images.shape == (1, 64, 64, 3)
    assert set(r.timings_ms) >= {"clip", "unet", "unet_per_step", "vae", "total"}


def test_long_prompt_is_truncated_to_77_tokens(ours):
    ids = ours.tokenize(["word " * 200])
    assert ids.shape == (1, 77) and ids[0, 0].item() == 49406 and ids[0, -1].item() == 49407


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=100), "multiple of 16"),
        (dict(height=512), r"outside the built profile \[64, 256\]"),
        (dict(steps=0), r"steps 0 must be in \[1, 1000\]"),
        (dict(steps=1001), r"steps 1001 must be in \[1, 1000\]"),
        (dict(guidance_scale=-1.0), "guidance scale -1.0"),
        (dict(scheduler="plms"), "dpmpp_2m_karras"),
    ],
)
def test_bad_input_is_named(ours, kwargs, message):
    args = dict(prompt=["x"], steps=2, height=64, width=64, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        ours(**args)


def test_torch_backend_matches_onnxruntime(tmp_path, ours):
    from engine.build import build_all
    from engine.config import BuildConfig

    build_all(BuildConfig(model="tiny", backend="torch", engine_dir=tmp_path, batch_size=2, height=64, width=64),
              progress=False)
    pt = Pipeline.from_engines(tmp_path, "tiny")
    a = pt(PROMPTS, "", 6, 7.5, "dpmpp_2m", 5, 64, 64, progress=False).images
    b = ours(PROMPTS, "", 6, 7.5, "dpmpp_2m", 5, 64, 64, progress=False).images
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_nan_output_is_an_error_not_an_image(ours):
    vae = ours.runners["vae_decoder"]

    def overflowing(**inputs):
        out = vae(**inputs)
        return {"images": out["images"] * float("inf")}  # what an fp16 overflow looks like downstream

    ours.runners["vae_decoder"] = overflowing
    try:
        with pytest.raises(RuntimeError, match="vae_decoder produced NaN/Inf"):
            ours(PROMPTS, "", 2, 7.5, "ddim", 0, 64, 64, progress=False)
    finally:
        ours.runners["vae_decoder"] = vae
