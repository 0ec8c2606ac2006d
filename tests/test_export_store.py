"""The export store (engine/cache.py, `<cache root>/exports/<key>/`): a second engine dir copies the first one's ONNX
export instead of exporting again; a damaged store entry is never used; a store that cannot be written costs a
warning, not the build."""
from __future__ import annotations

import os
import warnings

import pytest

from engine import cache
from engine.build import build_all
from engine.config import BuildConfig


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _build(engine_dir, **extra):
    return build_all(BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", engine_dir=engine_dir,
                                 components=("vae_decoder",), **extra), progress=False)


def _onnx_manifest(result, engine_dir):
    art = engine_dir / result.record["model_id"] / result.record["components"]["vae_decoder"]["dir"]
    onnx_art = next((art.parent.parent / "onnx").iterdir())
    return onnx_art, cache.read_json(onnx_art / cache.MANIFEST)


def test_a_second_engine_dir_copies_the_export_and_a_damaged_store_entry_is_not_used(private_cache, tmp_path):
    first = _build(tmp_path / "a")
    art_a, manifest_a = _onnx_manifest(first, tmp_path / "a")
    store = private_cache / cache.EXPORTS / manifest_a["key"]
    assert (store / "model.onnx").read_bytes() == (art_a / "model.onnx").read_bytes()
    second = _build(tmp_path / "b")
    art_b, manifest_b = _onnx_manifest(second, tmp_path / "b")
    # the same export record (its measured trace and export seconds too): copied, not exported again
    assert manifest_b["export"] == manifest_a["export"]
    assert (art_b / "model.onnx").read_bytes() == (art_a / "model.onnx").read_bytes()
    assert "vae_decoder:onnx" in second.built  # the engine dir's artifact was made
    # bytes of the store's graph altered with the mtime put back: the store's full check refuses it
    onnx = store / "model.onnx"
    original, st = onnx.read_bytes(), onnx.stat()
    data = bytearray(original)
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = _build(tmp_path / "c")
    art_c, _ = _onnx_manifest(third, tmp_path / "c")
    assert (art_c / "model.onnx").read_bytes() == original  # exported again, not copied from the damaged entry
    assert cache.lookup(art_c, full=True) is not None
    assert onnx.read_bytes() == original and cache.lookup(store, full=True) is not None  # and the store repaired


def test_a_store_that_cannot_be_written_warns_and_the_build_succeeds(private_cache, tmp_path):
    (private_cache / cache.EXPORTS).parent.mkdir(parents=True, exist_ok=True)
    (private_cache / cache.EXPORTS).write_text("not a folder")  # the store cannot be made
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _build(tmp_path / "a")
    assert any("cannot keep this export in the store" in str(w.message) for w in caught)
    art, _ = _onnx_manifest(result, tmp_path / "a")
    assert cache.lookup(art, full=True) is not None
