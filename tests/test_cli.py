"""The CLIs as a user runs them: exit codes, one-line errors, PNGs that carry their parameters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
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
    assert params | {"prompt": "a cat", "steps": 3, "scheduler": "euler", "seed": 42, "height": 64} == params
    assert img.text["parameters"].startswith("a cat\nNegative prompt:")


def test_generate_batch_into_folder(ort_engines, tmp_path):
    r = run("engine.generate", "--engine-dir", str(ort_engines), "--prompt", "a", "b", "--steps", "2",
            "--height", "64", "--width", "64", "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert len(list(tmp_path.glob("*.png"))) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--height", "72"], "height 72 must be a positive multiple of 16"),
        (["--width", "512"], "width 512 is outside the built profile [64, 256]"),
        (["--steps", "0"], "steps 0 must be in [1, 1000]"),
        (["--denoising-steps", "5000"], "steps 5000 must be in [1, 1000]"),
        (["--guidance-scale", "-2"], "guidance scale -2.0 must be"),
        (["--scheduler", "unipc"], "ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm"),
        (["--backend", "torch"], "built for backend 'onnxruntime'"),
    ],
)
def test_generate_bad_input_is_one_line(ort_engines, args, message):
    r = run("engine.generate", "--engine-dir", str(ort_engines), "--steps", "2", "--height", "64", "--width", "64",
            "--output", "/nonexistent/x.png", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, r.stderr


def test_generate_without_engines_says_to_build(tmp_path):
    r = run("engine.generate", "--engine-dir", str(tmp_path), "--output", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "run python -m engine.build" in r.stderr


def test_build_tensorrt_without_tensorrt_is_one_line(tmp_path):
    from engine.backends.trt_backend import trt_available

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
