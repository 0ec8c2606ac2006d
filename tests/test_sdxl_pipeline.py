"""SDXL txt2img on `tiny-xl` through the Request API vs diffusers' own StableDiffusionXLPipeline."""
from __future__ import annotations

import numpy as np
import pytest

from engine.build import build_all
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from engine.request import Request
from engine.samplers import SAMPLERS
from tests.helpers import PROMPTS, gens, max_diff, to_uint8
from tests.sampler_cases import diffusers_scheduler

SEEDS = [3, 41]
SIZE = 64


@pytest.fixture(scope="module")
def xl(xl_pipeline, xl_folder):
    """(our tiny-xl pipeline, ONNX Runtime fp32 with the VAE encoder at SIZE, its diffusers folder)."""
    return xl_pipeline, xl_folder


@pytest.fixture(scope="module")
def reference(xl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl[1], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
@pytest.mark.parametrize("sampler", SAMPLERS)  # every sampler we ship
def test_sdxl_matches_diffusers(xl, reference, sampler, negative):
    pipe, _ = xl
    assert pipe.family.name == "sdxl" and set(pipe.runners) >= {"clip", "clip2", "unet", "vae_decoder"}
    reference.scheduler = diffusers_scheduler(sampler, pipe.scheduler_config)
    ref = reference(PROMPTS, negative_prompt=[negative] * 2 if negative else None, num_inference_steps=8,
                    guidance_scale=6.0, height=SIZE, width=SIZE, output_type="np",
                    generator=gens(SEEDS)).images
    ref = to_uint8(ref)
    got = pipe.run([Request(prompt=p, negative_prompt=negative or None, steps=8, guidance_scale=6.0, sampler=sampler, seed=s,
                            height=SIZE, width=SIZE) for p, s in zip(PROMPTS, SEEDS, strict=True)], progress=False, batch_size=2)
    got = np.stack([g.pixels for g in got])
    assert ref.std() > 5 and got.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert max_diff(got, ref) <= 2, sampler


@pytest.mark.parametrize("strength", [0.3, 0.7])
@pytest.mark.parametrize("sampler", SAMPLERS)
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
                   output_type="np", generator=gens(SEEDS)).images
    ref = to_uint8(ref)
    got = pipe.run([Request(prompt=p, steps=10, guidance_scale=6.0, sampler=sampler, seed=s, init_image=image,
                            strength=strength, height=SIZE, width=SIZE) for p, s in zip(PROMPTS, SEEDS, strict=True)],
                   progress=False, batch_size=2)
    got = np.stack([g.pixels for g in got])
    assert max_diff(got, ref) <= 2, (sampler, strength)


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


# ---- time ids (size conditioning) ----


def test_sdxl_time_ids_match_diffusers(xl, reference):
    """Non-default original size, crop and target size: the same time ids as diffusers' (pixels within 2/255)."""
    pipe, _ = xl
    reference.scheduler = diffusers_scheduler("euler_a", pipe.scheduler_config)
    sizes = dict(original_size=(256, 192), target_size=(96, 128))
    ref = reference(PROMPTS, num_inference_steps=8, guidance_scale=6.0, height=SIZE, width=SIZE, output_type="np",
                    crops_coords_top_left=(32, 16), generator=gens(SEEDS),
                    **sizes).images
    ref = to_uint8(ref)
    got = pipe.run([Request(prompt=p, steps=8, guidance_scale=6.0, sampler="euler_a", seed=s, height=SIZE, width=SIZE,
                            crop=(32, 16), **sizes) for p, s in zip(PROMPTS, SEEDS, strict=True)], progress=False, batch_size=2)
    assert got[0].params["original_size"] == [256, 192] and got[0].params["crop"] == [32, 16]
    assert got[0].params["target_size"] == [96, 128] and "aesthetic_score" not in got[0].params
    default = pipe.run(Request(prompt=PROMPTS[0], steps=8, guidance_scale=6.0, sampler="euler_a", seed=SEEDS[0],
                               height=SIZE, width=SIZE), progress=False)[0]
    assert default.params["original_size"] == default.params["target_size"] == [SIZE, SIZE]
    assert max_diff(default.pixels, got[0].pixels) > 2  # the time ids matter
    got = np.stack([g.pixels for g in got])
    assert max_diff(got, ref) <= 2


@pytest.mark.parametrize("kwargs, message", [
    ({"aesthetic_score": 6.0}, "model family 'sdxl' takes no aesthetic_score; the families that do: sdxl-refiner"),
    ({"negative_aesthetic_score": 2.0}, "family 'sdxl' takes no negative_aesthetic_score; the families that do: "
                                        "sdxl-refiner"),
    ({"original_size": (0, 64)}, r"original_size 0 64 must be two integers .* >= 1"),
    ({"target_size": (64,)}, r"target_size 64 must be two integers"),
    ({"crop": (-1, 0)}, r"crop -1 0 must be two integers .* >= 0"),
    ({"crop": (0, 64)}, r"crop 0 64 is outside original_size 64 64: top must be < 64 and left < 64"),
    ({"crop": (40, 0), "original_size": (32, 32)}, r"crop 40 0 is outside original_size 32 32"),
    ({"height": 8}, r"height 8 must be a positive multiple of 16"),  # below the model's smallest size
    ({"width": 0}, r"width 0 must be a positive number of pixels"),
])
def test_sdxl_refuses_bad_time_ids_and_sizes(xl, kwargs, message):
    pipe, _ = xl
    with pytest.raises(ValueError, match=message):
        pipe.run(Request(**({"prompt": "x", "steps": 2, "height": SIZE, "width": SIZE} | kwargs)), progress=False)


@pytest.mark.parametrize("flag, values", [("--original-size", ["64", "64"]), ("--crop", ["0", "0"]),
                                          ("--target-size", ["64", "64"]), ("--aesthetic-score", ["6"])])
def test_sd_refuses_sdxl_flags(ort_engines, tmp_path, flag, values):
    from engine.generate import main

    code = main(["--engine-dir", str(ort_engines), "--steps", "2", "--output", str(tmp_path / "x.png"), flag, *values])
    assert code == 2 and not (tmp_path / "x.png").exists()


def test_sd_refuses_sdxl_flag_naming_it(ort_engines, tmp_path, capsys):
    from engine.generate import main

    assert main(["--engine-dir", str(ort_engines), "--steps", "2", "--output", str(tmp_path / "x.png"),
                 "--original-size", "128", "96"]) == 2
    assert capsys.readouterr().err.strip() == ("error: model family 'sd' takes no --original-size; the families that "
                                               "do: sdxl, sdxl-refiner (this one takes --clip-skip)")


def test_generate_cli_parses_time_id_flags():
    from engine.generate import parse_args

    cfg = parse_args(["--original-size", "1024", "768", "--crop", "16", "8", "--target-size", "512", "512",
                      "--aesthetic-score", "7", "--negative-aesthetic-score", "2"])
    r = cfg.requests()[0]
    assert (r.original_size, r.crop, r.target_size) == ((1024, 768), (16, 8), (512, 512))
    assert (r.aesthetic_score, r.negative_aesthetic_score) == (7.0, 2.0)
    assert parse_args([]).requests()[0].original_size is None


# ---- bad model folders ----


def test_sdxl_folder_without_text_encoder_2_is_refused_at_build(xl, tmp_path):
    import shutil

    folder = tmp_path / "broken-xl"
    shutil.copytree(xl[1], folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ValueError, match=r"broken-xl: missing the text_encoder_2/ folder; a sdxl model needs "
                                         r"text_encoder, text_encoder_2, unet, vae, tokenizer, tokenizer_2"):
        build_all(BuildConfig(model=str(folder), backend="onnxruntime", engine_dir=tmp_path / "engines"),
                  progress=False)


def test_sdxl_on_the_torch_backend_matches_diffusers(tmp_path, reference, xl):
    """The torch backend (the reference modules behind the runner contract) on SDXL: txt2img, dpmpp_2m."""
    _, folder = xl
    build_all(BuildConfig(model="tiny-xl", backend="torch", engine_dir=tmp_path, batch_size=2, height=SIZE,
                          width=SIZE), progress=False)
    pipe = Pipeline.load(tmp_path)
    assert pipe.info["backend"] == "torch" and pipe.family.name == "sdxl"
    reference.scheduler = diffusers_scheduler("dpmpp_2m", pipe.scheduler_config)
    ref = reference(PROMPTS, num_inference_steps=6, guidance_scale=6.0, height=SIZE, width=SIZE, output_type="np",
                    generator=gens(SEEDS)).images
    ref = to_uint8(ref)
    got = pipe.run([Request(prompt=p, steps=6, guidance_scale=6.0, sampler="dpmpp_2m", seed=s, height=SIZE,
                            width=SIZE) for p, s in zip(PROMPTS, SEEDS, strict=True)], progress=False, batch_size=2)
    got = np.stack([g.pixels for g in got])
    assert ref.std() > 5 and max_diff(got, ref) <= 2
    pipe.close()
