"""First-run defects a new user met (issue 32 item 4), each refused or fixed up front."""
from __future__ import annotations

import shutil

import pytest
import torch

from engine import cache
from engine.build import build_all
from engine.config import BuildConfig


def test_a_plain_rebuild_keeps_the_components_it_had(tmp_path, ort_engines):
    engine_dir = tmp_path / "engines"
    shutil.copytree(ort_engines, engine_dir)  # tiny, onnxruntime fp32, with vae_encoder
    cfg = BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", height=64, width=64,
                      engine_dir=engine_dir)
    again = build_all(cfg, progress=False)
    assert "vae_encoder" in again.record["components"] and not again.built  # kept, and reused as built
    assert any("kept the components of the last build" in n for n in again.notes), again.notes
    record = cache.read_record(engine_dir / "tiny" / cache.BUILD_RECORD)
    assert "vae_encoder" in record["components"]
    fewer = build_all(BuildConfig(**{**vars(cfg), "components": ("clip", "unet", "vae_decoder")}), progress=False)
    assert "vae_encoder" not in fewer.record["components"]  # asked for: dropped, and said
    assert any("dropped vae_encoder" in n for n in fewer.notes), fewer.notes


def test_components_without_a_decoder_are_said_to_be_unusable(tmp_path, ort_engines):
    """A partial build (one component, for a test or a benchmark) is allowed, but not silently: it says the
    engines cannot generate, and loading them says what to build."""
    engine_dir = tmp_path / "engines"
    shutil.copytree(ort_engines, engine_dir)
    cfg = BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", height=64, width=64,
                      engine_dir=engine_dir, components=("clip", "unet"))
    result = build_all(cfg, progress=False)
    assert any("--components clip,unet lacks vae_decoder: these engines cannot generate" in n
               for n in result.notes), result.notes
    from engine.pipeline import Pipeline

    with pytest.raises(ValueError, match=r"has no vae_decoder: rebuild with .*--components clip,unet,vae_decoder"):
        Pipeline.load(engine_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a GPU: a cuda build is fine here")
def test_a_cuda_torch_build_is_refused_on_a_torch_without_cuda(tmp_path, tiny_folder):
    with pytest.raises(ValueError, match=r"device 'cuda': (a CPU-only build of torch|torch .* sees no GPU)"):
        build_all(BuildConfig(model="tiny", backend="torch", device="cuda", engine_dir=tmp_path), progress=False)
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("field, value", [("steps", "5"), ("images", 2.0), ("seed", "7"), ("height", 64.0)])
def test_a_wrong_type_is_named_as_such(field, value):
    from engine.request import Request, RequestError

    with pytest.raises(RequestError, match=rf"^{field} must be an integer, not \w+ {value!r}$".replace(".", r"\.")):
        Request(**{field: value}).check()


@pytest.mark.parametrize("text, message", [
    ("style.safetensors:abc", r"scale 'abc' is not a number \(PATH\[:SCALE\], e.g. style.safetensors:0.8\)"),
    ("style.safetensors:nan", r"scale 'nan' is not a finite number"),
])
def test_a_bad_lora_scale_is_named(text, message):
    from engine.lora import parse_adapter

    with pytest.raises(ValueError, match=message):
        parse_adapter(text)


def test_a_drawn_seed_is_printed(ort_engines, tmp_path, capsys):
    from engine.generate import main

    out = tmp_path / "x.png"
    assert main(["--engine-dir", str(ort_engines), "--steps", "1", "--seed", "-1", "--output", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out} (seed ") and line.endswith(", drawn for --seed -1)")
    import PIL.Image

    seed = int(line.split("(seed ")[1].split(",")[0])
    with PIL.Image.open(out) as image:
        assert f"Seed: {seed}," in image.text["parameters"]  # the printed seed is the image's (A1111 infotext)
