"""Single-file LDM checkpoints: round trip tiny -> LDM .safetensors -> diffusers folder, bit-exact (CPU)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from export.models import component_module, load_model, materialize_preset
from export.presets import PRESETS
from export.specs import COMPONENTS, Shape, get_spec
from tests.ldm_layout import unet_to_ldm, vae_to_ldm, write_ldm_checkpoint


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """(reference model, model loaded from the LDM single file, the file, the converted folder)."""
    root = tmp_path_factory.mktemp("single_file")
    mp = pytest.MonkeyPatch()
    mp.setenv("SD_ENGINE_CACHE", str(root / "cache"))
    folder = materialize_preset(PRESETS["tiny"], root=root / "presets")
    reference = load_model(folder)
    ckpt = write_ldm_checkpoint(folder, root / "tiny-ldm.safetensors")
    converted = load_model(ckpt)
    yield reference, converted, ckpt
    mp.undo()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SD_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_ldm_file_has_original_layout(round_trip):
    from safetensors import safe_open

    _, _, ckpt = round_trip
    with safe_open(str(ckpt), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [32, 32, 1, 1]
        assert f.get_slice("first_stage_model.decoder.mid.attn_1.proj_out.weight").get_shape() == [32, 32, 1, 1]
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys


def test_converted_folder_is_a_diffusers_folder(round_trip):
    reference, converted, _ = round_trip
    folder = converted.path
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert json.loads((folder / "conversion.json").read_text())["preset"] == "tiny"
    assert folder.parent.name == "converted" and folder.name.startswith("tiny-ldm-")
    assert converted.scheduler_config == reference.scheduler_config
    assert converted.dims == reference.dims
    assert converted.tokenizer("a photo of a cat").input_ids == reference.tokenizer("a photo of a cat").input_ids


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_state_dicts_identical(round_trip, part):
    reference, converted, _ = round_trip
    ref, got = getattr(reference, part).state_dict(), getattr(converted, part).state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("name", COMPONENTS)
def test_outputs_identical(round_trip, name):
    from export.onnx_export import example_inputs

    reference, converted, _ = round_trip
    spec = get_spec(name)
    inputs = example_inputs(spec, reference.dims, Shape(1, 128, 128), "fp32")
    with torch.no_grad():
        want = component_module(reference, name)(**inputs)
        got = component_module(converted, name)(**inputs)
    assert want.shape == got.shape
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_second_conversion_reuses_cache(round_trip):
    from export.single_file import convert_single_file

    _, converted, ckpt = round_trip
    folder = converted.path
    mtime = folder.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert convert_single_file(ckpt) == folder
    assert convert_single_file(ckpt, preset="tiny") == folder
    assert time.perf_counter() - t0 < 2.0
    assert folder.stat().st_mtime_ns == mtime
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_wrong_preset_is_refused(round_trip):
    from export.single_file import convert_single_file

    _, _, ckpt = round_trip
    with pytest.raises(ValueError, match="(?s)does not match preset 'sd15'.*unet: .* misshaped"):
        convert_single_file(ckpt, preset="sd15")
    with pytest.raises(ValueError, match="unknown preset"):
        convert_single_file(ckpt, preset="sdxl-turbo")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_pickled_checkpoints_refused(cache, suffix):
    path = cache / f"x{suffix}"
    path.write_bytes(b"not even read")
    with pytest.raises(ValueError, match=r"safetensors") as err:
        load_model(path)
    assert "Convert it to .safetensors" in str(err.value)


def test_unrelated_safetensors_refused(cache):
    from safetensors.torch import save_file

    path = cache / "classifier.safetensors"
    save_file({"backbone.conv1.weight": torch.zeros(8, 3, 3, 3), "head.fc.weight": torch.zeros(10, 8)}, str(path))
    with pytest.raises(ValueError) as err:
        load_model(path)
    msg = str(err.value)
    assert "classifier.safetensors does not match any supported model family" in msg
    assert "2 other keys" in msg and "SD 1.x / SD 2.x" in msg
    assert all(name in msg for name in PRESETS)
    assert not (cache / "cache" / "converted").exists() or not any((cache / "cache" / "converted").iterdir())


def test_not_a_safetensors_file_refused(cache):
    path = cache / "broken.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        load_model(path)


def test_mapping_is_general():
    """Other block counts and layers per block: our LDM writer inverts diffusers' conversion exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 16, 32), layers_per_block=2, norm_num_groups=8, cross_attention_dim=8,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8,
    )
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    for model, to_ldm, convert, arg in (
        (unet, unet_to_ldm, convert_ldm_unet_checkpoint, 2),
        (vae, vae_to_ldm, convert_ldm_vae_checkpoint, 3),
    ):
        sd = model.state_dict()
        back = convert(to_ldm(sd, arg), dict(model.config))
        assert back.keys() == sd.keys()
        for k in sd:
            torch.testing.assert_close(back[k], sd[k], atol=0, rtol=0, msg=k)
