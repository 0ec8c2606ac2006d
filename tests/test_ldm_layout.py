"""Layout-to-image (family `ldm-layout`, the paper's OpenImages model's shape: objects as 92 tokens through LDMBert's
encoder into a UNet2DConditionModel's cross-attention; VQ-f4): the token rule against hand-worked examples, the seeded
tiny-ldm-layout built for ONNX Runtime fp32 against the loop composed from diffusers' modules (LDMBertModel,
UNet2DConditionModel, VQModel, DDIM) on those tokens, bad layouts by field, the CLI and the server."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.pipeline import Pipeline
from engine.request import Request, RequestError
from export.families.ldm_layout import corner_token, layout_tokens
from export.models import resolve_model
from tests.helpers import max_diff, png_pixels, running_server

STEPS = 8
LABELS = ("person", "dog", "cat", "car", "tree", "house", "boat", "bird")  # tiny-ldm-layout's
NONE, CROP = [8191, 8191, 8191], [0, 8099]  # a missing object; the whole image's crop corners
LAYOUT = [{"label": "dog", "box": [0.1, 0.2, 0.6, 0.9]}, {"label": 6, "box": [0.5, 0.05, 0.95, 0.4]}]


def test_corner_tokens_by_hand():
    """S = 90: token = round(y * 89) * 90 + round(x * 89), Python's round (halves to even, as the original)."""
    assert corner_token(0, 0) == 0 and corner_token(1, 1) == 89 * 90 + 89 == 8099
    assert corner_token(0.5, 0.25) == 22 * 90 + 44  # x: 44.5 -> 44, y: 22.25 -> 22
    assert corner_token(0.1, 0.2) == 18 * 90 + 9  # x: 8.9 -> 9, y: 17.8 -> 18
    assert corner_token(0.6, 0.9) == 80 * 90 + 53  # x: 53.4 -> 53, y: 80.1 -> 80


def test_layout_tokens_by_hand():
    tokens = layout_tokens(LAYOUT, LABELS, 64, 64)
    # dog: (1, 18*90+9, 80*90+53); boat (id 6): x0 .5 -> 44 (44.5 to even), y0 .05 -> 4 (4.45), x1 .95 -> 85 (84.55),
    # y1 .4 -> 36 (35.6)
    assert list(tokens) == [1, 1629, 7253, 6, 4 * 90 + 44, 36 * 90 + 85] + NONE * 28 + CROP
    assert len(tokens) == 92
    pixels = layout_tokens([{"label": "cat", "box": [16, 0, 48, 32]}], LABELS, 64, 64)  # 0.25, 0, 0.75, 0.5
    assert list(pixels[:3]) == [2, 22, 44 * 90 + 67] and list(pixels[3:]) == NONE * 29 + CROP
    assert list(layout_tokens([], LABELS, 64, 64)) == NONE * 30 + CROP


@pytest.fixture(scope="module")
def pipe(ldm_layout_engines):
    p = Pipeline.load(ldm_layout_engines)
    yield p
    p.close()


class Reference:
    def __init__(self):
        from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

        folder = resolve_model("tiny-ldm-layout")[0]
        self.bert = LDMBertModel.from_pretrained(folder / "layout_encoder").eval()
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        self.vq = VQModel.from_pretrained(folder / "vqvae").eval()
        self.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        assert json.loads((folder / "layout_encoder" / "labels.json").read_text()) == list(LABELS)

    @torch.no_grad()
    def __call__(self, tokens: list[int], seed: int, eta: float = 0.0, size: int = 64) -> np.ndarray:
        s = self.scheduler
        context = self.bert(torch.tensor([tokens]))[0]  # [1, 92, D]
        latents = torch.randn((1, 3, size // 4, size // 4), generator=torch.Generator().manual_seed(seed))
        s.set_timesteps(STEPS)
        noise = torch.Generator().manual_seed(seed)
        for t in s.timesteps:
            eps = self.unet(s.scale_model_input(latents, t), t, encoder_hidden_states=context).sample
            latents = s.step(eps, t, latents, eta=eta, generator=noise).prev_sample
        image = self.vq.decode(latents / self.vq.config.scaling_factor).sample
        return ((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def reference():
    return Reference()


@pytest.mark.parametrize("seed, eta", [(1, 0.0), (4, 1.0)])
def test_layout_to_image_matches_the_composed_reference(pipe, reference, seed, eta):
    tokens = [1, 1629, 7253, 6, 4 * 90 + 44, 36 * 90 + 85] + NONE * 28 + CROP  # LAYOUT, worked by hand above
    want = reference(tokens, seed, eta)
    got = pipe.run(Request(layout=LAYOUT, seed=seed, eta=eta, steps=STEPS, sampler="ddim"), progress=False)[0]
    assert got.pixels.shape == (64, 64, 3) and want.std() > 5
    assert max_diff(got.pixels, want) <= 2 and got.params["guidance_scale"] == 1.0


def test_the_layout_changes_the_image(pipe):
    a = pipe.run(Request(layout=LAYOUT, seed=2, steps=4, sampler="ddim"), progress=False)[0]
    b = pipe.run(Request(seed=2, steps=4, sampler="ddim"), progress=False)[0]  # none: the empty layout
    assert max_diff(a.pixels, b.pixels) > 4


@pytest.mark.parametrize("layout, message", [
    ([{"label": "dog", "box": [0, 0, 0.1, 0.1]}] * 31, r"the layout has 31 objects; the model takes at most 30"),
    ([{"label": "zebra", "box": [0, 0, 0.5, 0.5]}], r"object 0: unknown label 'zebra'; the model's labels: person"),
    ([{"label": 8, "box": [0, 0, 0.5, 0.5]}], r"label id 8 is not one of the model's 8 \(0..7\)"),
    ([{"label": "dog", "box": [10, 10, 80, 20]}], r"object 0: box \[10, 10, 80, 20\] \(pixels\) is not inside the "
                                                    r"64x64 image"),
    ([{"label": "dog", "box": [0.5, 0.1, 0.2, 0.4]}], r"x0 < x1"),
    ([{"label": "dog", "box": [0, 0, 1]}], r"must be four numbers"),
    ({"label": "dog"}, r"a layout is a list of objects"),
    ("missing.json", r"cannot read the layout file 'missing.json'"),
])
def test_bad_layouts_name_the_field(pipe, layout, message):
    with pytest.raises(RequestError, match=message) as err:
        pipe.prepare(Request(steps=2, layout=layout))
    assert err.value.field == "layout"


def test_a_prompt_or_a_layout_to_the_wrong_model_is_refused(pipe, ort_pipeline):
    with pytest.raises(RequestError, match="takes no prompt") as err:
        pipe.prepare(Request(steps=2, prompt="a dog on a boat"))
    assert err.value.field == "prompt"
    with pytest.raises(RequestError, match="takes no layout") as err:
        ort_pipeline.prepare(Request(steps=2, layout=LAYOUT))
    assert err.value.field == "layout"


def test_cli_and_server(ldm_layout_engines, tmp_path, tmp_path_factory, pipe):
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(LAYOUT))
    out = tmp_path / "l.png"
    done = subprocess.run([sys.executable, "-m", "engine.generate", "--engine-dir", str(ldm_layout_engines), "--steps",
                           "4", "--scheduler", "ddim", "--seed", "6", "--layout", str(path), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = pipe.run(Request(layout=LAYOUT, steps=4, sampler="ddim", seed=6), progress=False)[0]
    assert max_diff(png_pixels(out.read_bytes()), want.pixels) <= 1
    assert pipe.run(Request(layout=path, steps=1, seed=6), progress=False)[0].params["layout"] == str(path)
    with running_server(ldm_layout_engines, tmp_path_factory.mktemp("serve-ldm-layout")) as server:
        status, data, _ = server.get("/v1/info")
        assert json.loads(data)["takes"] == {"prompt": False, "kinds": ["txt2img"], "fields": ["layout"], "classes": 8}
        body = {"layout": LAYOUT, "steps": 4, "sampler": "ddim", "seed": 6}
        status, data, _ = server.post("/v1/generate", body)
        assert status == 200, data
        assert max_diff(png_pixels(json.loads(data)["images"][0]["b64_png"]), want.pixels) <= 1
        for bad in ([{"label": "zebra", "box": [0, 0, 1, 1]}], [{"label": "dog", "box": [0, 0, 1, 1]}] * 31):
            status, data, _ = server.post("/v1/generate", {**body, "layout": bad})
            assert status == 400 and json.loads(data)["error"]["param"].startswith("layout"), data
