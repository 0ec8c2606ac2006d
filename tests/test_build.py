"""engine.build's content-hash cache: reuse, partial rebuilds, detection of damaged artifacts."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import cache
from engine.build import build_all, make_profile
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from export.specs import Dims, Shape


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.rglob("*") if p.is_file()}


def test_second_identical_build_is_cached(tmp_path, tiny_folder):
    cfg = BuildConfig(model="tiny", backend="onnxruntime", engine_dir=tmp_path)
    t0 = time.perf_counter()
    first = build_all(cfg, progress=False)
    t_first = time.perf_counter() - t0
    components = ("clip", "unet", "vae_decoder")  # the default for an ordinary (4-channel) model
    assert sorted(first.built) == sorted([f"{c}:{s}" for c in components for s in ("onnx", "onnxruntime")]
                                         + ["model:files"])
    before = _snapshot(tmp_path)
    t0 = time.perf_counter()
    second = build_all(cfg, progress=False)
    t_second = time.perf_counter() - t0
    assert second.built == [] and sorted(second.reused) == sorted(components)
    assert _snapshot(tmp_path) == before  # no artifact (nor build.json) was touched
    assert t_first >= 3 * t_second, (t_first, t_second)
    assert second.record == first.record


def test_shape_options_rebuild_nothing_on_dynamic_backends(tmp_path, tiny_folder):
    """ONNX Runtime / torch artifacts take any exported shape: a new batch or size is only a new default."""
    cfg = BuildConfig(model="tiny", backend="onnxruntime", engine_dir=tmp_path, components=("clip",))
    first = build_all(cfg, progress=False)
    cfg.batch_size, cfg.height = 2, 64
    second = build_all(cfg, progress=False)
    assert second.built == [] and second.record["components"] == first.record["components"]
    assert second.record["profile"]["opt"] == {"batch": 2, "height": 64, "width": 128}


def test_weight_change_rebuilds_only_that_component(tmp_path, tiny_folder):
    model = tmp_path / "my-model"
    shutil.copytree(tiny_folder, model)
    cfg = BuildConfig(model=str(model), backend="onnxruntime", engine_dir=tmp_path / "engines",
                      components=("clip", "vae_decoder"))
    build_all(cfg, progress=False)
    weights = next((model / "vae").glob("*.safetensors"))
    state = load_file(weights)
    name = next(k for k in state if k.startswith("decoder.conv_out") and k.endswith("bias"))
    state[name] = state[name] + 0.5
    save_file(state, weights, metadata={"format": "pt"})
    result = build_all(cfg, progress=False)
    assert sorted(result.built) == ["vae_decoder:onnx", "vae_decoder:onnxruntime"]
    assert result.reused == ["clip"]


def test_damaged_artifact_is_detected_and_rebuilt(tmp_path, tiny_folder):
    cfg = BuildConfig(model="tiny", backend="onnxruntime", engine_dir=tmp_path, components=("clip",))
    record = build_all(cfg, progress=False).record
    onnx_file = tmp_path / "tiny" / record["components"]["clip"]["dir"] / "model.onnx"
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[: len(data) // 2])  # a copy, not a link: the export cache stays intact
    with pytest.raises(cache.CorruptArtifact, match="truncated"):
        cache.verify(onnx_file.parent)
    assert build_all(cfg, progress=False).built == ["clip:onnxruntime"]
    cache.verify(onnx_file.parent, full=True)
    onnx_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one byte flipped: found by the hash
    with pytest.raises(cache.CorruptArtifact, match="does not match its manifest hash"):
        cache.verify(onnx_file.parent)
    assert build_all(cfg, progress=False).built == ["clip:onnxruntime"]


def test_loading_a_damaged_artifact_fails_clearly(ort_engines, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(ort_engines, engines)
    record = cache.read_json(engines / "tiny" / cache.BUILD_RECORD)
    manifest = engines / "tiny" / record["components"]["unet"]["dir"] / cache.MANIFEST
    manifest.write_text(manifest.read_text().replace('"files"', '"filez"', 1)[:-10])
    with pytest.raises(cache.CorruptArtifact, match="unreadable manifest"):
        Pipeline.load(engines, "tiny")


def test_staging_dir_publishes_atomically(tmp_path):
    final = tmp_path / "a"
    with pytest.raises(RuntimeError):
        with cache.staging_dir(final) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with cache.staging_dir(final) as tmp:
        (tmp / "x").write_text("whole")
    assert (final / "x").read_text() == "whole"


def test_profiles():
    dims = Dims(latent_channels=4, text_dim=32, text_len=77, vae_scale=8, unet_scale=2)
    static = make_profile(BuildConfig(batch_size=2, height=128, width=192), dims, 128, 64, 512, static=True)
    assert static.lo == static.opt == static.hi == Shape(2, 128, 192)
    dyn = make_profile(BuildConfig(build_dynamic_shape=True, max_batch=4), dims, 128, 64, 512, static=True)
    assert (dyn.lo, dyn.opt, dyn.hi) == (Shape(1, 64, 64), Shape(1, 128, 128), Shape(4, 512, 512, 4))  # 4 chunks
    anything = make_profile(BuildConfig(batch_size=3), dims, 128, 64, 512, static=False)  # ONNX Runtime, torch
    assert (anything.lo, anything.opt, anything.hi) == (Shape(1, 16, 16), Shape(3, 128, 128),
                                                        Shape(31, 16384, 16384, 4))
    with pytest.raises(ValueError, match="height 120 must be a positive multiple of 16"):
        make_profile(BuildConfig(height=120), dims, 128, 64, 512)


def test_tensorrt_profiles_reach_2048():
    """TensorRT's dynamic profiles to 2048² (issue 28): SD 1.5's UNet takes [2B, 4, 256, 256] at the top, the x4
    upscaler's (4 pixels per latent, 7 channels, its noise level per row) [2B, 7, 512, 512]: a 512² image in."""
    from export.families import SD, UPSCALER
    from export.presets import SD15, SD_X4_UPSCALER

    cfg = BuildConfig(build_dynamic_shape=True, max_size=2048, max_batch=2)
    for family, preset, latents, channels in ((SD, SD15, 256, 4), (UPSCALER, SD_X4_UPSCALER, 512, 7)):
        dims = Dims(unet_in_channels=channels, text_dim=preset.text_dim, vae_scale=preset.vae_scale,
                    unet_scale=2 ** (len(preset.unet.down_block_types) - 1))
        profile = make_profile(cfg, dims, preset.default_size, preset.min_size, preset.max_size, static=True)
        assert profile.hi.height == profile.hi.width == 2048
        unet = family.spec("unet").profile(dims, profile.lo, profile.opt, profile.hi)
        assert unet["sample"][2] == (4, channels, latents, latents), family.name
        if family is UPSCALER:
            assert unet["class_labels"][2] == (4,) and unet["sample"][0] == (1, 7, 32, 32)  # 128² out at least
        decoder = family.spec("vae_decoder").profile(dims, profile.lo, profile.opt, profile.hi)
        assert decoder["latent"][2] == (2, 4, latents, latents)


def test_torch_backend_artifact_is_keyed_by_weights(tmp_path, tiny_folder):
    cfg = BuildConfig(model="tiny", backend="torch", engine_dir=tmp_path)
    first = build_all(cfg, progress=False)
    assert not [s for s in first.built if s.endswith(":onnx")]  # no ONNX export for the torch backend
    assert sorted(first.built) == ["clip:torch", "model:files", "unet:torch", "vae_decoder:torch"]
    assert build_all(cfg, progress=False).built == []
    m = cache.verify(tmp_path / "tiny" / first.record["components"]["unet"]["dir"])
    assert m["key_parts"]["backend"]["torch"] == torch.__version__


def test_weight_hashes_are_memoised_by_stat(tmp_path, monkeypatch):
    from export import store  # hash_file_memo lives there; engine.cache re-exports it

    f, memo = tmp_path / "w.safetensors", tmp_path / "memo.json"
    f.write_bytes(b"a" * 1000)
    assert cache.hash_file_memo(f, memo) == cache.hash_file(f)
    reads = []
    real = cache.hash_file
    monkeypatch.setattr(store, "hash_file", lambda p, *a: reads.append(p) or real(p, *a))
    cache.hash_file_memo(f, memo)
    assert reads == []  # unchanged file: not read again
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size, new mtime (set explicitly: timestamps can be coarse)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.hash_file_memo(f, memo) == real(f) and reads == [f]
