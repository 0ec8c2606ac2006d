"""The CLIs as a user runs them: exit codes, one-line errors, PNGs that carry their parameters."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_generate_writes_png_with_parameters(ort_engines, tmp_path):
    out = tmp_path / "cat.png"
    r = run("engine.generate", "--engine-dir", str(ort_engines), "--prompt", "a cat", "--steps", "3",
            "--scheduler", "euler", "--seed", "42", "--height", "64", "--width", "96", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "timings (ms): clip" in r.stdout and "/step" in r.stdout
    img = Image.open(out)
    assert img.size == (96, 64)
    params = json.loads(img.text["sd_engine"])
    assert params | {"prompt": "a cat", "steps": 3, "sampler": "euler", "seed": 42, "height": 64} == params
    assert img.text["parameters"] == ("a cat\n"
                                      "Steps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 96x64, Model: tiny")


def test_generate_writes_jpeg_and_webp_with_parameters_in_exif(ort_engines, tmp_path):
    for out, fmt, names in ((tmp_path / "pic.jpg", "JPEG", ["pic.jpg"]),
                            (tmp_path / "pic.webp", "WEBP", ["pic-0.webp", "pic-1.webp"])):
        r = run("engine.generate", "--engine-dir", str(ort_engines), "--prompt", "a cat", "--negative-prompt", "fog",
                "--steps", "2", "--seed", "7", "--images-per-prompt", str(len(names)), "--output", str(out))
        assert r.returncode == 0, r.stderr
        for k, name in enumerate(names):
            path = tmp_path / name
            assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o644  # a file, not a folder pic.jpg/
            img = Image.open(path)
            raw = img.getexif().get_ifd(0x8769)[0x9286]  # Exif IFD, UserComment
            assert img.format == fmt and raw[:8] == b"UNICODE\0"
            assert raw[8:].decode("utf-16-be") == (f"a cat\nNegative prompt: fog\nSteps: 2, Sampler: DPM++ 2M, "
                                                   f"CFG scale: 7.5, Seed: {7 + k}, Size: 64x64, Model: tiny")
    assert sorted(os.listdir(tmp_path)) == ["pic-0.webp", "pic-1.webp", "pic.jpg"]


def test_generate_refuses_other_output_suffixes(tmp_path):
    r = run("engine.generate", "--engine-dir", str(tmp_path / "none"), "--output", str(tmp_path / "pic.gif"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"error: --output {tmp_path / 'pic.gif'}: suffix '.gif' is not an image format; "
                    "allowed: .png, .jpg, .jpeg, .webp, or no suffix for a folder")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["proc", "under_file", "folder_is_file"])
def test_unwritable_output_fails_before_the_engines_load(tmp_path, where):
    """The output is checked first: with no engine dir at all the error is still about --output."""
    (tmp_path / "file.txt").write_text("x")
    out = {"proc": "/proc/x.png", "under_file": str(tmp_path / "file.txt" / "x.png"),
           "folder_is_file": str(tmp_path / "file.txt" / "sub")}[where]
    r = run("engine.generate", "--engine-dir", str(tmp_path / "no-engines"), "--output", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --output {out}: "), r.stderr
    blamed = "/proc" if where == "proc" else str(tmp_path / "file.txt")
    assert blamed in lines[0] and ".tmp" not in lines[0] and "no engines" not in lines[0]
    assert os.listdir(tmp_path) == ["file.txt"]


def test_lcm_steps_error_names_the_flag_and_range(ort_engines, tmp_path):
    r = run("engine.generate", "--engine-dir", str(ort_engines), "--scheduler", "lcm", "--steps", "100",
            "--output", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == ("error: argument --steps: steps 100 is out of range for sampler lcm; allowed: 1..50 "
                    "(original_inference_steps in the model's scheduler config)")
    assert not (tmp_path / "x.png").exists()


def help_entries(text: str) -> dict[str, str]:
    """argparse --help: each option line (two-space indent, then '-') -> its description, wrapped lines joined."""
    entries: dict[str, str] = {}
    flags: list[str] = []
    for line in text.split("options:", 1)[1].splitlines():
        if re.match(r"^  -", line):
            invocation, _, desc = line.strip().partition("  ")
            flags = re.findall(r"--[\w-]+", invocation)
            for f in flags:
                entries[f] = desc.strip()
        elif line.startswith("    ") and flags:
            for f in flags:
                entries[f] = f"{entries[f]} {line.strip()}".strip()
    return entries


@pytest.mark.parametrize("cmd", ["engine.generate", "export"])
def test_every_flag_has_help_and_default(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0, r.stderr
    entries = help_entries(r.stdout)
    assert "--prompt" in entries if cmd == "engine.generate" else "--out" in entries
    for flag, desc in entries.items():
        if flag == "--help":
            continue
        assert desc and not desc.startswith("("), (cmd, flag, desc)  # a description before the default
        if cmd == "export" and flag == "--out":
            assert desc.endswith("(required)"), desc
        else:
            assert re.search(r"\(default: [^)]*\)$", desc), (cmd, flag, desc)
    if cmd == "engine.generate":
        assert entries["--verify"] == "re-hash every engine file before loading (default: False)"


def test_help_choices_come_from_the_registries():
    """--help named stale choices (issue 32 item 4): every preset, sampler and backend registered is in the help of
    the commands that take it."""
    from engine.config import BACKENDS
    from engine.sampler_registry import SAMPLERS
    from export.presets import PRESETS

    def unwrapped(cmd: str) -> str:
        return " ".join(re.sub(r"-\n\s+", "-", run(cmd, "--help").stdout).split())

    generate, build, export = unwrapped("engine.generate"), unwrapped("engine.build"), unwrapped("export")
    assert [s for s in SAMPLERS if s not in generate] == []
    assert [p for p in PRESETS if p not in build] == [] and [p for p in PRESETS if p not in export] == []
    assert [b for b in BACKENDS if b not in build] == [] and [b for b in BACKENDS if b not in generate] == []


def test_generate_batch_into_folder_never_overwrites(ort_engines, tmp_path):
    args = ("engine.generate", "--engine-dir", str(ort_engines), "--prompt", "a", "b", "--steps", "2",
            "--images-per-prompt", "2", "--batch-size", "2", "--height", "64", "--width", "64", "--output", str(tmp_path))
    assert run(*args).returncode == 0
    first = sorted(p.name for p in tmp_path.glob("*.png"))
    assert first == ["00001-0.png", "00002-1.png", "00003-0.png", "00004-1.png"]  # image k of a prompt: seed + k
    assert run(*args).returncode == 0  # same seeds again: new numbers, nothing overwritten
    assert sorted(p.name for p in tmp_path.glob("*.png")) == first + ["00005-0.png", "00006-1.png", "00007-0.png",
                                                                         "00008-1.png"]


def test_generate_img2img_and_inpainting(ort_engines, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    for extra, name in ((["--strength", "0.5"], "i2i.png"), (["--mask", str(tmp_path / "mask.png")], "inpaint.png")):
        r = run("engine.generate", "--engine-dir", str(ort_engines), "--prompt", "a boat", "--steps", "4",
                "--init-image", str(tmp_path / "init.png"), *extra, "--output", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        params = json.loads(Image.open(tmp_path / name).text["sd_engine"])
        assert params["kind"] == ("img2img" if name == "i2i.png" else "inpaint")
        assert params["init_image"] == str(tmp_path / "init.png") and params["strength"] == (0.5 if extra[0] == "--strength" else 1.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--height", "72"], "height 72 must be a positive multiple of 16"),
        (["--steps", "0"], "steps 0 must be in [1, 1000]"),
        (["--denoising-steps", "5000"], "steps 5000 must be in [1, 1000]"),
        (["--guidance-scale", "-2"], "guidance scale -2.0 must be"),
        (["--scheduler", "unipc"], "ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm"),
        (["--backend", "torch"], "built for backend 'onnxruntime'"),
        (["--seed", str(2**70)], "argument --seed: 1180591620717411303424 is outside 0..2**64-1"),
        (["--seed", "-2"], "argument --seed: -2 is outside 0..2**64-1 (-1 draws a random seed)"),
        (["--init-image", "README.md"], "init image README.md is not a readable image"),
        (["--init-image", "tests/data/missing.png"], "init image tests/data/missing.png does not exist"),
        (["--init-image", "docs/none.png", "--strength", "0"], "strength 0.0 is outside (0, 1]"),
        (["--mask", "README.md"], "a mask needs an init image"),
        (["--model", "sd15"], "no engines for model 'sd15'"),
        (["--height", "16384", "--width", "16384"], "16384x16384 x 1 image(s) needs at least"),
    ],
)
def test_generate_bad_input_is_one_line(ort_engines, tmp_path, args, message):
    r = run("engine.generate", "--engine-dir", str(ort_engines), "--steps", "2", "--height", "64", "--width", "64",
            "--output", str(tmp_path / "x.png"), *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    # ours: "error: ..."; argparse's parse-time checks: "python -m engine.generate: error: argument --x: ..."
    assert (last.startswith("error: ") or last.startswith("python -m engine.generate: error: ")) and message in last, \
        r.stderr
    assert not (tmp_path / "x.png").exists()


def test_generate_without_engines_says_to_build(tmp_path):
    r = run("engine.generate", "--engine-dir", str(tmp_path), "--output", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "run python -m engine.build" in r.stderr


def test_build_tensorrt_without_tensorrt_is_one_line(tmp_path):
    from engine.backends.tensorrt import trt_available

    if trt_available():
        pytest.skip("TensorRT is installed here; this checks the error path without it")
    r = run("engine.build", "--backend", "tensorrt", "--engine-dir", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: TensorRT is not installed") and "pip install" in lines[-1]


def test_build_rejects_bad_size(tmp_path):
    r = run("engine.build", "--engine-dir", str(tmp_path), "--height", "100")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "height 100 must be a positive multiple of 16" in r.stderr


def test_batch_size_means_images_denoised_together_in_both_commands(tmp_path):
    for cmd in ("engine.build", "engine.generate"):
        r = run(cmd, "--engine-dir", str(tmp_path), "--batch-size", "0")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "--batch-size" in r.stderr and "0 must be >= 1" in r.stderr, (cmd, r.stderr)
        assert "images denoised together" in run(cmd, "--help").stdout
