"""Textual inversion through the CLI (`engine.generate --embeddings DIR`) and the server (`engine.serve
--embeddings-dir DIR`): the image equals the library's with the same folder, its PNG records `TI hashes`, the server
lists the embeddings (/v1/info, A1111's /sdapi/v1/embeddings), and a folder with a pickle or a missing folder is one
line and exit 2 before any image."""
from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import generate
from engine.pipeline import Pipeline
from engine.request import Request
from tests.a1111 import parse_a1111
from tests.helpers import max_diff, png_pixels, running_server

PROMPT = "a photo of myemb on a hill"


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))},
              str(d / "myemb.safetensors"))
    return d


@pytest.fixture(scope="module")
def library(ort_engines, emb_dir):
    pipe = Pipeline.load(ort_engines, embeddings=emb_dir)
    yield pipe
    pipe.close()


def _hash(emb_dir: Path) -> str:
    return hashlib.sha256((emb_dir / "myemb.safetensors").read_bytes()).hexdigest()[:12]


def test_the_cli_uses_the_folder_and_records_the_hash(ort_engines, emb_dir, library, tmp_path):
    out = tmp_path / "a.png"
    assert generate.main(["--engine-dir", str(ort_engines), "--prompt", PROMPT, "--steps", "2", "--seed", "4",
                          "--embeddings", str(emb_dir), "--output", str(out)]) == 0
    (want,) = library.run([Request(prompt=PROMPT, steps=2, seed=4)], progress=False)
    image = Image.open(out)
    assert max_diff(png_pixels(out.read_bytes()), want.pixels) <= 1
    assert parse_a1111(image.text["parameters"])["TI hashes"] == f"myemb: {_hash(emb_dir)}"


def test_the_cli_refuses_a_pickle_and_a_missing_folder_in_one_line(ort_engines, emb_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "old.pt").write_bytes(b"\x80\x04K\x01.")
    argv = ["--engine-dir", str(ort_engines), "--prompt", PROMPT, "--steps", "2", "--output", str(tmp_path / "x.png")]
    assert generate.main([*argv, "--embeddings", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "old.pt: a pickled embedding" in err and "\n" not in err
    with pytest.raises(SystemExit) as caught:
        generate.main([*argv, "--embeddings", str(tmp_path / "absent")])
    assert caught.value.code == 2 and "argument --embeddings" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_the_server_lists_and_uses_the_embeddings(ort_engines, emb_dir, library, tmp_path):
    with running_server(ort_engines, tmp_path, "--embeddings-dir", str(emb_dir)) as server:
        status, data, _ = server.get("/v1/info")
        assert status == 200 and json.loads(data)["embeddings"] == {"myemb": 2}
        status, data, _ = server.get("/sdapi/v1/embeddings")
        assert status == 200 and json.loads(data)["loaded"]["myemb"]["vectors"] == 2
        assert json.loads(data)["loaded"]["myemb"]["shape"] == 32
        status, data, _ = server.post("/v1/generate", {"prompt": PROMPT, "steps": 2, "seed": 5})
        assert status == 200, data
        png = base64.b64decode(json.loads(data)["images"][0]["b64_png"])
    (want,) = library.run([Request(prompt=PROMPT, steps=2, seed=5)], progress=False)
    assert max_diff(png_pixels(png), want.pixels) <= 1
    assert parse_a1111(Image.open(io.BytesIO(png)).text["parameters"])["TI hashes"] == f"myemb: {_hash(emb_dir)}"
