"""The paper's text-to-image LDM (family `ldm-text`, diffusers' LDMTextToImagePipeline: LDMBert over a BERT tokenizer,
UNet2DConditionModel, a KL-f8 autoencoder in vqvae/): the seeded tiny-ldm-text built for ONNX Runtime fp32 vs that
pipeline on the same folder (DDIM, eta 0 and 1, guidance on and off), the text encoder graph vs LDMBert, prompts as
the pipeline tokenizes them, and the CLI."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.pipeline import Pipeline
from engine.request import Request
from export.models import resolve_model
from tests.helpers import max_diff, png_pixels, to_uint8

STEPS = 8
PROMPTS = ["a photograph of an astronaut riding a horse", "an oil painting of a red castle by the sea at night"]


@pytest.fixture(scope="module")
def pipe(ldm_text_engines):
    p = Pipeline.load(ldm_text_engines)
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference():
    from diffusers import LDMTextToImagePipeline

    ref = LDMTextToImagePipeline.from_pretrained(resolve_model("tiny-ldm-text")[0], local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("prompt, seed, scale, eta", [(PROMPTS[0], 3, 6.0, 0.0), (PROMPTS[1], 8, 6.0, 1.0),
                                                      (PROMPTS[1], 3, 1.0, 0.0)])
def test_ldm_text_matches_the_pipeline(pipe, reference, prompt, seed, scale, eta):
    """Each DDIM step's noise (eta > 0): the pipeline's from torch's global generator, seeded here with the image's
    seed; the engine's from a generator seeded again with it (Family.reseed_step_noise)."""
    torch.manual_seed(seed)
    want = to_uint8(reference(prompt, height=64, width=64, num_inference_steps=STEPS, guidance_scale=scale, eta=eta,
                              generator=torch.Generator().manual_seed(seed), output_type="np").images)[0]
    got = pipe.run(Request(prompt=prompt, steps=STEPS, sampler="ddim", seed=seed, guidance_scale=scale, eta=eta,
                           prompt_syntax="plain"), progress=False)[0]
    assert got.pixels.shape == (64, 64, 3) and want.std() > 5
    assert max_diff(got.pixels, want) <= 2
    assert got.params["prompt"] == prompt


def test_the_text_encoder_graph_is_ldmbert(pipe, reference):
    """The `bert` graph on the pipeline's own token ids (BERT's [CLS] ... [SEP] and [PAD] to 77) gives LDMBert's
    hidden states; A1111's syntax reads a plain prompt to the same ids."""
    ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert pipe.tokenize(PROMPTS).tolist() == ids.tolist()
    ours = pipe.text.encode([_row(pipe, p) for p in PROMPTS], cfg=False)["bert"]["text_embeddings"]
    with torch.no_grad():
        theirs = reference.bert(ids)[0]
    torch.testing.assert_close(ours.float(), theirs, atol=1e-4, rtol=1e-4)


def _row(pipe, prompt: str):
    prepared = pipe.prepare(Request(prompt=prompt, steps=1))
    return prepared.rows()[0]


def test_the_prompt_changes_the_image_and_the_default_prompt_is_used(pipe):
    a = pipe.run(Request(prompt=PROMPTS[0], steps=4, sampler="ddim", seed=1), progress=False)[0]
    b = pipe.run(Request(prompt=PROMPTS[1], steps=4, sampler="ddim", seed=1), progress=False)[0]
    default = pipe.run(Request(steps=4, sampler="ddim", seed=1), progress=False)[0]
    assert max_diff(a.pixels, b.pixels) > 4  # past the parity tolerance (random weights: the text moves it a little)
    assert default.params["prompt"] == PROMPTS[0] and max_diff(default.pixels, a.pixels) == 0


def test_cli_writes_the_prompts_image(ldm_text_engines, tmp_path, pipe):
    out = tmp_path / "t.png"
    done = subprocess.run([sys.executable, "-m", "engine.generate", "--engine-dir", str(ldm_text_engines), "--steps",
                           "4", "--scheduler", "ddim", "--seed", "2", "--prompt", PROMPTS[1], "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = pipe.run(Request(prompt=PROMPTS[1], steps=4, sampler="ddim", seed=2), progress=False)[0].pixels
    assert max_diff(png_pixels(out.read_bytes()), want) <= 1


def test_a_vq_autoencoder_folder_is_ldm_text_vq_and_matches_the_pipeline(tmp_path):
    """The same pipeline class with a VQModel in vqvae/ (model_index.json says which): family ldm-text-vq, whose
    decoder graph quantises to the codebook before decoding, as VQModel.decode does."""
    from diffusers import LDMTextToImagePipeline

    from engine.build import build_all
    from engine.config import BuildConfig
    from export.families import detect_family

    folder = resolve_model("tiny-ldm-text-vq")[0]
    assert detect_family(folder).name == "ldm-text-vq"
    build_all(BuildConfig(engine_dir=tmp_path, model="tiny-ldm-text-vq", backend="onnxruntime", precision="fp32",
                          height=64, width=64), progress=False)
    ours = Pipeline.load(tmp_path)
    try:
        ref = LDMTextToImagePipeline.from_pretrained(folder, local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        want = to_uint8(ref(PROMPTS[1], height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0,
                            generator=torch.Generator().manual_seed(4), output_type="np").images)[0]
        got = ours.run(Request(prompt=PROMPTS[1], steps=STEPS, sampler="ddim", seed=4, guidance_scale=5.0,
                               prompt_syntax="plain"), progress=False)[0]
        assert want.std() > 5 and max_diff(got.pixels, want) <= 2
    finally:
        ours.close()
