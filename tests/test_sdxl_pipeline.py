"""SDXL txt2img on `tiny-xl` through the Request API vs diffusers' own StableDiffusionXLPipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.build import build_all
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from engine.request import Request
from engine.samplers import diffusers_scheduler

PROMPTS = ["a watercolor painting of a lighthouse", "a red bicycle"]
SEEDS = [3, 41]
SIZE = 64


@pytest.fixture(scope="module")
def xl(tmp_path_factory, engine_cache):
    from export.models import materialize_preset
    from export.presets import ALL_PRESETS

    folder = materialize_preset(ALL_PRESETS["tiny-xl"])
    engine_dir = tmp_path_factory.mktemp("xl_engines")
    build_all(BuildConfig(model="tiny-xl", backend="onnxruntime", engine_dir=engine_dir, batch_size=2, height=SIZE,
                          width=SIZE, components=("clip", "clip2", "unet", "vae_decoder", "vae_encoder")),
              progress=False)
    return Pipeline.load(engine_dir), folder


@pytest.fixture(scope="module")
def reference(xl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl[1], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_sdxl_matches_diffusers(xl, reference, sampler, negative):
    pipe, _ = xl
    assert pipe.family.name == "sdxl" and set(pipe.runners) >= {"clip", "clip2", "unet", "vae_decoder"}
    reference.scheduler = diffusers_scheduler(sampler, pipe.scheduler_config)
    ref = reference(PROMPTS, negative_prompt=[negative] * 2 if negative else None, num_inference_steps=8,
                    guidance_scale=6.0, height=SIZE, width=SIZE, output_type="np",
                    generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS]).images
    ref = (ref * 255).round().astype(np.uint8)
    got = pipe.run([Request(prompt=p, negative_prompt=negative, steps=8, guidance_scale=6.0, sampler=sampler, seed=s,
                            height=SIZE, width=SIZE) for p, s in zip(PROMPTS, SEEDS)], progress=False, batch_size=2)
    got = np.stack([g.pixels for g in got])
    assert ref.std() > 5 and got.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2, sampler


@pytest.mark.parametrize("strength", [0.3, 0.7])
@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_sdxl_img2img_matches_diffusers(xl, reference, sampler, strength):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    pipe, _ = xl
    ref_pipe = StableDiffusionXLImg2ImgPipeline(**reference.components)
    ref_pipe.set_progress_bar_config(disable=True)
    ref_pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler_config)
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8)).resize((SIZE, SIZE))
    ref = ref_pipe(PROMPTS, image=[image] * 2, strength=strength, num_inference_steps=10, guidance_scale=6.0,
                   output_type="np", generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS]).images
    ref = (ref * 255).round().astype(np.uint8)
    got = pipe.run([Request(prompt=p, steps=10, guidance_scale=6.0, sampler=sampler, seed=s, init_image=image,
                            strength=strength, height=SIZE, width=SIZE) for p, s in zip(PROMPTS, SEEDS)],
                   progress=False, batch_size=2)
    got = np.stack([g.pixels for g in got])
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2, (sampler, strength)


def test_build_cli_takes_sdxl_components_and_refuses_them_for_sd(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "engine.build", "--engine-dir", str(tmp_path), "--model", "tiny",
                        "--components", "clip,clip2"], capture_output=True, text=True, cwd=root, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown component 'clip2' for family 'sd'" in r.stderr.strip().splitlines()[-1]
