"""The unconditional LDM (family `ldm-uncond`, diffusers' LDMPipeline: UNet2DModel + VQ autoencoder, no prompt): the
seeded tiny-ldm-uncond built for ONNX Runtime fp32 vs LDMPipeline on the same folder (DDIM, eta 0 and 1, two
seeds), several images of one request, a prompt refused by field, and the CLI with no prompt."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from engine.pipeline import Pipeline
from engine.png import parameters_text
from engine.request import Request, RequestError
from export.models import resolve_model
from tests.helpers import max_diff, png_pixels, to_uint8

STEPS = 10


@pytest.fixture(scope="module")
def pipe(ldm_uncond_engines):
    p = Pipeline.load(ldm_uncond_engines)
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference():
    from diffusers import LDMPipeline

    ref = LDMPipeline.from_pretrained(resolve_model("tiny-ldm-uncond")[0], local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return ref


def _theirs(reference, seed: int, eta: float):
    """LDMPipeline's image of one seed: latents from its generator, each DDIM step's noise (eta > 0) from torch's
    global generator, seeded here with the same seed (the engine: Family.reseed_step_noise)."""
    torch.manual_seed(seed)
    return to_uint8(reference(batch_size=1, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
                              eta=eta, output_type="np").images)[0]


@pytest.mark.parametrize("seed, eta", [(1, 0.0), (23, 0.0), (1, 1.0), (23, 1.0)])
def test_ldm_uncond_matches_ldm_pipeline(pipe, reference, seed, eta):
    """The preset's codebook is spread like a trained one (export/ldm_presets.py): with diffusers' initial one, all
    entries within 1/K of 0, rounding in the UNet (ONNX Runtime vs torch) flipped the nearest entry in ~1 seed of 10."""
    want = _theirs(reference, seed, eta)
    got = pipe.run(Request(steps=STEPS, sampler="ddim", seed=seed, eta=eta), progress=False)[0]
    assert got.pixels.shape == (64, 64, 3) and want.std() > 5
    assert max_diff(got.pixels, want) <= 2
    assert "prompt" not in got.params and got.params["guidance_scale"] == 1.0  # no text, no guidance: as run
    assert got.params.get("eta", 0.0) == eta


def test_images_of_one_request_are_their_seeds_images(pipe, reference):
    """--images-per-prompt 3 with no prompt: image k is seed + k's, as LDMPipeline makes that seed alone."""
    made = pipe.run(Request(steps=STEPS, sampler="ddim", seed=40, images=3), progress=False)
    assert [g.params["seed"] for g in made] == [40, 41, 42]
    for g in made:
        assert max_diff(g.pixels, _theirs(reference, g.params["seed"], 0.0)) <= 2
    assert max_diff(made[0].pixels, made[1].pixels) > 20


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": "a cat"}, "prompt"),
    ({"negative_prompt": "blurry"}, "negative_prompt"),
    ({"class_label": 1}, "class_label"),
    ({"noise_level": 20}, "noise_level"),
])
def test_what_the_unconditional_model_does_not_take_is_refused_by_field(pipe, kwargs, field):
    with pytest.raises(RequestError, match=f"takes no {field.replace('_', ' ')}|takes no {field}") as err:
        pipe.prepare(Request(steps=2, **kwargs))
    assert err.value.field == field


def test_an_empty_prompt_is_no_prompt(pipe):
    """A1111's clients send "" when there is none: the same image as no prompt."""
    a = pipe.run(Request(steps=3, sampler="ddim", seed=2, prompt=""), progress=False)[0]
    b = pipe.run(Request(steps=3, sampler="ddim", seed=2), progress=False)[0]
    assert max_diff(a.pixels, b.pixels) == 0 and "prompt" not in a.params


def test_cli_with_no_prompt_writes_n_images(ldm_uncond_engines, tmp_path, pipe):
    out = tmp_path / "u.png"
    done = subprocess.run([sys.executable, "-m", "engine.generate", "--engine-dir", str(ldm_uncond_engines), "--steps",
                           "4", "--scheduler", "ddim", "--seed", "9", "--images-per-prompt", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    written = sorted(tmp_path.glob("u*.png"))
    assert len(written) == 2, written
    want = pipe.run(Request(steps=4, sampler="ddim", seed=9, images=2), progress=False)
    for path, g in zip(written, want, strict=True):
        assert max_diff(png_pixels(path.read_bytes()), g.pixels) <= 1
        text = Image.open(path).info["parameters"]
        assert text == parameters_text(g.params) and text.startswith("Steps: 4, Sampler: DDIM")
    bad = subprocess.run([sys.executable, "-m", "engine.generate", "--engine-dir", str(ldm_uncond_engines), "--steps",
                          "2", "--prompt", "a dog", "--output", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--prompt" in bad.stderr and "takes no prompt" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
