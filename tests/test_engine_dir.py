"""The engine directory is self-contained: it runs after the model folder is gone and the directory moved."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import cache
from engine.build import build_all
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from engine.request import Request
from tests.helpers import max_diff

ROOT = Path(__file__).resolve().parents[1]
REQ = Request(prompt="a lighthouse at dusk", steps=4, sampler="euler_a", seed=7, height=64, width=64)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_engine_dir_runs_after_model_is_deleted_and_dir_moved(tmp_path, tiny_folder, backend):
    model = tmp_path / "my-model"
    shutil.copytree(tiny_folder, model)
    engines = tmp_path / "engines"
    record = build_all(BuildConfig(model=str(model), backend=backend, engine_dir=engines, height=64, width=64),
                       progress=False).record
    before = Pipeline.load(engines).run(REQ, progress=False)[0].pixels
    shutil.rmtree(model)
    moved = tmp_path / "elsewhere" / "deployed"
    moved.parent.mkdir()
    shutil.move(engines, moved)
    out = tmp_path / "after.png"
    r = run_cli("engine.generate", "--engine-dir", str(moved), "--prompt", REQ.prompt, "--steps", "4",
                "--scheduler", "euler_a", "--seed", "7", "--output", str(out))  # no --model: the only one there
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), before)
    files = {p.relative_to(moved / record["model_id"]).as_posix() for p in (moved / record["model_id"]).rglob("*")}
    assert any(f.endswith("tokenizer/tokenizer.json") for f in files)
    assert any(f.endswith("scheduler/scheduler_config.json") for f in files)


def test_runtime_never_imports_the_export_machinery(ort_engines):
    """Loading and running an ONNX Runtime engine dir needs no export/models, single_file or onnx_export."""
    code = (
        "import sys; from engine.pipeline import Pipeline; from engine.request import Request; "
        f"p = Pipeline.load({str(ort_engines)!r}); p.run(Request(prompt='x', steps=2, height=64, width=64), progress=False); "
        "print(sorted(m for m in sys.modules if m.startswith('export')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    loaded = eval(r.stdout.strip().splitlines()[-1])
    assert not {"export.models", "export.single_file", "export.onnx_export", "export.optimize"} & set(loaded), loaded


def test_build_record_names_family_dims_and_relative_paths(ort_engines):
    record = json.loads((ort_engines / "tiny" / cache.BUILD_RECORD).read_text())
    assert record["family"] == "sd" and record["dims"]["unet_in_channels"] == record["dims"]["latent_channels"] == 4
    for entry in [*record["components"].values(), {"dir": record["model_files"]}]:
        assert not Path(entry["dir"]).is_absolute() and (ort_engines / "tiny" / entry["dir"]).is_dir()


def test_several_models_need_a_name(tmp_path, ort_engines):
    engines = tmp_path / "engines"
    shutil.copytree(ort_engines / "tiny", engines / "tiny")
    shutil.copytree(ort_engines / "tiny", engines / "other")
    with pytest.raises(ValueError, match=r"several models \(other, tiny\): pass --model"):
        Pipeline.load(engines)
    assert Pipeline.load(engines, "tiny").info["model_id"] == "tiny"
    with pytest.raises(ValueError, match="no engines for model 'sd15'"):
        Pipeline.load(engines, "sd15")


def test_torch_backend_matches_onnxruntime(torch_engines, ort_engines):
    reqs = [Request(prompt=p, steps=6, sampler="dpmpp_2m", seed=5, height=64, width=64) for p in ("a", "b")]
    a = Pipeline.load(torch_engines).run(reqs, progress=False)
    b = Pipeline.load(ort_engines).run(reqs, progress=False)
    for x, y in zip(a, b, strict=True):
        assert max_diff(x.pixels, y.pixels) <= 1


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "is damaged"),
    (lambda text: text.replace('"format": 2', '"format": 1'), "written by another version of engine.build"),
])
def test_damaged_or_old_build_record_is_named(tmp_path, ort_engines, damage, message):
    engines = tmp_path / "engines"
    shutil.copytree(ort_engines, engines)
    record = engines / "tiny" / cache.BUILD_RECORD
    record.write_text(damage(record.read_text()))
    r = run_cli("engine.generate", "--engine-dir", str(engines), "--output", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert str(record) in last and message in last and "python -m engine.build" in last
