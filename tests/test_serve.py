"""python -m engine.serve on loopback with tiny ONNX Runtime engines: the APIs, batching, bad input, metrics.

Oracles: the library itself (`Pipeline.run` in this process on the same engine directory) for pixels, the
official `openai` client for the OpenAI-compatible route, Pillow for the PNGs and their metadata.
"""
from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import PIL.Image
import pytest

from engine.request import Request
from tests.helpers import assert_same_pixels, b64_png, metric, png_pixels, running_server

MAX_IMAGES = 4
BODY_MB = 1


@pytest.fixture(scope="module")
def server(ort_engines, tmp_path_factory):
    # a long batching window so concurrent test requests share a batch deterministically
    flags = ("--max-wait-ms", "400", "--max-images", str(MAX_IMAGES), "--max-body-mb", str(BODY_MB))
    with running_server(ort_engines, tmp_path_factory.mktemp("serve"), *flags) as s:
        yield s


@pytest.fixture(scope="module")
def library(ort_pipeline):
    return ort_pipeline


def generate(server, **body) -> dict:
    status, data, _ = server.post("/v1/generate", body)
    assert status == 200, data
    return json.loads(data)


def test_health_ready_info(server):
    assert server.get("/healthz")[0] == 200
    status, body, _ = server.get("/readyz")
    assert status == 200 and json.loads(body) == {"status": "ready", "model": "tiny", "backend": "onnxruntime"}
    info = json.loads(server.get("/v1/info")[1])
    assert (info["height"], info["width"], info["max_images"]) == (64, 64, MAX_IMAGES)
    assert info["defaults"]["steps"] == Request().steps and "dpmpp_2m" in info["samplers"]


def test_openai_client_generates_the_library_images(server, library):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a red fox in snow", n=2, size="64x64", response_format="b64_json",
                                    extra_body={"steps": 5, "seed": 11, "guidance_scale": 5.0,
                                                "negative_prompt": "blurry", "scheduler": "euler_a"})
    got = [png_pixels(d.b64_json) for d in result.data]
    want = library.run(Request(prompt="a red fox in snow", negative_prompt="blurry", steps=5, seed=11,
                               guidance_scale=5.0, sampler="euler_a", images=2), progress=False)
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        assert_same_pixels(g, w.pixels)
    # `sampler`, as /v1/generate and /v1/info name it, is the same field (it was `scheduler` only here)
    named = client.images.generate(prompt="a red fox in snow", n=1, size="64x64", response_format="b64_json",
                                   extra_body={"steps": 5, "seed": 11, "guidance_scale": 5.0,
                                               "negative_prompt": "blurry", "sampler": "euler_a"})
    assert_same_pixels(png_pixels(named.data[0].b64_json), want[0].pixels)


def test_openai_client_sees_errors_as_bad_request(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="width 72"):
        client.images.generate(prompt="x", size="72x64")
    with pytest.raises(openai.BadRequestError, match="n 5 is over"):
        client.images.generate(prompt="x", n=MAX_IMAGES + 1)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.images.generate(prompt="x", extra_body={"response_format": "jpeg"})


def test_generate_returns_pngs_with_metadata_and_seeds(server, library):
    out = generate(server, prompt="a lighthouse", steps=4, seed=100, images=2, sampler="ddim")
    assert [im["seed"] for im in out["images"]] == [100, 101]
    assert set(out["timings_ms"]) >= {"queue", "compute", "total", "clip", "unet", "vae"}
    png = PIL.Image.open(io.BytesIO(base64.b64decode(out["images"][1]["b64_png"])))
    assert "Seed: 101" in png.text["parameters"] and "Steps: 4" in png.text["parameters"]
    assert json.loads(png.text["sd_engine"])["prompt"] == "a lighthouse"
    alone = library.run(Request(prompt="a lighthouse", steps=4, seed=101, sampler="ddim"), progress=False)[0]
    assert_same_pixels(png_pixels(out["images"][1]["b64_png"]), alone.pixels)


def test_png_response_format(server):
    status, data, headers = server.post("/v1/generate", {"prompt": "a boat", "steps": 3, "seed": 5,
                                                        "response_format": "png"})
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-seed"] == "5"
    assert png_pixels(data).shape == (64, 64, 3) and "unet" in json.loads(headers["x-timings-ms"])


def test_img2img_json_base64_and_multipart_give_the_same_image(server, library):
    init = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    body = {"prompt": "a painting", "steps": 4, "seed": 3, "strength": 0.6}
    as_json = generate(server, **body, init_image=b64_png(init))
    boundary = "sdenginetestboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in body.items()]
    png = base64.b64decode(b64_png(init))
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="init_image"; filename="a.png"\r\n'
                 f'Content-Type: image/png\r\n\r\n'.encode() + png + b"\r\n")
    status, data, _ = server.post("/v1/generate", b"".join(parts) + f"--{boundary}--\r\n".encode(),
                                  content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200, data
    a = png_pixels(as_json["images"][0]["b64_png"])
    b = png_pixels(json.loads(data)["images"][0]["b64_png"])
    want = library.run(Request(prompt="a painting", steps=4, seed=3, strength=0.6, init_image=init),
                       progress=False)[0]
    assert_same_pixels(a, want.pixels)
    assert_same_pixels(b, want.pixels)


def test_concurrent_requests_share_a_batch_and_match_running_alone(server):
    """Different prompts, seeds and guidance scales in one UNet batch; each image equals its solo run."""
    bodies = [{"prompt": f"a city at night, take {i}", "steps": 6, "seed": 40 + i, "guidance_scale": 3.0 + i,
               "sampler": "dpmpp_2m"} for i in range(4)]
    results: dict[int, dict] = {}

    def send(i: int) -> None:
        results[i] = generate(server, **bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    assert max(r["batch_images"] for r in results.values()) >= 2, [r["batch_images"] for r in results.values()]
    for i, body in enumerate(bodies):  # one at a time: each runs alone
        solo = generate(server, **body)
        assert solo["batch_images"] == 1
        assert_same_pixels(png_pixels(results[i]["images"][0]["b64_png"]),
                           png_pixels(solo["images"][0]["b64_png"]))


BAD = [  # (body, status, param, words in the message)
    (b'{"prompt": "a cat",', 400, None, "malformed JSON"),
    ({"prompt": "a cat", "colour": "red"}, 400, "colour", "unknown field"),
    ({"steps": 4, "prompt": 5}, 400, "prompt", "valid string"),  # absent or null: none given (text models: the default)
    ({"prompt": "a cat", "height": 72}, 400, "height", "multiple of 16"),
    ({"prompt": "a cat", "width": 8208}, 400, "width", "less than or equal to 8192"),
    ({"prompt": "a cat", "height": 2064}, 400, "height", "--max-size 2048"),
    ({"prompt": "a cat", "images": MAX_IMAGES + 1}, 400, "images", "--max-images"),
    ({"prompt": "a cat", "steps": 0}, 400, "steps", "greater than or equal to 1"),
    ({"prompt": "a cat", "sampler": "heun9"}, 400, "sampler", "unknown sampler"),
    ({"prompt": "a cat", "guidance_scale": "loud"}, 400, "guidance_scale", "number"),
    ({"prompt": "a cat\u0007"}, 400, "prompt", "control character"),
    ({"prompt": "a cat", "init_image": "not base64!"}, 400, "init_image", "base64"),
    ({"prompt": "a cat", "init_image": base64.b64encode(b"GIF89a but not really").decode()}, 400, "init_image",
     "not an image"),
    ({"prompt": "a cat", "mask": b64_png(np.zeros((64, 64, 3), np.uint8))}, 400, "mask", "init image"),
    ({"prompt": "a cat", "strength": 0.5}, 400, "strength", "init image"),
    ({"prompt": "a cat", "images": 2, "response_format": "png"}, 400, "response_format", "one image"),
    ({"prompt": "a cat", "seed": 2**64}, 400, "seed", "less than or equal"),
    ([1, 2, 3], 400, None, "should be an object"),
    ({"prompt": "a cat", "original_size": [512, 512]}, 400, "original_size", "takes no original_size"),
    ({"prompt": "a cat", "crop": [1, 2, 3]}, 400, "crop", "at most 2"),
    ({"prompt": "a cat", "loras": [{"name": "style"}]}, 400, "loras", "start it with --lora-dir"),
    ({"prompt": "a cat", "loras": [{"name": "../etc/passwd"}]}, 400, "loras.0.name", "pattern"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, param, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer, _ = server.post("/v1/generate", data)
    error = json.loads(answer)["error"]
    assert got == status, error
    assert error["param"] == param and words in error["message"], error


def test_openai_route_bad_input(server):
    for body, param in [({"prompt": "x", "size": "big"}, "size"), ({"prompt": "x", "n": 0}, "n"),
                        ({"prompt": "x", "scheduler": "nope"}, "scheduler"), ({"prompt": "x", "hd": True}, "hd"),
                        ({"prompt": "x", "sampler": "nope"}, "sampler")]:
        status, answer, _ = server.post("/v1/images/generations", body)
        assert status == 400 and json.loads(answer)["error"]["param"] == param, answer
    status, answer, _ = server.post("/v1/images/generations", {"prompt": "x", "sampler": "ddim", "scheduler": "euler"})
    assert status == 400 and "disagree" in json.loads(answer)["error"]["message"], answer


def test_oversized_body_is_413_and_unknown_routes_are_json(server):
    big = json.dumps({"prompt": "x" * (BODY_MB * 2**20 + 10)}).encode()
    status, answer, _ = server.post("/v1/generate", big)
    assert status == 413 and "--max-body-mb" in json.loads(answer)["error"]["message"]
    status, answer, _ = server.get("/v2/nothing")
    assert status == 404 and "error" in json.loads(answer)
    status, answer, _ = server.post("/v1/generate", b"prompt=x", content_type="text/plain")
    assert status == 415 and "application/json" in json.loads(answer)["error"]["message"]


def test_metrics_count_requests_batches_and_images(server):
    before = metric(server, "sd_inference_count_total", required=True)
    generate(server, prompt="a tree", steps=2, images=3)
    text = server.get("/metrics")[1].decode()
    assert metric(server, "sd_inference_count_total", required=True) == before + 3
    for name in ("sd_inference_request_success_total", "sd_inference_exec_count_total",
                 "sd_inference_pending_request_count", "sd_inference_batch_size_bucket",
                 "sd_inference_queue_duration_seconds_bucket", "sd_inference_compute_duration_seconds_bucket",
                 "sd_inference_request_duration_seconds_bucket", 'sd_inference_stage_duration_seconds_count{stage="unet"}',
                 'sd_http_requests_total{path="/v1/generate",status="400"}'):
        assert name in text, name

