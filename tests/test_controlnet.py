"""ControlNet on `tiny` (engine/control.py, export/control.py): seeded random ControlNets built as components of an
ONNX Runtime engine set, against diffusers' StableDiffusionControlNetPipeline / …Img2ImgPipeline on the same
folders; a request without control on those engines equals the engines built without ControlNets; bad input and
bad ControlNets are named."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine.control import Control
from engine.pipeline import Pipeline
from engine.png import parameters_text
from engine.request import Request, RequestError
from tests.a1111 import parse_a1111
from tests.helpers import PROMPTS, gens, init_image, mask_image, max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

SIZE = 64


def control_image(seed: int, size: int = SIZE) -> np.ndarray:
    """A blocky edge-map-like control image: white strokes on black, uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, size - 8, 2)
        img[y:y + 8, x:x + 2] = 255
        img[y:y + 2, x:x + 8] = 255
    return img


@pytest.fixture(scope="module")
def nets(conditioned_parts) -> dict[str, Path]:
    return {name: conditioned_parts[name] for name in ("edges", "depth")}


@pytest.fixture(scope="module")
def control_engines(conditioned_engines) -> Path:
    """tiny with both ControlNets (and the IP-Adapter of tests/test_ip_adapter.py: one shared build, conftest)."""
    return conditioned_engines


@pytest.fixture(scope="module")
def ours(control_engines):
    pipe = Pipeline.load(control_engines)
    yield pipe
    pipe.close()


def reference(folder: Path, nets: list[Path], kind: str = "txt2img"):
    import diffusers
    from diffusers import ControlNetModel

    cls = {"txt2img": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline",
           "inpaint": "StableDiffusionControlNetInpaintPipeline"}[kind]
    models = [ControlNetModel.from_pretrained(p) for p in nets]
    pipe = getattr(diffusers, cls).from_pretrained(folder, controlnet=models if len(models) > 1 else models[0],
                                                   safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, sampler: str, config: dict, steps: int, seeds: list[int], images: list[np.ndarray],
                     scale, start=0.0, end=1.0, guess=False, guidance=7.5, **extra) -> np.ndarray:
    """diffusers' images; `extra` holds `image` (the init image) for img2img, whose control image is then
    `control_image`."""
    from PIL import Image

    pipe.scheduler = diffusers_scheduler(sampler, config)
    pil = [Image.fromarray(x) for x in images]
    key = "control_image" if "image" in extra else "image"
    extra[key] = pil if len(pil) > 1 else pil[0]
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
               height=SIZE, width=SIZE, output_type="np", generator=gens(seeds), controlnet_conditioning_scale=scale,
               control_guidance_start=start, control_guidance_end=end, guess_mode=guess, **extra).images
    return to_uint8(out)


def our_images(pipe: Pipeline, sampler: str, steps: int, seeds: list[int], controls: tuple[Control, ...],
               guess=False, guidance=7.5, **extra) -> np.ndarray:
    reqs = [Request(prompt=p, steps=steps, sampler=sampler, seed=s, height=SIZE, width=SIZE, controls=controls,
                    guess_mode=guess, guidance_scale=guidance, **extra) for p, s in zip(PROMPTS, seeds, strict=True)]
    return stack_pixels(pipe.run(reqs, progress=False))


@pytest.mark.parametrize("sampler,window", [("ddim", (0.0, 1.0)), ("euler", (0.2, 0.7)),
                                            ("dpmpp_2m", (0.0, 1.0))])
def test_one_controlnet_matches_diffusers(ours, tiny_folder, nets, sampler, window):
    image = control_image(1)
    ref = diffusers_images(reference(tiny_folder, [nets["edges"]]), sampler, ours.scheduler_config, 8, [5, 6],
                           [image], 0.8, *window)
    got = our_images(ours, sampler, 8, [5, 6], (Control("edges", image, 0.8, *window),))
    assert max_diff(got, ref) <= 2, sampler
    plain = our_images(ours, sampler, 8, [5, 6], ())
    assert max_diff(got, plain) > 8  # the net changes the image: the comparison above is not vacuous


def test_two_controlnets_and_guess_mode_match_diffusers(ours, tiny_folder, nets):
    images = [control_image(2), control_image(3)]
    pipe = reference(tiny_folder, [nets["edges"], nets["depth"]])
    ref = diffusers_images(pipe, "euler", ours.scheduler_config, 6, [7, 8], images, [1.0, 0.5], [0.0, 0.1],
                           [1.0, 0.9])
    controls = (Control("edges", images[0], 1.0, 0.0, 1.0), Control("depth", images[1], 0.5, 0.1, 0.9))
    assert max_diff(our_images(ours, "euler", 6, [7, 8], controls), ref) <= 2
    ref = diffusers_images(pipe, "euler", ours.scheduler_config, 6, [7, 8], images, [1.0, 0.5], guess=True)
    controls = (Control("edges", images[0], 1.0), Control("depth", images[1], 0.5))
    assert max_diff(our_images(ours, "euler", 6, [7, 8], controls, guess=True), ref) <= 2


def test_img2img_with_control_matches_diffusers(ours, tiny_folder, nets):
    image, init = control_image(4), init_image(SIZE, seed=3)
    ref = diffusers_images(reference(tiny_folder, [nets["edges"]], "img2img"), "dpmpp_2m", ours.scheduler_config,
                           10, [9, 10], [image], 1.2, 0.0, 0.8, image=init, strength=0.6)
    got = our_images(ours, "dpmpp_2m", 10, [9, 10], (Control("edges", image, 1.2, 0.0, 0.8),), init_image=init,
                     strength=0.6)
    assert max_diff(got, ref) <= 2


def test_inpainting_with_control_matches_diffusers(ours, tiny_folder, nets):
    image, init, mask = control_image(10), init_image(SIZE, seed=4), mask_image(SIZE)
    # one init image and mask per prompt: given one, diffusers' inpainting encodes it with the first generator only
    ref = diffusers_images(reference(tiny_folder, [nets["depth"]], "inpaint"), "ddim", ours.scheduler_config, 8,
                           [11, 12], [image], 0.9, image=[init] * 2, mask_image=[mask] * 2)
    got = our_images(ours, "ddim", 8, [11, 12], (Control("depth", image, 0.9),), init_image=init, mask=mask)
    assert max_diff(got, ref) <= 2


def test_a_lora_and_a_controlnet_together_match_diffusers(ours, tiny_folder, nets, tmp_path):
    """A kohya LoRA merged into the UNet and text encoder while a ControlNet conditions the UNet: diffusers' fused
    LoRA (load_lora_weights + fuse_lora) under its ControlNet pipeline."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from engine.lora import Adapter
    from tests.helpers import fused_pipe, write_kohya

    lora = write_kohya(tmp_path, 31, r=4, alpha=4.0)
    base = fused_pipe(tiny_folder, [(lora, 0.8)])
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=ControlNetModel.from_pretrained(nets["edges"]))
    pipe.set_progress_bar_config(disable=True)
    image = control_image(14)
    ref = diffusers_images(pipe, "euler", ours.scheduler_config, 6, [15, 16], [image], 0.8)
    got = our_images(ours, "euler", 6, [15, 16], (Control("edges", image, 0.8),), loras=(Adapter(lora, 0.8),))
    assert max_diff(got, ref) <= 2
    without = our_images(ours, "euler", 6, [15, 16], (Control("edges", image, 0.8),))
    assert max_diff(got, without) > 8  # the adapter changes the image


def test_without_control_equals_the_engines_built_without_controlnets(ours, ort_pipeline):
    req = Request(prompt=PROMPTS[0], steps=4, sampler="euler", seed=3, height=SIZE, width=SIZE)
    got, want = ours.run(req, progress=False)[0].pixels, ort_pipeline.run(req, progress=False)[0].pixels
    np.testing.assert_array_equal(got, want)


def test_rows_with_different_images_and_scales_share_a_batch_and_equal_alone(ours):
    a = Request(prompt=PROMPTS[0], steps=4, sampler="euler", seed=1, height=SIZE, width=SIZE,
                controls=(Control("edges", control_image(5), 1.0),))
    b = dataclasses.replace(a, prompt=PROMPTS[1], seed=2, controls=(Control("edges", control_image(6), 0.4, 0.0, 0.5),))
    together = stack_pixels(ours.run([a, b], progress=False, batch_size=2))
    alone = stack_pixels([ours.run(r, progress=False, batch_size=1)[0] for r in (a, b)])
    assert max_diff(together, alone) <= 1


def test_images_record_their_controls(ours):
    r = ours.run(Request(steps=2, seed=4, height=SIZE, width=SIZE,
                         controls=(Control("edges", control_image(7), 0.7, 0.1, 0.9),)), progress=False)[0]
    assert r.params["controls"] == [{"name": "edges", "scale": 0.7, "start": 0.1, "end": 0.9}]
    assert r.params["guess_mode"] is False
    text = parameters_text(r.params)  # sd-webui-controlnet's infotext unit, read back by A1111's parser
    assert parse_a1111(text)["ControlNet 0"] == ("Module: none, Model: edges, Weight: 0.7, Guidance Start: 0.1, "
                                                    "Guidance End: 0.9, Control Mode: Balanced")


@pytest.mark.parametrize("control,message", [
    (Control("nope", np.zeros((SIZE, SIZE, 3), np.uint8)), "unknown ControlNet 'nope'"),
    (Control("edges", np.zeros((SIZE, SIZE, 3), np.uint8), scale=3.0), "scale 3.0 is outside [0, 2.0]"),
    (Control("edges", np.zeros((SIZE, SIZE, 3), np.uint8), start=0.5, end=0.5), "0 <= start < end <= 1"),
    (Control("edges", np.zeros((32, SIZE, 3), np.uint8)), "is 64x32 but the requested size is 64x64"),
    (Control("edges", "missing.png"), "control image missing.png does not exist"),
])
def test_bad_controls_are_named(ours, control, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
        ours.prepare(Request(height=SIZE, width=SIZE, controls=(control,)))
    assert info.value.field == "controls"


def test_a_controlnet_for_another_model_or_a_pickle_is_refused_at_build(tmp_path, nets):
    from engine.build import build_all
    from engine.config import BuildConfig

    with pytest.raises(ValueError, match=r"was made for another base model: its block_out_channels is \[64, 128\], "
                                         r"the UNet of tiny-xl has \[32, 64\]"):
        build_all(BuildConfig(model="tiny-xl", backend="onnxruntime", engine_dir=tmp_path / "e",
                              controlnets=(str(nets["edges"]),)), progress=False)
    pickled = tmp_path / "net.ckpt"
    pickled.write_bytes(b"x")
    with pytest.raises(ValueError, match="pickled files"):
        build_all(BuildConfig(model="tiny", backend="onnxruntime", engine_dir=tmp_path / "e",
                              controlnets=(str(pickled),)), progress=False)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((nets["edges"] / "config.json").read_text())
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is not a readable safetensors file"):
        build_all(BuildConfig(model="tiny", backend="onnxruntime", engine_dir=tmp_path / "e",
                              controlnets=(str(corrupt),)), progress=False)
    assert not (tmp_path / "e").exists()  # refused before any work


# ---- the CLI, the canny preprocessor and the server ----


def test_cli_generates_the_api_image_and_names_bad_counts(ours, control_engines, tmp_path, capsys):
    from PIL import Image

    from engine import generate

    image = tmp_path / "edges.png"
    Image.fromarray(control_image(8)).save(image)
    out = tmp_path / "out.png"
    argv = ["--engine-dir", str(control_engines), "--prompt", PROMPTS[0], "--steps", "3", "--seed", "2",
            "--height", str(SIZE), "--width", str(SIZE), "--controlnet", "edges", "--control-image", str(image),
            "--control-scale", "0.6", "--control-end", "0.5", "--output", str(out)]
    assert generate.main(argv) == 0
    want = ours.run(Request(prompt=PROMPTS[0], steps=3, seed=2, height=SIZE, width=SIZE,
                            controls=(Control("edges", image, 0.6, 0.0, 0.5),)), progress=False)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), want.pixels)
    with pytest.raises(SystemExit) as exit_info:
        generate.parse_args(argv + ["--controlnet", "depth"])
    assert exit_info.value.code == 2
    assert "argument --control-image: 1 images for 2 --controlnet names" in capsys.readouterr().err
    assert generate.main([*argv[:-2], "--output", str(tmp_path / "x.png"), "--controlnet", "depth",
                          "--control-image", str(tmp_path / "missing.png")]) == 2
    assert "argument --controlnet: control image" in capsys.readouterr().err


def test_canny_preprocess_gives_opencvs_edge_map(ours, tmp_path):
    import cv2

    photo = init_image(SIZE, seed=5)  # an ordinary RGB image
    edges = cv2.Canny(np.asarray(photo), 50, 150)  # as diffusers' ControlNet guide makes the map
    want = ours.run(Request(steps=3, seed=1, height=SIZE, width=SIZE,
                            controls=(Control("edges", np.stack([edges] * 3, axis=2)),)), progress=False)[0]
    got = ours.run(Request(steps=3, seed=1, height=SIZE, width=SIZE,
                           controls=(Control("edges", photo, preprocess="canny", low=50, high=150),)), progress=False)[0]
    assert edges.any()  # the map has edges: the comparison is not of two blanks
    np.testing.assert_array_equal(got.pixels, want.pixels)
    with pytest.raises(RequestError, match="canny thresholds low 200 and high 100"):
        ours.prepare(Request(height=SIZE, width=SIZE, controls=(Control("edges", photo, preprocess="canny", low=200,
                                                                        high=100),)))


@pytest.fixture(scope="module")
def control_server(control_engines, tmp_path_factory):
    from tests.helpers import running_server

    with running_server(control_engines, tmp_path_factory.mktemp("control_server")) as server:
        yield server


def test_server_takes_controls_as_json_and_multipart(ours, control_server):
    import base64
    import json

    from tests.helpers import b64_png, png_pixels

    server = control_server
    image = control_image(9)
    body = {"prompt": PROMPTS[1], "steps": 3, "seed": 4, "height": SIZE, "width": SIZE}
    controls = [{"name": "edges", "scale": 0.9, "start": 0.0, "end": 0.8}]
    want = ours.run(Request(prompt=PROMPTS[1], steps=3, seed=4, height=SIZE, width=SIZE,
                            controls=(Control("edges", image, 0.9, 0.0, 0.8),)), progress=False)[0].pixels
    status, data, _ = server.post("/v1/generate", {**body, "controls": [{**controls[0], "image": b64_png(image)}]})
    assert status == 200, data
    answer = json.loads(data)["images"][0]
    np.testing.assert_array_equal(png_pixels(answer["b64_png"]), want)
    assert answer["params"]["controls"] == [{"name": "edges", "scale": 0.9, "start": 0.0, "end": 0.8}]
    boundary = "controlnettestboundary"
    fields = {**body, "controls": json.dumps(controls)}
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="control_image"; filename="c.png"\r\n'
                 f'Content-Type: image/png\r\n\r\n'.encode() + base64.b64decode(b64_png(image)) + b"\r\n")
    status, data, _ = server.post("/v1/generate", b"".join(parts) + f"--{boundary}--\r\n".encode(),
                                  content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200, data
    np.testing.assert_array_equal(png_pixels(json.loads(data)["images"][0]["b64_png"]), want)
    for bad, words in (({"name": "nope", "image": b64_png(image)}, "unknown ControlNet 'nope'"),
                       ({"name": "edges"}, "needs exactly one image"),
                       ({"name": "edges", "image": b64_png(image), "scale": 5}, "controls.0.scale")):
        status, data, _ = server.post("/v1/generate", {**body, "controls": [bad]})
        error = json.loads(data)["error"]
        assert status == 400 and error["param"].startswith("controls") and words in error["message"], data
    status, data, _ = server.get("/v1/info")
    assert json.loads(data)["controlnets"] == ["edges", "depth"]  # in the order given to engine.build


def test_playground_sends_the_chosen_control_image(ours, control_server, tmp_path):
    """The playground page (headless Debian chromium, as tests/test_serve_playground.py) shows the engines'
    ControlNets, sends the uploaded control image with its weight, and shows the image the library makes."""
    from PIL import Image

    from tests.browser import generate, playground
    from tests.helpers import png_pixels

    path = tmp_path / "edges.png"
    Image.fromarray(control_image(13)).save(path)
    with playground(control_server.url) as page:
        page.wait_for_selector("#control-section", state="visible")
        page.select_option("#control-name", "edges")
        page.fill("#control-scale", "0.7")
        page.set_input_files("#control-file", str(path))
        page.wait_for_function("() => controlImage !== null")
        status, sent, got = generate(page, PROMPTS[0], 3, 6)
    assert status == 200, got
    assert [(c["name"], c["scale"]) for c in sent["controls"]] == [("edges", 0.7)]
    want = ours.run(Request(prompt=PROMPTS[0], steps=3, seed=6, height=SIZE, width=SIZE,
                            controls=(Control("edges", path, 0.7),)), progress=False)[0].pixels
    assert max_diff(png_pixels(got["images"][0]["b64_png"]), want) <= 1
