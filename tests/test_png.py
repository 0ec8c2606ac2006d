"""Image output: A1111's `parameters` text (read back with A1111's own parsing rules, tests/a1111.py) and the writers."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.png import parameters_text, save_image, save_png
from engine.request import Generated
from tests.a1111 import TXT2IMG, parse_a1111


def user_comment(img: Image.Image) -> str:
    """EXIF UserComment (Exif IFD tag 0x9286) as piexif.helper.UserComment.load reads a "UNICODE" one."""
    raw = img.getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\0", raw[:8]
    return raw[8:].decode("utf-16-be")


# ---- the text ----

def test_txt2img_text_is_a1111s_format() -> None:
    text = parameters_text(TXT2IMG)
    assert text == "a cat\nSteps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 0, Size: 768x512, Model: tiny"
    assert parse_a1111(text) == {"Prompt": "a cat", "Negative prompt": "", "Steps": "25", "Sampler": "DPM++ 2M",
                                 "CFG scale": "7.5", "Seed": "0", "Size-1": "768", "Size-2": "512", "Model": "tiny"}


def test_negative_prompt_and_denoising_strength() -> None:
    params = {**TXT2IMG, "negative_prompt": "blurry\nlow quality", "kind": "img2img", "strength": 0.6,
              "prompt": "a boat\nat dusk", "seed": 2**63, "model": "/models/v1-5-pruned-emaonly.safetensors"}
    text = parameters_text(params)
    assert text.splitlines()[:4] == ["a boat", "at dusk", "Negative prompt: blurry", "low quality"]
    parsed = parse_a1111(text)
    assert parsed["Prompt"] == "a boat\nat dusk" and parsed["Negative prompt"] == "blurry\nlow quality"
    assert parsed["Denoising strength"] == "0.6" and parsed["Seed"] == "9223372036854775808"
    assert parsed["Model"] == "v1-5-pruned-emaonly"  # A1111 names the checkpoint without folder or extension
    assert "Model hash" not in parsed  # no weights hash in the params: omitted, as A1111 omits keys it lacks


def test_model_hash_when_given() -> None:
    text = parameters_text({**TXT2IMG, "model_hash": "6ce0161689"})
    assert text.endswith("Size: 768x512, Model hash: 6ce0161689, Model: tiny")


@pytest.mark.parametrize("sampler, shown", [("ddim", "DDIM"), ("euler", "Euler"), ("euler_a", "Euler a"),
                                            ("dpmpp_2m", "DPM++ 2M"), ("dpmpp_2m_karras", "DPM++ 2M Karras"),
                                            ("lcm", "LCM")])
def test_sampler_names_are_a1111s(sampler: str, shown: str) -> None:
    assert parse_a1111(parameters_text({**TXT2IMG, "sampler": sampler}))["Sampler"] == shown


def test_values_with_commas_colons_quotes_are_json_quoted() -> None:
    text = parameters_text({**TXT2IMG, "model": 'my, odd: "v2"'})
    assert text.endswith(r'Model: "my, odd: \"v2\""')
    parsed = parse_a1111(text)
    assert parsed["Model"] == 'my, odd: "v2"' and parsed["Seed"] == "0" and parsed["Steps"] == "25"


def test_empty_prompt_and_no_negative_line() -> None:
    text = parameters_text({**TXT2IMG, "prompt": ""})
    assert text == "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 0, Size: 768x512, Model: tiny"
    assert "Negative prompt" not in parameters_text(TXT2IMG)


# ---- the writers ----

PIXELS = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize("name, fmt", [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.JPEG", "JPEG"), ("a.webp", "WEBP")])
def test_save_image_writes_the_suffixs_format_atomically(tmp_path: Path, name: str, fmt: str) -> None:
    path = save_image(PIXELS, tmp_path / "sub" / name, TXT2IMG)
    assert path == tmp_path / "sub" / name and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path / "sub") == [name]  # no temp file left behind
    img = Image.open(path)
    assert img.format == fmt and img.size == (48, 32)
    expected = "a cat\nSteps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 0, Size: 768x512, Model: tiny"
    if fmt == "PNG":
        assert img.text["parameters"] == expected and json.loads(img.text["sd_engine"])["seed"] == 0
        assert np.array_equal(np.asarray(img), PIXELS)  # lossless
    else:
        assert user_comment(img) == expected


def test_save_image_refuses_other_suffixes(tmp_path: Path) -> None:
    for name in ("a.gif", "a.tiff", "noext"):
        with pytest.raises(ValueError, match=r"\.png, \.jpg, \.jpeg, \.webp") as err:
            save_image(PIXELS, tmp_path / name, TXT2IMG)
        assert repr(Path(name).suffix or "(none)") in str(err.value)
    assert os.listdir(tmp_path) == []


def test_generated_save_follows_the_suffix(tmp_path: Path) -> None:
    out = Generated(PIXELS, {**TXT2IMG, "prompt": "a dog"}).save(tmp_path / "dog.jpeg")
    img = Image.open(out)
    assert img.format == "JPEG" and user_comment(img).startswith("a dog\nSteps: 25")


def test_save_png_keeps_working(tmp_path: Path) -> None:
    assert Image.open(save_png(PIXELS, tmp_path / "x.png", TXT2IMG)).format == "PNG"


@pytest.mark.parametrize("where", ["proc", "under_file"])
def test_write_error_names_the_path_not_the_temp_file(tmp_path: Path, where: str) -> None:
    (tmp_path / "file.txt").write_text("x")
    path = Path("/proc/x.png") if where == "proc" else tmp_path / "file.txt" / "x.jpg"
    with pytest.raises(OSError) as err:
        save_image(PIXELS, path, TXT2IMG)
    assert str(path) in str(err.value) and ".tmp" not in str(err.value)
