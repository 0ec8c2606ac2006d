"""The tiny decoder (AutoencoderTiny: TAESD) vs diffusers' own AutoencoderTiny in its StableDiffusionPipeline; live
previews (CLI files, library callbacks) vs diffusers' latents at that step; the server's streamed answer read by a
real streaming client (httpx), equal to the non-streamed one; bad input by field."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from engine.previews import Previews
from engine.request import Request, RequestError
from tests.helpers import PROMPTS, gens, max_diff, png_pixels, running_server, to_uint8
from tests.sampler_cases import diffusers_scheduler

SEEDS = [5, 9]
SIZE = 64


@pytest.fixture(scope="module")
def pipe(tiny_vae_pipeline):
    return tiny_vae_pipeline


@pytest.fixture(scope="module")
def reference(pipe, engine_cache):
    """diffusers' StableDiffusionPipeline on the same folder with the same AutoencoderTiny as its VAE."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(pipe.info["source"], safety_checker=None, local_files_only=True)
    ref.vae = AutoencoderTiny.from_pretrained(engine_cache / "taesd-random")
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("euler", pipe.scheduler_config)
    return ref


def ours(pipe, preview=None, **fields) -> np.ndarray:
    reqs = [Request(prompt=p, seed=s, steps=6, sampler="euler", height=SIZE, width=SIZE, **fields)
            for p, s in zip(PROMPTS, SEEDS, strict=True)]
    return np.stack([g.pixels for g in pipe.run(reqs, progress=False, batch_size=2, preview=preview)])


def test_tiny_decoder_matches_diffusers_autoencoder_tiny(pipe, reference):
    want = to_uint8(reference(PROMPTS, num_inference_steps=6, generator=gens(SEEDS), height=SIZE, width=SIZE, output_type="np").images)
    got = ours(pipe, decoder="tiny")
    assert max_diff(got, want) <= 2
    assert max_diff(got, ours(pipe)) > 10  # the VAE's image is another image: the tiny decoder really decoded


def test_previews_are_diffusers_latents_at_that_step_through_the_tiny_decoder(pipe, reference):
    seen: dict[int, np.ndarray] = {}
    final = ours(pipe, Previews(2, lambda done, total, rows, px: None if px is None else seen.setdefault(done, px)))
    assert sorted(seen) == [2, 4]  # every 2 steps, never after the last (that is the image)
    latents: dict[int, torch.Tensor] = {}

    def grab(p, i, t, kw):
        latents[i + 1] = kw["latents"].clone()
        return kw

    reference(PROMPTS, num_inference_steps=6, generator=gens(SEEDS), height=SIZE, width=SIZE, output_type="np", callback_on_step_end=grab)
    for step in (2, 4):
        with torch.no_grad():
            want = reference.vae.decode(latents[step]).sample
        want = to_uint8((want / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
        assert max_diff(seen[step], want) <= 2, step
    assert np.array_equal(final, ours(pipe))  # previews change nothing in the images


def test_cli_writes_previews(tiny_vae_engines, tmp_path):
    from PIL import Image

    from engine.generate import main

    out = tmp_path / "fox.png"
    assert main(["--engine-dir", str(tiny_vae_engines), "--prompt", "a fox", "--steps", "5", "--preview-every", "2",
                 "--decoder", "tiny", "--output", str(out)]) == 0
    names = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert names == ["step-0002-0-0.png", "step-0004-0-0.png"]
    assert Image.open(tmp_path / "previews" / names[0]).size == (SIZE, SIZE)
    assert "VAE: taesd-random" in Image.open(out).text["parameters"]


def test_tiny_decoder_needs_the_build(ort_pipeline):
    with pytest.raises(RequestError) as e:
        ort_pipeline.prepare(Request(prompt="a", decoder="tiny"))
    assert e.value.field == "decoder" and "--tiny-vae" in str(e.value)
    with pytest.raises(RequestError) as e:
        ort_pipeline.prepare(Request(prompt="a", decoder="small"))
    assert e.value.field == "decoder"


def test_build_refuses_what_is_not_a_tiny_vae(tmp_path):
    from export.tiny_vae import check_folder

    with pytest.raises(ValueError, match="no config.json"):
        check_folder(tmp_path, 4, "tiny")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="not an AutoencoderTiny"):
        check_folder(tmp_path, 4, "tiny")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", "latent_channels": 16}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="decodes 16-channel latents"):
        check_folder(tmp_path, 4, "tiny")


def _events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_server_streams_progress_previews_and_the_same_image(tiny_vae_engines, tmp_path_factory):
    import httpx

    body = {"prompt": "a red fox", "steps": 5, "seed": 3, "sampler": "euler", "height": SIZE, "width": SIZE}
    with running_server(tiny_vae_engines, tmp_path_factory.mktemp("stream")) as server:
        plain = httpx.post(server.url + "/v1/generate", json=body, timeout=60).json()
        chunks = []
        with httpx.stream("POST", server.url + "/v1/generate", json={**body, "stream": True, "preview_every": 2},
                          timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for chunk in r.iter_text():
                chunks.append(chunk)
        assert len(chunks) > 1  # the events arrived as the steps ran, not in one piece at the end
        events = _events("".join(chunks))
        bad = httpx.post(server.url + "/v1/generate", json={**body, "stream": True, "steps": 0}, timeout=60)
    names = [e for e, _ in events]
    assert names == ["progress", "progress", "preview", "progress", "progress", "preview", "progress", "result"]
    assert [d["step"] for e, d in events if e == "progress"] == [1, 2, 3, 4, 5]
    previews = [d for e, d in events if e == "preview"]
    assert [(d["step"], d["total"], d["index"]) for d in previews] == [(2, 5, 0), (4, 5, 0)]
    assert png_pixels(previews[0]["b64_png"]).shape == (SIZE, SIZE, 3)
    result = events[-1][1]
    assert np.array_equal(png_pixels(result["images"][0]["b64_png"]), png_pixels(plain["images"][0]["b64_png"]))
    assert result["images"][0]["seed"] == 3
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "steps"  # checked before the stream begins
    assert base64.b64decode(previews[1]["b64_png"])[:8] == b"\x89PNG\r\n\x1a\n"
