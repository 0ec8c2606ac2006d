"""The OpenVINO backend on `tiny`: each component (fp32) vs its torch module, the whole pipeline vs ONNX Runtime,
the cache key's OpenVINO version and CPU flags, and IRs it must refuse (unreadable, another component's, another
OpenVINO's)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("openvino") is None:  # not importorskip: a bare `import openvino` phones home
    pytest.skip("OpenVINO is not installed (a dependency on x86_64 and ARM64 only)", allow_module_level=True)

from engine import cache
from engine.backends import cpu, openvino_backend
from engine.backends.openvino_backend import BACKEND, IR_XML, IncompatibleIR
from engine.build import _prepare, build_all
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from engine.request import Request
from export.onnx_export import example_inputs
from export.specs import Shape
from tests.helpers import EXPORT_SHAPES

COMPONENTS = ("clip", "unet", "vae_decoder", "vae_encoder")


@pytest.fixture(scope="module")
def ov_engines(ov_build) -> Path:
    """tiny built for OpenVINO fp32 (conftest), in a copy of the ORT engine dir (the fp32 ONNX exports reused)."""
    engine_dir, result = ov_build
    assert set(result.record["components"]) == set(COMPONENTS)
    assert not [s for s in result.built if s.endswith(":onnx")]  # the fp32 export of the ORT build, reused
    return engine_dir


def _art(engine_dir: Path, name: str) -> Path:
    record = cache.read_json(engine_dir / "tiny" / cache.BUILD_RECORD)
    return engine_dir / "tiny" / record["components"][name]["dir"]


def _runner(engine_dir: Path, name: str, tiny_fp32):
    art = _art(engine_dir, name)
    return BACKEND.load(tiny_fp32.family.spec(name), art, cache.verify(art), "cpu")


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_matches_torch_fp32(ov_engines, tiny_fp32, name):
    from export.models import component_module

    runner = _runner(ov_engines, name, tiny_fp32)
    spec = tiny_fp32.family.spec(name)
    try:
        for shape in EXPORT_SHAPES:
            inputs = example_inputs(spec, tiny_fp32.dims, shape, "fp32", seed=3)
            with torch.no_grad():
                ref = component_module(tiny_fp32, name)(**inputs)
            refs = ref if isinstance(ref, tuple) else (ref,)
            got = runner(**inputs)
            assert list(got) == spec.output_names
            for out_name, want in zip(spec.output_names, refs, strict=True):
                assert got[out_name].dtype == torch.float32 and got[out_name].shape == want.shape
                torch.testing.assert_close(got[out_name], want, atol=1e-4, rtol=0)
    finally:
        runner.close()


def test_artifact_is_ir_with_fp32_weights(ov_engines):
    art = _art(ov_engines, "unet")
    assert sorted(p.name for p in art.iterdir()) == [cache.MANIFEST, "model.bin", IR_XML]
    manifest = cache.verify(art)
    assert manifest["precision"] == "fp32" and manifest["openvino"] == openvino_backend.ov_version()
    onnx_data = next(_art(ov_engines, "unet").parent.parent.glob("onnx/unet-*/model.onnx.data"))
    assert (art / "model.bin").stat().st_size >= 0.95 * onnx_data.stat().st_size  # not compressed to fp16


def test_pipeline_image_matches_onnxruntime(ov_engines, ort_engines):
    req = Request(prompt="a watercolor painting of a lighthouse", negative_prompt="low quality", steps=12,
                  sampler="dpmpp_2m", seed=1234, height=128, width=128)
    images = []
    for engines in (ort_engines, ov_engines):
        pipe = Pipeline.load(engines, "tiny")
        try:
            images.append(pipe.run(req, progress=False)[0].pixels.astype(int))
        finally:
            pipe.close()
    ort_px, ov_px = images
    assert ort_px.std() > 10  # a real image, not a constant
    assert np.abs(ov_px - ort_px).max() <= 2  # the README's parity bound (≤ 2/255 per pixel)


def test_cache_key_holds_openvino_version_and_cpu_flags(tmp_path, tiny_folder, monkeypatch):
    cfg = BuildConfig(model="tiny", backend="openvino", engine_dir=tmp_path)
    fp = _prepare(cfg).fingerprint
    assert fp == {"openvino": openvino_backend.ov_version(), "device": "cpu", "cpu_isa": cpu.isa_flags()}
    monkeypatch.setattr(openvino_backend, "ov_version", lambda: "2099.1.0-1-fake")
    other_version = _prepare(cfg).fingerprint
    monkeypatch.undo()
    monkeypatch.setattr(openvino_backend, "isa_flags", lambda: ["avx2"])
    other_cpu = _prepare(cfg).fingerprint
    assert other_version["openvino"] == "2099.1.0-1-fake" and other_cpu["cpu_isa"] == ["avx2"]
    # what _component hashes into the artifact's key: the fingerprint beside the ONNX key and the options
    keys = {cache.content_key({"component": "unet", "onnx": "k", "backend": f, "precision": "fp32"})
            for f in (fp, other_version, other_cpu)}
    assert len(keys) == 3


def test_ir_of_another_openvino_version_is_refused(ov_engines, tiny_fp32, tmp_path):
    art = tmp_path / "unet"
    shutil.copytree(_art(ov_engines, "unet"), art)
    spec, manifest = tiny_fp32.family.spec("unet"), cache.verify(art)
    ours = openvino_backend.ov_version()
    with pytest.raises(IncompatibleIR, match=rf"built with OpenVINO 2024\.6\.0-1.*this is OpenVINO {ours}"):
        BACKEND.load(spec, art, {**manifest, "openvino": "2024.6.0-1"}, "cpu")
    xml = art / IR_XML
    text = xml.read_text()
    assert f'value="{ours}"' in text
    xml.write_text(text.replace(f'value="{ours}"', 'value="2024.6.0-17404-4c0f47d2335-releases/2024/6"'))
    with pytest.raises(IncompatibleIR, match=r"IR written by OpenVINO 2024\.6\.0-17404.*this is OpenVINO 20"):
        BACKEND.load(spec, art, manifest, "cpu")


def test_corrupt_or_foreign_ir_is_refused(ov_engines, tiny_fp32, tmp_path):
    spec = tiny_fp32.family.spec("unet")
    art = tmp_path / "unet"
    shutil.copytree(_art(ov_engines, "unet"), art)
    manifest = cache.verify(art)
    xml = art / IR_XML
    xml.write_bytes(xml.read_bytes()[: xml.stat().st_size // 2])  # truncated XML
    with pytest.raises(IncompatibleIR, match="not a readable OpenVINO IR"):
        BACKEND.load(spec, art, manifest, "cpu")
    with pytest.raises(cache.CorruptArtifact, match="truncated"):  # what generate checks first
        cache.verify(art)
    foreign = tmp_path / "clip-as-unet"
    shutil.copytree(_art(ov_engines, "clip"), foreign)
    with pytest.raises(IncompatibleIR, match=r"not an IR of unet \(inputs \['input_ids', 'token_embeds'\]"):
        BACKEND.load(spec, foreign, cache.verify(foreign), "cpu")


def test_devices_and_precisions_are_checked(tmp_path, tiny_folder, monkeypatch):
    with pytest.raises(ValueError, match="device 'cuda' is not supported by the openvino backend; use --device cpu"):
        build_all(BuildConfig(model="tiny", backend="openvino", device="cuda", engine_dir=tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"precision 'fp16' is not available with the openvino backend; "
                                         r"choose from fp32, bf16, int8"):
        build_all(BuildConfig(model="tiny", backend="openvino", precision="fp16", engine_dir=tmp_path),
                  progress=False)
    monkeypatch.setattr(cpu, "_all_flags", lambda: frozenset({"avx2", "avx512f"}))
    with pytest.raises(ValueError, match=r"precision 'bf16' needs a CPU with avx512_bf16 or amx_bf16.*"
                                         r"use --precision fp32"):
        build_all(BuildConfig(model="tiny", backend="openvino", precision="bf16", engine_dir=tmp_path),
                  progress=False)
    assert not (tmp_path / "tiny").exists()  # refused before any work


@pytest.mark.skipif(not cpu.has_native_bf16(), reason="this CPU has no avx512_bf16 / amx_bf16")
def test_bf16_compiles_in_bf16(ov_engines, tiny_fp32):
    art = _art(ov_engines, "unet")
    runner = openvino_backend.OpenVinoRunner(tiny_fp32.family.spec("unet"), art / IR_XML, "bf16")
    try:
        compiled = runner.compiled
        assert compiled is not None
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'bfloat16'>", "bf16")
        inputs = example_inputs(runner.spec, tiny_fp32.dims, Shape(1, 64, 64), "fp32", seed=1)
        out = runner(**inputs)["latent"]
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    finally:
        runner.close()


def test_openvino_is_imported_without_its_telemetry(tmp_path):
    """A bare `import openvino` writes a client id under ~/intel and sends a usage event (no consent file = consent);
    the backend's import must do neither, and must leave the environment as it found it."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    code = ("import os; from engine.backends.openvino_backend import ov_version; ov_version(); "
            "assert 'CI' not in os.environ, os.environ['CI']")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path), "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "intel").exists(), sorted(p.name for p in (tmp_path / "intel").iterdir())
