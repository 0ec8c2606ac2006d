"""The class-conditional LDM (family `ldm-class`: the paper's ImageNet model's shape, a class table as the UNet's
cross-attention context, VQ autoencoder): the seeded tiny-ldm-cin built for ONNX Runtime fp32 vs a reference composed
from diffusers' modules (UNet2DConditionModel, VQModel, DDIMScheduler) and the folder's class table, with classifier-
free guidance against the unconditional class as the original code samples; then batching, other backends, bad input
by field and the server."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.build import build_all
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from engine.png import parameters_text
from engine.request import Request, RequestError
from export.models import resolve_model
from tests.helpers import max_diff, png_pixels, running_server

STEPS = 8
N_CLASSES = 11  # tiny-ldm-cin's table: classes 0..9 and 10, the unconditional one


@pytest.fixture(scope="module")
def pipe(ldm_class_engines):
    p = Pipeline.load(ldm_class_engines)
    yield p
    p.close()


class Reference:
    """The original code's sampling loop (ldm/models/diffusion/ddim.py with `unconditional_guidance_scale`), composed
    from diffusers' modules on the folder's weights: context = table[class][:, None], the unconditional context the
    table's last row, eps = eps_u + s (eps_c - eps_u), DDIM (each step's noise, eta > 0, from a generator seeded with
    the image's seed), VQModel.decode(latents / scaling_factor)."""

    def __init__(self):
        from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

        from export.families.ldm_modules import ClassEmbedder

        folder = resolve_model("tiny-ldm-cin")[0]
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        self.vq = VQModel.from_pretrained(folder / "vqvae").eval()
        self.table = ClassEmbedder.from_pretrained(folder / "class_embedder").embedding.weight.detach()
        self.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        assert self.table.shape[0] == N_CLASSES

    @torch.no_grad()
    def __call__(self, label: int, seed: int, scale: float, eta: float = 0.0, size: int = 64) -> np.ndarray:
        s = self.scheduler
        latents = torch.randn((1, 3, size // 4, size // 4), generator=torch.Generator().manual_seed(seed))
        latents = latents * s.init_noise_sigma
        s.set_timesteps(STEPS)
        noise = torch.Generator().manual_seed(seed)
        context = torch.stack([self.table[N_CLASSES - 1], self.table[label]])[:, None]  # [2, 1, D]
        for t in s.timesteps:
            x = s.scale_model_input(torch.cat([latents, latents]), t)
            uncond, cond = self.unet(x, t, encoder_hidden_states=context).sample.chunk(2)
            latents = s.step(uncond + scale * (cond - uncond), t, latents, eta=eta, generator=noise).prev_sample
        image = self.vq.decode(latents / self.vq.config.scaling_factor).sample
        return ((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def reference():
    return Reference()


@pytest.mark.parametrize("label, seed, scale, eta", [(3, 5, 3.0, 0.0), (7, 5, 3.0, 1.0), (0, 12, 1.5, 0.0)])
def test_class_conditional_matches_the_composed_reference(pipe, reference, label, seed, scale, eta):
    want = reference(label, seed, scale, eta)
    got = pipe.run(Request(class_label=label, seed=seed, guidance_scale=scale, eta=eta, steps=STEPS, sampler="ddim"),
                   progress=False)[0]
    assert got.pixels.shape == (64, 64, 3) and want.std() > 5
    assert max_diff(got.pixels, want) <= 2
    assert got.params["class_label"] == label and "prompt" not in got.params


def test_the_class_changes_the_image_and_none_is_the_unconditional_class(pipe, reference):
    """No label = the table's last row: guidance then compares it with itself, the image of scale 1."""
    runs = {label: pipe.run(Request(class_label=label, seed=4, guidance_scale=3.0, steps=STEPS, sampler="ddim"),
                            progress=False)[0] for label in (1, 2, None)}
    assert max_diff(runs[1].pixels, runs[2].pixels) > 20
    assert runs[None].params["class_label"] == N_CLASSES - 1
    assert parameters_text(runs[1].params).splitlines() == ["Steps: 8, Sampler: DDIM, CFG scale: 3.0, Seed: 4, Size: "
                                                            "64x64, Model: tiny-ldm-cin, Class label: 1"]
    assert max_diff(runs[None].pixels, reference(N_CLASSES - 1, 4, 1.0)) <= 2


def test_rows_of_different_classes_batch_as_they_run_alone(pipe):
    """One batch of three rows (two requests, two classes, guidance on): each image equals its request run alone."""
    a = Request(class_label=2, seed=30, images=2, guidance_scale=2.0, steps=STEPS, sampler="ddim")
    b = Request(class_label=9, seed=31, guidance_scale=2.0, steps=STEPS, sampler="ddim")
    together = pipe.run([a, b], progress=False, batch_size=3)
    alone = pipe.run(a, progress=False, batch_size=1) + pipe.run(b, progress=False, batch_size=1)
    for x, y in zip(together, alone, strict=True):
        assert max_diff(x.pixels, y.pixels) <= 1 and x.params["class_label"] == y.params["class_label"]


def test_img2img_through_the_vq_encoder(pipe):
    """With its VQ encoder built the model also takes an init image (SDEdit): strength 1 is txt2img's start."""
    from tests.helpers import init_image

    r = Request(class_label=5, seed=8, steps=STEPS, sampler="ddim", guidance_scale=2.0)
    plain = pipe.run(r, progress=False)[0].pixels
    low = pipe.run(Request(**{**r.__dict__, "init_image": init_image(64, 1), "strength": 0.5}), progress=False)[0]
    assert low.params["kind"] == "img2img" and max_diff(low.pixels, plain) > 10


@pytest.mark.parametrize("kwargs, field, message", [
    ({"class_label": 11}, "class_label", r"class_label 11 is outside 0..10 for this model \(10: the unconditional"),
    ({"class_label": -2}, "class_label", r"class_label -2 must be an integer >= 0"),
    ({"prompt": "a goldfish"}, "prompt", r"'ldm-class' takes no prompt: it has no text encoder; it takes class_label"),
    ({"noise_level": 20}, "noise_level", r"takes no noise_level"),
])
def test_bad_class_requests_name_the_field(pipe, kwargs, field, message):
    with pytest.raises(RequestError, match=message) as err:
        pipe.prepare(Request(steps=2, **kwargs))
    assert err.value.field == field


def test_a_class_label_to_a_text_model_is_refused(ort_pipeline):
    with pytest.raises(RequestError, match="takes no class_label; the families that do: ldm-class") as err:
        ort_pipeline.prepare(Request(steps=2, class_label=3))
    assert err.value.field == "class_label"


def test_openvino_matches_onnxruntime(pipe, tmp_path):
    """The class embedder, UNet and VQ decoder built for OpenVINO (fp32) give ONNX Runtime's image (the torch backend
    runs the torch modules the composed reference uses)."""
    build_all(BuildConfig(engine_dir=tmp_path, model="tiny-ldm-cin", backend="openvino", precision="fp32", height=64,
                          width=64), progress=False)
    other = Pipeline.load(tmp_path)
    try:
        r = Request(class_label=6, seed=3, guidance_scale=3.0, steps=STEPS, sampler="ddim")
        assert max_diff(other.run(r, progress=False)[0].pixels, pipe.run(r, progress=False)[0].pixels) <= 2
    finally:
        other.close()


def test_server_takes_a_class_and_no_prompt(ldm_class_engines, tmp_path_factory, pipe):
    with running_server(ldm_class_engines, tmp_path_factory.mktemp("serve-ldm-class")) as server:
        status, data, _ = server.get("/v1/info")
        takes = json.loads(data)["takes"]
        assert status == 200 and takes == {"prompt": False, "kinds": ["txt2img", "img2img"],
                                           "fields": ["class_label"], "classes": N_CLASSES}
        body = {"class_label": 4, "steps": 4, "sampler": "ddim", "seed": 6, "guidance_scale": 2.0}
        status, data, _ = server.post("/v1/generate", body)
        assert status == 200, data
        got = png_pixels(json.loads(data)["images"][0]["b64_png"])
        want = pipe.run(Request(**body), progress=False)[0].pixels
        assert max_diff(got, want) <= 1
        for change, field in (({"class_label": 11}, "class_label"), ({"prompt": "a dog"}, "prompt"),
                              ({"class_label": "4"}, "class_label")):
            status, data, _ = server.post("/v1/generate", {**body, **change})
            assert status == 400 and json.loads(data)["error"]["param"] == field, (change, data)
