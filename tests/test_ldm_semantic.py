"""Semantic synthesis (family `ldm-semantic`, the paper's landscapes model's shape: a label map through the spatial
rescaler, concatenated to the latents of a UNet2DModel; VQ-f4): the seeded tiny-ldm-semantic built for ONNX Runtime
fp32 vs the original's loop composed from diffusers' modules (the map one-hot over its 182 classes, bilinear x0.5
twice, the 1x1 convolution: `SpatialRescaler.forward`; UNet2DModel, VQModel, DDIM), at the trained size and far past
it, then the map's checks by field, the CLI and the server."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from engine.pipeline import Pipeline
from engine.request import Request, RequestError
from export.models import resolve_model
from tests.helpers import b64_png, max_diff, png_pixels, running_server

STEPS = 8
CLASSES = 182


def label_map(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blocks of classes (sky, hills, water-like bands) with a few random blobs: uint8 [H, W] class ids."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.uint8)
    for row in range(0, height, max(height // 4, 1)):
        labels[row:] = rng.integers(0, CLASSES)
    for _ in range(6):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        labels[y:y + 8, x:x + 12] = rng.integers(0, CLASSES)
    return labels


@pytest.fixture(scope="module")
def pipe(ldm_semantic_engines):
    p = Pipeline.load(ldm_semantic_engines)
    yield p
    p.close()


class Reference:
    def __init__(self):
        from diffusers import DDIMScheduler, UNet2DModel, VQModel

        from export.families.ldm_modules import SpatialRescaler

        folder = resolve_model("tiny-ldm-semantic")[0]
        self.unet = UNet2DModel.from_pretrained(folder / "unet").eval()
        self.vq = VQModel.from_pretrained(folder / "vqvae").eval()
        self.rescaler = SpatialRescaler.from_pretrained(folder / "semantic_encoder").eval()
        self.scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")

    @torch.no_grad()
    def __call__(self, labels: np.ndarray, seed: int, eta: float = 0.0) -> np.ndarray:
        s, (h, w) = self.scheduler, labels.shape
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), CLASSES).permute(2, 0, 1)[None].float()
        condition = self.rescaler(one_hot)  # [1, 3, H/4, W/4]
        latents = torch.randn((1, 3, h // 4, w // 4), generator=torch.Generator().manual_seed(seed))
        s.set_timesteps(STEPS)
        noise = torch.Generator().manual_seed(seed)
        for t in s.timesteps:
            x = s.scale_model_input(torch.cat([latents, condition], dim=1), t)
            latents = s.step(self.unet(x, t).sample, t, latents, eta=eta, generator=noise).prev_sample
        image = self.vq.decode(latents / self.vq.config.scaling_factor).sample
        return ((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def reference():
    return Reference()


@pytest.mark.parametrize("height, width, seed, eta", [(64, 64, 1, 0.0), (64, 64, 2, 1.0), (64, 192, 3, 0.0)])
def test_semantic_synthesis_matches_the_composed_reference(pipe, reference, height, width, seed, eta):
    """64x192 is three times the preset's trained width: the model is convolutional, any multiple of 8 runs."""
    labels = label_map(height, width, seed)
    want = reference(labels, seed, eta)
    got = pipe.run(Request(semantic_map=labels, height=height, width=width, seed=seed, eta=eta, steps=STEPS,
                           sampler="ddim"), progress=False)[0]
    assert got.pixels.shape == (height, width, 3) and want.std() > 5
    assert max_diff(got.pixels, want) <= 2
    assert "semantic_map" not in got.params and got.params["guidance_scale"] == 1.0


def test_the_map_decides_the_image(pipe):
    a = pipe.run(Request(semantic_map=label_map(64, 64, 5), seed=1, steps=4, sampler="ddim"), progress=False)[0]
    b = pipe.run(Request(semantic_map=label_map(64, 64, 6), seed=1, steps=4, sampler="ddim"), progress=False)[0]
    assert max_diff(a.pixels, b.pixels) > 10


def test_a_palette_png_reads_as_class_ids(pipe, tmp_path):
    """Mode P: the palette index is the class (how label maps are usually saved); the same image as the array."""
    labels = label_map(64, 64, 7)
    image = PIL.Image.fromarray(labels, mode="P")
    image.putpalette(list(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8)))
    image.save(tmp_path / "map.png")
    a = pipe.run(Request(semantic_map=tmp_path / "map.png", seed=3, steps=4, sampler="ddim"), progress=False)[0]
    b = pipe.run(Request(semantic_map=labels, seed=3, steps=4, sampler="ddim"), progress=False)[0]
    assert max_diff(a.pixels, b.pixels) == 0 and a.params["semantic_map"] == str(tmp_path / "map.png")


COLOURS = {"#000000": 0, "#ff0000": 5, "#00ff00": 17, "#0000ff": 120}


def test_a_colour_map_reads_through_its_palette(pipe, tmp_path):
    """An RGB map with --semantic-palette {"#rrggbb": id}: the image of its label map."""
    ids = np.array(list(COLOURS.values()))[label_map(64, 64, 10) % 4]  # [64, 64] of the palette's classes
    rgb = np.zeros((64, 64, 3), np.uint8)
    for colour, label in COLOURS.items():
        rgb[ids == label] = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    (tmp_path / "palette.json").write_text(json.dumps(COLOURS))
    a = pipe.run(Request(semantic_map=PIL.Image.fromarray(rgb), semantic_palette=tmp_path / "palette.json", seed=3,
                         steps=4, sampler="ddim"), progress=False)[0]
    b = pipe.run(Request(semantic_map=ids, seed=3, steps=4, sampler="ddim"), progress=False)[0]
    assert max_diff(a.pixels, b.pixels) == 0
    rgb[5, 7] = [1, 2, 3]
    with pytest.raises(RequestError, match=r"colour #010203 at \(x 7, y 5\) is not in the palette") as err:
        pipe.prepare(Request(semantic_map=PIL.Image.fromarray(rgb), semantic_palette=COLOURS, steps=2))
    assert err.value.field == "semantic_map"
    with pytest.raises(RequestError, match=r"palette colour 'red' is not #rrggbb") as err:
        pipe.prepare(Request(semantic_map=PIL.Image.fromarray(rgb), semantic_palette={"red": 1}, steps=2))
    assert err.value.field == "semantic_palette"


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"needs a semantic map"),
    ({"semantic_map": np.full((64, 64), 182, np.int32)}, r"class 182 at \(x 0, y 0\) is not one of the model's 182 "
                                                          r"classes \(0..181\)"),
    ({"semantic_map": np.zeros((32, 64), np.int32)}, r"the semantic map is 64x32, the request 64x64"),
    ({"semantic_map": PIL.Image.new("RGB", (64, 64))}, r"not a mode RGB image"),
    ({"semantic_map": np.zeros((64, 64), np.float32)}, r"must be 2-D integers"),
])
def test_bad_maps_name_the_field(pipe, kwargs, message):
    with pytest.raises(RequestError, match=message) as err:
        pipe.prepare(Request(steps=2, **kwargs))
    assert err.value.field == "semantic_map"


def test_a_smaller_map_is_resized_nearest_when_asked(pipe):
    small = label_map(32, 32, 8)
    got = pipe.run(Request(semantic_map=small, resize=True, seed=4, steps=4, sampler="ddim"), progress=False)[0]
    big = np.asarray(PIL.Image.fromarray(small).resize((64, 64), PIL.Image.Resampling.NEAREST))
    want = pipe.run(Request(semantic_map=big, seed=4, steps=4, sampler="ddim"), progress=False)[0]
    assert max_diff(got.pixels, want.pixels) == 0


def test_cli_and_server(ldm_semantic_engines, tmp_path, tmp_path_factory, pipe):
    labels = label_map(64, 128, 9)
    PIL.Image.fromarray(labels, mode="L").save(tmp_path / "map.png")
    out = tmp_path / "s.png"
    done = subprocess.run([sys.executable, "-m", "engine.generate", "--engine-dir", str(ldm_semantic_engines),
                           "--steps", "4", "--scheduler", "ddim", "--seed", "5", "--height", "64", "--width", "128",
                           "--semantic-map", str(tmp_path / "map.png"), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = pipe.run(Request(semantic_map=labels, height=64, width=128, steps=4, sampler="ddim", seed=5),
                    progress=False)[0].pixels
    assert max_diff(png_pixels(out.read_bytes()), want) <= 1
    with running_server(ldm_semantic_engines, tmp_path_factory.mktemp("serve-ldm-semantic")) as server:
        body = {"semantic_map": b64_png(labels), "height": 64, "width": 128, "steps": 4, "sampler": "ddim", "seed": 5}
        status, data, _ = server.post("/v1/generate", body)
        assert status == 200, data
        assert max_diff(png_pixels(json.loads(data)["images"][0]["b64_png"]), want) <= 1
        bad = {**body, "semantic_map": b64_png(np.full((64, 128), 200, np.uint8))}
        status, data, _ = server.post("/v1/generate", bad)
        assert status == 400 and json.loads(data)["error"]["param"] == "semantic_map", data
