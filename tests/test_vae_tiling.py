"""Tiled VAE (engine/tiling.py): decode and encode in tiles against diffusers' `enable_vae_tiling` (img2img through
both, 6 tiles each way; txt2img through the decoder), the tiling chosen per request ("auto" only where the untiled
decode would not fit), recorded in the image's parameters, bad options named on the API, the CLI and the server."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine import memory, tiling
from engine.request import Request, RequestError
from export.footprint import Footprint
from export.specs import Shape
from tests.helpers import gens, max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

H, W = 192, 256  # tiny's VAE tile is its sample size, 128 px: 2 x 3 tiles decoding (16 latents, every 12) and encoding


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (H // 8, W // 8, 3), dtype=np.uint8)).resize((W, H), Image.BICUBIC)


@pytest.fixture(scope="module")
def diffusers_img2img(tiny_folder, ort_pipeline):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_folder, safety_checker=None,
                                                          requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("euler", ort_pipeline.scheduler_config)
    pipe.vae.enable_tiling()
    return pipe


def test_the_tiles_are_diffusers(ort_pipeline):
    plan = tiling.Tiling(128, 0.25, 8)
    assert plan.tiles(H, W) == {(128, 128), (128, 64), (96, 128), (96, 64)}  # 16 latents every 12, 128 px every 96
    assert ort_pipeline.dims.vae_sample_size == 128 and plan.needed(H, W) and not plan.needed(128, 128)


def test_img2img_in_tiles_matches_diffusers_enable_vae_tiling(ort_pipeline, diffusers_img2img):
    image, strength = picture(), 0.5
    req = Request(prompt="a red bicycle", init_image=image, strength=strength, steps=4, sampler="euler", seed=3,
                  height=H, width=W, vae_tiling="on")
    (got,) = ort_pipeline.run([req], progress=False)
    want = to_uint8(diffusers_img2img("a red bicycle", image=image, strength=strength, num_inference_steps=4,
                                      generator=gens([3]), output_type="np").images)
    assert max_diff(got.pixels[None], want) <= 2
    assert got.params["vae_tiling"] == "on" and got.params["vae_tile_size"] == 128
    (whole,) = ort_pipeline.run([Request(**{**vars(req), "vae_tiling": "off"})], progress=False)
    assert max_diff(whole.pixels, got.pixels) > 2  # the tiles are really there
    assert "vae_tiling" not in whole.params


def test_txt2img_decodes_in_tiles_like_diffusers(ort_pipeline, tiny_folder):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_folder / "vae", local_files_only=True).eval()
    vae.enable_tiling()
    latents = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(1))
    prepared = ort_pipeline.prepare(Request(prompt="x", height=H, width=W, vae_tiling="on", images=2))
    got = ort_pipeline.decode(latents, prepared.request)
    with torch.no_grad():
        want = vae.decode(latents / vae.config.scaling_factor).sample
    want = to_uint8((want / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    assert max_diff(got, want) <= 1


def test_auto_tiles_only_what_would_not_fit():
    r = Request(vae_tile_size=None, height=H, width=W)
    assert tiling.resolve(r, 8, 128, lambda: True, None)[1]
    assert not tiling.resolve(r, 8, 128, lambda: False, None)[1]
    assert not tiling.resolve(Request(height=128, width=128), 8, 128, lambda: True, None)[1]  # one tile: none
    assert not tiling.resolve(Request(height=H, width=W, vae_tiling="off"), 8, 128, lambda: True, None)[1]
    assert tiling.resolve(Request(height=H, width=W, vae_tiling="on"), 8, 128, lambda: False, None)[1]
    fp = Footprint(decoder_channels=128)  # sd15's decoder: 2048² decodes need 6 GiB untiled, 0.4 GiB in 512² tiles
    whole = memory.estimate(fp, 2048, 2048, 1, True, "fp32", "sdpa", 8)
    tiled = memory.estimate(fp, 2048, 2048, 1, True, "fp32", "sdpa", 8, decode=(512, 512))
    assert whole.decoder_bytes == 16 * tiled.decoder_bytes == 3 * 128 * 2048 * 2048 * 4


def test_a_static_profile_must_take_the_tiles():
    r = Request(height=H, width=W, vae_tiling="on")
    bounds = (Shape(1, 128, 128), Shape(1, 256, 256))
    with pytest.raises(RequestError, match=r"a 96x64 tile is outside") as caught:
        tiling.resolve(r, 8, 128, lambda: False, bounds)
    assert caught.value.field == "vae_tiling"
    assert tiling.resolve(r, 8, 128, lambda: False, (Shape(1, 64, 64), Shape(1, 256, 256)))[1]


@pytest.mark.parametrize(("fields", "field"), [({"vae_tiling": "maybe"}, "vae_tiling"),
                                               ({"vae_tile_size": 100, "vae_tiling": "on"}, "vae_tile_size"),
                                               ({"vae_tile_size": 8, "vae_tiling": "on"}, "vae_tile_size"),
                                               ({"vae_tile_overlap": 0.5}, "vae_tile_overlap"),
                                               ({"vae_tile_overlap": True}, "vae_tile_overlap")])
def test_bad_tiling_options_are_named(ort_pipeline, fields, field):
    with pytest.raises(RequestError) as caught:
        ort_pipeline.prepare(Request(prompt="x", height=H, width=W, **fields))
    assert caught.value.field == field


def test_the_cli_takes_the_options_and_refuses_bad_ones(ort_engines, tmp_path, capsys):
    from engine import generate

    argv = ["--engine-dir", str(ort_engines), "--prompt", "x", "--steps", "2", "--height", str(H), "--width", str(W)]
    assert generate.main([*argv, "--vae-tiling", "on", "--vae-tile-size", "128", "--output",
                          str(tmp_path / "a.png")]) == 0
    assert generate.main([*argv, "--vae-tile-size", "100", "--output", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --vae-tile-size") and "multiple of 8" in err
    assert not (tmp_path / "b.png").exists()
    with pytest.raises(SystemExit):
        generate.main([*argv, "--vae-tiling", "sometimes"])
    assert "--vae-tiling" in capsys.readouterr().err
    assert max_diff(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")),
                    stack_pixels(_run(ort_engines, H, W))[0]) <= 1


def _run(engine_dir, h, w):
    from engine.pipeline import Pipeline

    pipe = Pipeline.load(engine_dir)
    try:
        return pipe.run([Request(prompt="x", steps=2, height=h, width=w, vae_tiling="on", vae_tile_size=128)],
                        progress=False)
    finally:
        pipe.close()
