"""Single-file LDM checkpoints: round trip tiny (and tiny-inpaint) -> LDM .safetensors -> diffusers folder,
bit-exact (CPU)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from export.models import component_module, folder_dims, load_model, materialize_preset
from export.presets import PRESETS
from export.specs import COMPONENTS, Shape, get_spec
from tests.ldm_layout import to_ldm, unet_to_ldm, vae_to_ldm, write_ldm_checkpoint


def _round_trip(tmp_path_factory, preset: str):
    """Materialise `preset`, write it as one LDM file, convert and load it (in a private cache, at
    <folder>/../.. of the converted folder); (reference, converted, file)."""
    root = tmp_path_factory.mktemp(f"single_file_{preset}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SD_ENGINE_CACHE", str(root / "cache"))
        folder = materialize_preset(PRESETS[preset], root=root / "presets")
        reference = load_model(folder)
        ckpt = write_ldm_checkpoint(folder, root / f"{preset}-ldm.safetensors")
        return reference, load_model(ckpt), ckpt


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """(reference tiny model, model loaded from the LDM single file, the file)."""
    return _round_trip(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def inpaint_round_trip(tmp_path_factory):
    """(reference tiny-inpaint model, model loaded from its LDM single file, the file)."""
    return _round_trip(tmp_path_factory, "tiny-inpaint")


def _outputs(model, name: str, inputs: dict) -> tuple[torch.Tensor, ...]:
    """A component's outputs as a tuple (vae_encoder returns two tensors)."""
    with torch.no_grad():
        out = component_module(model, name)(**inputs)
    return out if isinstance(out, tuple) else (out,)


def _assert_outputs_identical(reference, converted, name: str) -> None:
    from export.onnx_export import example_inputs

    spec = get_spec(name)
    inputs = example_inputs(spec, reference.dims, Shape(1, 128, 128), "fp32")
    want, got = _outputs(reference, name, inputs), _outputs(converted, name, inputs)
    assert len(want) == len(got) == len(spec.output_names)
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape
        torch.testing.assert_close(g, w, atol=0, rtol=0)


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
    reference, converted, _ = round_trip
    _assert_outputs_identical(reference, converted, name)


def test_inpainting_checkpoint_converts(inpaint_round_trip):
    """A 9-channel LDM checkpoint is detected as tiny-inpaint and written as an inpainting folder."""
    from safetensors import safe_open

    reference, converted, ckpt = inpaint_round_trip
    with safe_open(str(ckpt), framework="pt") as f:
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape() == [64, 9, 3, 3]
    folder = converted.path
    assert json.loads((folder / "conversion.json").read_text())["preset"] == "tiny-inpaint"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert converted.unet.config.in_channels == 9 and converted.unet.config.out_channels == 4
    assert folder_dims(folder).unet_in_channels == 9 and converted.dims == reference.dims
    assert converted.dims.inpainting_unet
    assert converted.scheduler_config == reference.scheduler_config


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_inpainting_state_dicts_identical(inpaint_round_trip, part):
    reference, converted, _ = inpaint_round_trip
    ref, got = getattr(reference, part).state_dict(), getattr(converted, part).state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("name", COMPONENTS)
def test_inpainting_outputs_identical(inpaint_round_trip, name):
    reference, converted, _ = inpaint_round_trip
    _assert_outputs_identical(reference, converted, name)


def test_converted_inpainting_folder_loads_in_diffusers(inpaint_round_trip):
    from diffusers import StableDiffusionInpaintPipeline

    _, converted, _ = inpaint_round_trip
    pipe = StableDiffusionInpaintPipeline.from_pretrained(converted.path, local_files_only=True, safety_checker=None)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    assert pipe.unet.config.in_channels == 9


def test_sd15_inpainting_header_detected():
    """A full-size SD 1.5 inpainting checkpoint's layout (meta tensors: shapes only) picks sd15-inpaint,
    and an ordinary SD 1.5 layout still picks sd15."""
    from export.single_file import choose_preset, empty_models

    for name in ("sd15", "sd15-inpaint"):
        preset = PRESETS[name]
        models = empty_models(preset)
        ckpt = to_ldm(models["unet"].state_dict(), models["vae"].state_dict(), models["text_encoder"].state_dict(),
                      preset.unet.layers_per_block, len(preset.vae.block_out_channels))
        chosen, _ = choose_preset(Path(f"{name}.safetensors"), ckpt, None)
        assert chosen.name == name
        assert chosen.pipeline_class == ("StableDiffusionInpaintPipeline" if name.endswith("inpaint")
                                         else "StableDiffusionPipeline")


def test_second_conversion_reuses_cache(round_trip, monkeypatch):
    from export.single_file import convert_single_file

    _, converted, ckpt = round_trip
    folder = converted.path
    monkeypatch.setenv("SD_ENGINE_CACHE", str(folder.parent.parent))  # the cache it was converted in
    mtime = folder.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert convert_single_file(ckpt) == folder
    assert convert_single_file(ckpt, preset="tiny") == folder
    assert time.perf_counter() - t0 < 2.0
    assert folder.stat().st_mtime_ns == mtime
    leftovers = [p for p in folder.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert not leftovers  # no staging leftovers (the conversion's lock file stays, as a build's does)


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
    for model, to_ldm_keys, convert, arg in (
        (unet, unet_to_ldm, convert_ldm_unet_checkpoint, 2),
        (vae, vae_to_ldm, convert_ldm_vae_checkpoint, 3),
    ):
        sd = model.state_dict()
        back = convert(to_ldm_keys(sd, arg), dict(model.config))
        assert back.keys() == sd.keys()
        for k in sd:
            torch.testing.assert_close(back[k], sd[k], atol=0, rtol=0, msg=k)
