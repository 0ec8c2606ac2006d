"""IP-Adapter on `tiny` (export/ip_adapter.py, engine/ip_adapter.py): a seeded random adapter in the published layout
and its CLIP vision encoder built into an ONNX Runtime engine set, against diffusers' StableDiffusionPipeline with
`load_ip_adapter` on the same files; scale 0 and no image prompt give the text-only image exactly; batching, step
batching, the CLI, the server, the playground, the image preprocessing against transformers' CLIPImageProcessor,
and bad adapters and bad image prompts named."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from engine.pipeline import Pipeline
from engine.png import parameters_text
from engine.request import Request, RequestError
from export.ip_adapter import CLIP_MEAN, CLIP_STD, random_ip_adapter
from tests.a1111 import parse_a1111
from tests.helpers import PROMPTS, alone, assert_same_pixels, drive, gens, max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

SIZE = 64


def photo(seed: int, height: int = 48, width: int = 80) -> np.ndarray:
    """An image prompt of another size and aspect than the encoder's input (resized and cropped), uint8 [H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def adapter(conditioned_parts) -> Path:
    return conditioned_parts["ip"]


@pytest.fixture(scope="module")
def ip_engines(conditioned_engines) -> Path:
    """tiny with the adapter (and the ControlNets of tests/test_controlnet.py: one shared build, conftest)."""
    return conditioned_engines


@pytest.fixture(scope="module")
def ours(ip_engines):
    pipe = Pipeline.load(ip_engines)
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def reference(tiny_folder, adapter):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name,
                         image_encoder_folder="image_encoder", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_images(pipe: Pipeline, sampler: str, seeds: list[int], image, scale: float, steps: int = 4) -> np.ndarray:
    reqs = [Request(prompt=p, steps=steps, sampler=sampler, seed=s, height=SIZE, width=SIZE, ip_image=image,
                    ip_scale=scale) for p, s in zip(PROMPTS, seeds, strict=True)]
    return stack_pixels(pipe.run(reqs, progress=False))


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_image_prompt_matches_diffusers(ours, reference, sampler, scale):
    from PIL import Image

    image = photo(1)
    reference.scheduler = diffusers_scheduler(sampler, ours.scheduler_config)
    reference.set_ip_adapter_scale(scale)
    want = to_uint8(reference(PROMPTS, num_inference_steps=4, height=SIZE, width=SIZE, output_type="np",
                              generator=gens([3, 4]), ip_adapter_image=Image.fromarray(image)).images)
    got = our_images(ours, sampler, [3, 4], image, scale)
    assert max_diff(got, want) <= 2
    assert max_diff(got, our_images(ours, sampler, [3, 4], None, 1.0)) > 20  # the image prompt changes the image


def test_scale_zero_is_the_text_only_image_exactly(ours, ort_pipeline):
    plain = our_images(ours, "euler", [5, 6], None, 1.0)
    np.testing.assert_array_equal(our_images(ours, "euler", [5, 6], photo(2), 0.0), plain)
    np.testing.assert_array_equal(plain, our_images(ort_pipeline, "euler", [5, 6], None, 1.0))  # engines without it


def test_rows_with_different_image_prompts_share_a_batch_and_equal_alone(ours):
    a = Request(prompt=PROMPTS[0], steps=4, sampler="euler", seed=1, height=SIZE, width=SIZE, ip_image=photo(3))
    b = dataclasses.replace(a, prompt=PROMPTS[1], seed=2, ip_image=photo(4), ip_scale=0.4)
    c = dataclasses.replace(a, seed=3, ip_image=None)
    together = stack_pixels(ours.run([a, b, c], progress=False, batch_size=3))
    alone_ = stack_pixels([ours.run(r, progress=False, batch_size=1)[0] for r in (a, b, c)])
    assert max_diff(together, alone_) <= 1


def test_step_batching_rows_with_image_prompts_match_alone(ours):
    from engine.continuous import Flight

    reqs = {"a": Request(prompt=PROMPTS[0], steps=5, sampler="euler", seed=7, height=SIZE, width=SIZE,
                         ip_image=photo(5), ip_scale=0.8),
            "b": Request(prompt=PROMPTS[1], steps=4, sampler="euler", seed=8, height=SIZE, width=SIZE),
            "c": Request(prompt=PROMPTS[1], steps=3, sampler="euler", seed=9, height=SIZE, width=SIZE,
                         ip_image=photo(6), ip_scale=1.5)}
    images, errors = drive(Flight(ours, max_batch=4), {0: [(reqs["a"], "a")], 1: [(reqs["b"], "b")],
                                                       2: [(reqs["c"], "c")]}, ours)
    assert not errors
    for owner, req in reqs.items():
        assert_same_pixels(images[owner][0][1], alone(ours, req)[0])


def test_images_record_their_image_prompt(ours, tmp_path):
    from PIL import Image

    path = tmp_path / "prompt.png"
    Image.fromarray(photo(7)).save(path)
    r = ours.run(Request(steps=2, seed=4, height=SIZE, width=SIZE, ip_image=path, ip_scale=0.7), progress=False)[0]
    assert (r.params["ip_adapter"], r.params["ip_scale"], r.params["ip_image"]) == ("ip-tiny", 0.7, str(path))
    assert parse_a1111(parameters_text(r.params))["ControlNet 0"] == (
        "Module: ip-adapter_clip, Model: ip-tiny, Weight: 0.7, Guidance Start: 0, Guidance End: 1")
    plain = ours.run(Request(steps=2, seed=4, height=SIZE, width=SIZE), progress=False)[0]
    assert "ip_adapter" not in plain.params and "ip_scale" not in plain.params


@pytest.mark.parametrize("size", [(48, 80), (81, 40), (32, 32), (300, 200)])
def test_image_prompts_are_preprocessed_as_clip_image_processor(size):
    from transformers import CLIPImageProcessor

    from engine.ip_adapter import pixels

    image, side = photo(8, *size), 224 if size[0] > 100 else 32
    want = CLIPImageProcessor(size=side, crop_size=side)(image, return_tensors="pt").pixel_values
    got = pixels(image, {"resize": side, "crop": side, "mean": CLIP_MEAN, "std": CLIP_STD})
    import torch

    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_bad_image_prompts_are_named(ours, ort_pipeline, tmp_path):
    garbage = tmp_path / "not-an-image.png"
    garbage.write_bytes(b"these bytes are no image")
    for pipe, request, words in (
            (ours, Request(ip_image=garbage), "not-an-image.png"),
            (ours, Request(ip_image=tmp_path / "missing.png"), "does not exist"),
            (ours, Request(ip_image=photo(1), ip_scale=3.0), "ip_scale 3 is outside [0, 2]"),
            (ort_pipeline, Request(ip_image=photo(1)), "was built without an IP-Adapter")):
        with pytest.raises(RequestError, match=words.replace("[", r"\[")) as info:
            pipe.prepare(dataclasses.replace(request, height=SIZE, width=SIZE))
        assert info.value.field == ("ip_scale" if "scale" in words else "ip_image")


def test_bad_adapters_are_refused_at_build(tmp_path, adapter, xl_folder):
    from safetensors.torch import load_file, save_file

    from engine import build

    def refused(words: str, *extra: str) -> None:
        argv = ["--model", "tiny", "--backend", "onnxruntime", "--engine-dir", str(tmp_path / "e"), *extra]
        assert build.main(argv) == 2, words
        assert not (tmp_path / "e").exists()  # refused before any work

    pickled = tmp_path / "ip.bin"
    pickled.write_bytes(b"x")
    tensors = load_file(str(adapter))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": tensors["image_proj.proj.bias"][:4]}, str(lora))
    plus = tmp_path / "plus.safetensors"
    save_file({**{k: v for k, v in tensors.items() if "image_proj.proj" not in k},
               "image_proj.latents": tensors["image_proj.norm.bias"].view(1, 1, -1).clone()}, str(plus))
    xl = random_ip_adapter(xl_folder, tmp_path / "ip-xl", seed=6)
    for words, path, extra in (("pickled files", pickled, ()), ("no image_proj.* and ip_adapter.*", lora, ()),
                               ("is IP-Adapter Plus", plus, ()), ("was made for another base model", xl, ()),
                               ("no image encoder at", adapter, ("--image-encoder", str(tmp_path)))):
        refused(words, "--ip-adapter", str(path), *extra)
    refused("--image-encoder without --ip-adapter", "--image-encoder", str(adapter.parent / "image_encoder"))


def test_bad_adapter_messages(tmp_path, adapter, xl_folder):
    from engine.build import build_all
    from engine.config import BuildConfig

    xl = random_ip_adapter(xl_folder, tmp_path / "ip-xl", seed=6)
    with pytest.raises(ValueError, match=r"its image tokens are 64 wide, the UNet of tiny has cross_attention_dim 32"):
        build_all(BuildConfig(model="tiny", backend="onnxruntime", engine_dir=tmp_path / "e", ip_adapter=str(xl),
                              image_encoder=str(adapter.parent / "image_encoder")), progress=False)


# ---- the CLI, the server and the playground ----


def test_cli_generates_the_api_image(ours, ip_engines, tmp_path, capsys):
    from PIL import Image

    from engine import generate

    prompt = tmp_path / "prompt.png"
    Image.fromarray(photo(9)).save(prompt)
    out = tmp_path / "out.png"
    argv = ["--engine-dir", str(ip_engines), "--prompt", PROMPTS[0], "--steps", "3", "--seed", "2",
            "--height", str(SIZE), "--width", str(SIZE), "--ip-image", str(prompt), "--ip-scale", "0.6"]
    assert generate.main([*argv, "--output", str(out)]) == 0
    want = ours.run(Request(prompt=PROMPTS[0], steps=3, seed=2, height=SIZE, width=SIZE, ip_image=prompt,
                            ip_scale=0.6), progress=False)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), want.pixels)
    assert generate.main([*argv, "--ip-scale", "5", "--output", str(tmp_path / "x.png")]) == 2
    assert "error: --ip-scale 5 is outside [0, 2]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ip_server(ip_engines, tmp_path_factory):
    from tests.helpers import running_server

    with running_server(ip_engines, tmp_path_factory.mktemp("ip_server")) as server:
        yield server


def test_server_takes_the_image_prompt_as_json_and_multipart(ours, ip_server):
    import base64

    from tests.helpers import b64_png, png_pixels

    image = photo(10)
    body = {"prompt": PROMPTS[1], "steps": 3, "seed": 4, "height": SIZE, "width": SIZE, "ip_scale": 0.9}
    want = ours.run(Request(prompt=PROMPTS[1], steps=3, seed=4, height=SIZE, width=SIZE, ip_image=image,
                            ip_scale=0.9), progress=False)[0].pixels
    status, data, _ = ip_server.post("/v1/generate", {**body, "ip_image": b64_png(image)})
    assert status == 200, data
    answer = json.loads(data)["images"][0]
    np.testing.assert_array_equal(png_pixels(answer["b64_png"]), want)
    assert (answer["params"]["ip_adapter"], answer["params"]["ip_scale"]) == ("ip-tiny", 0.9)
    boundary = "ipadaptertestboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in body.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="ip_image"; filename="p.png"\r\n'
                 f'Content-Type: image/png\r\n\r\n'.encode() + base64.b64decode(b64_png(image)) + b"\r\n")
    status, data, _ = ip_server.post("/v1/generate", b"".join(parts) + f"--{boundary}--\r\n".encode(),
                                     content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200, data
    np.testing.assert_array_equal(png_pixels(json.loads(data)["images"][0]["b64_png"]), want)
    for bad, param in (({"ip_image": b64_png(image), "ip_scale": 5}, "ip_scale"),
                       ({"ip_image": base64.b64encode(b"no image here").decode()}, "ip_image")):
        status, data, _ = ip_server.post("/v1/generate", {**body, **bad})
        assert status == 400 and json.loads(data)["error"]["param"] == param, data
    status, data, _ = ip_server.get("/v1/info")
    assert json.loads(data)["ip_adapter"] == "ip-tiny"


def test_playground_sends_the_chosen_image_prompt(ours, ip_server, tmp_path):
    """The playground page (headless Debian chromium) shows the image prompt section for these engines and sends
    the uploaded image with its weight."""
    from PIL import Image

    from tests.browser import generate, playground
    from tests.helpers import png_pixels

    path = tmp_path / "prompt.png"
    Image.fromarray(photo(11)).save(path)
    with playground(ip_server.url) as page:
        page.wait_for_selector("#ip-section", state="visible")
        page.fill("#ip-scale", "0.7")
        page.set_input_files("#ip-file", str(path))
        page.wait_for_function("() => ipImage !== null")
        status, sent, got = generate(page, PROMPTS[0], 3, 6)
    assert status == 200, got
    assert sent["ip_scale"] == 0.7
    want = ours.run(Request(prompt=PROMPTS[0], steps=3, seed=6, height=SIZE, width=SIZE, ip_image=path,
                            ip_scale=0.7), progress=False)[0].pixels
    assert max_diff(png_pixels(got["images"][0]["b64_png"]), want) <= 1
