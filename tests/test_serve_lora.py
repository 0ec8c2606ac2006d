"""LoRA through the server: `loras: [{name, scale}]` names adapters of --lora-dir; the image equals the library's
run of the same Request with those adapters; adapters and no adapters interleave without residue."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("peft")

from engine.lora import Adapter  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402
from engine.request import Request  # noqa: E402
from tests.helpers import max_diff, running_server, write_kohya  # noqa: E402


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_dir")
    write_kohya(out, 21, r=4, alpha=2.0)
    return out


@pytest.fixture(scope="module")
def server(ort_engines, lora_dir, tmp_path_factory):
    with running_server(ort_engines, tmp_path_factory.mktemp("serve_lora"), "--lora-dir", str(lora_dir)) as s:
        yield s


def _image(server, **body) -> np.ndarray:
    status, data, _ = server.post("/v1/generate", {"prompt": "a red bicycle", "steps": 3, "seed": 9, **body})
    assert status == 200, data
    image = PIL.Image.open(io.BytesIO(base64.b64decode(json.loads(data)["images"][0]["b64_png"])))
    if body.get("loras"):  # the PNG names its adapters, A1111's way
        assert all(f"<lora:{r['name']}:" in image.text["parameters"] for r in body["loras"])
    return np.asarray(image.convert("RGB"))


def test_server_lora_matches_the_library(server, ort_engines, lora_dir):
    pipe = Pipeline.load(ort_engines)
    try:
        req = dict(prompt="a red bicycle", steps=3, seed=9)
        base = pipe.run(Request(**req), progress=False)[0].pixels
        want = pipe.run(Request(**req, loras=(Adapter(lora_dir / "kohya_21.safetensors", 0.7),)), progress=False)[0]
    finally:
        pipe.close()
    got = _image(server, loras=[{"name": "kohya_21", "scale": 0.7}])
    assert max_diff(got, want.pixels) <= 1
    assert max_diff(got, base) > 2
    assert np.array_equal(_image(server), base)  # no adapter after one: no residue
    status, data, _ = server.post("/v1/generate", {"prompt": "x", "loras": [{"name": "missing"}]})
    error = json.loads(data)["error"]
    assert status == 400 and error["param"] == "loras" and "'missing'" in error["message"], error
    assert "kohya_21" not in error["message"]  # the folder is not listed to a client
