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
