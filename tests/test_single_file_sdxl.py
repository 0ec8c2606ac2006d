"""Single-file SDXL checkpoints (Stability's sgm layout, as ComfyUI / A1111 save them): round trip tiny-xl
(and tiny-xl-refiner) -> one .safetensors -> diffusers folder, bit-exact (CPU), offline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export.models import component_module, load_model, materialize_preset
from export.presets import SDXL_PRESETS
from export.specs import Shape
from tests.ldm_layout import (
    open_clip_to_ldm,
    to_sgm,
    write_ldm_checkpoint,
    write_sgm_checkpoint,
)

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SIZE = 64


def _round_trip(tmp_path_factory, preset: str):
    """Materialise `preset`, write it as one sgm file, convert and load it (in a private cache);
    (reference, converted, file)."""
    root = tmp_path_factory.mktemp(f"single_file_{preset}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SD_ENGINE_CACHE", str(root / "cache"))
        folder = materialize_preset(SDXL_PRESETS[preset], root=root / "presets")
        ckpt = write_sgm_checkpoint(folder, root / f"{preset}-sgm.safetensors")
        return load_model(folder), load_model(ckpt), ckpt


@pytest.fixture(scope="module")
def xl_round_trip(tmp_path_factory):
    return _round_trip(tmp_path_factory, "tiny-xl")


def _assert_state_dicts_identical(reference, converted, part: str) -> None:
    ref_model, got_model = getattr(reference, part), getattr(converted, part)
    assert (ref_model is None) == (got_model is None), part
    if ref_model is None:
        return
    ref, got = ref_model.state_dict(), got_model.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0, msg=k)


def test_sgm_file_has_original_layout(xl_round_trip):
    from safetensors import safe_open

    _, _, ckpt = xl_round_trip
    with safe_open(str(ckpt), framework="pt") as f:
        keys = set(f.keys())
        def shape(k):
            return f.get_slice(k).get_shape()
        assert shape("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") == [96, 32]
        assert shape("conditioner.embedders.1.model.text_projection") == [32, 32]
        assert shape("model.diffusion_model.label_emb.0.0.weight")[1] == 6 * 8 + 32  # time ids + pooled text
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "conditioner.embedders.1.model.logit_scale" in keys and "conditioner.embedders.1.model.ln_final.bias" in keys
    assert not any(".q_proj." in k or "text_model" in k for k in keys if k.startswith("conditioner.embedders.1."))


def test_converted_folder_is_an_sdxl_folder(xl_round_trip):
    reference, converted, _ = xl_round_trip
    folder = converted.path
    index, ref_index = (json.loads((f / "model_index.json").read_text()) for f in (folder, reference.path))
    assert index == ref_index  # what diffusers' save_pretrained writes for StableDiffusionXLPipeline
    assert json.loads((folder / "conversion.json").read_text())["preset"] == "tiny-xl"
    assert folder.parent.name == "converted" and folder.name.startswith("tiny-xl-sgm-")
    assert converted.family.name == "sdxl" and converted.dims == reference.dims
    assert converted.scheduler_config == reference.scheduler_config
    for tok in ("tokenizer", "tokenizer_2"):
        want, got = getattr(reference, tok), getattr(converted, tok)
        assert got.pad_token == want.pad_token
        text = "a photo of a cat"
        assert got(text, padding="max_length").input_ids == want(text, padding="max_length").input_ids


@pytest.mark.parametrize("part", PARTS)
def test_state_dicts_identical(xl_round_trip, part):
    reference, converted, _ = xl_round_trip
    _assert_state_dicts_identical(reference, converted, part)


@pytest.mark.parametrize("name", ["clip", "clip2", "unet", "vae_decoder", "vae_encoder"])
def test_outputs_identical(xl_round_trip, name):
    from export.onnx_export import example_inputs

    reference, converted, _ = xl_round_trip
    spec = reference.family.spec(name)
    inputs = example_inputs(spec, reference.dims, Shape(1, SIZE, SIZE), "fp32")
    with torch.no_grad():
        want, got = (component_module(m, name)(**inputs) for m in (reference, converted))
    want, got = (x if isinstance(x, tuple) else (x,) for x in (want, got))
    assert len(want) == len(got) == len(spec.output_names)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_generated_image_identical(xl_round_trip):
    """diffusers' StableDiffusionXLPipeline on the converted folder makes the reference's pixels."""
    from diffusers import StableDiffusionXLPipeline

    reference, converted, _ = xl_round_trip
    images = []
    for folder in (reference.path, converted.path):
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe("a red bicycle", num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
                           output_type="np", generator=torch.Generator("cpu").manual_seed(4)).images)
    assert images[0].std() > 0.02
    np.testing.assert_array_equal(images[1], images[0])


def test_diffusers_from_single_file_reads_our_layout(xl_round_trip):
    """An independent check of the writer: diffusers' own from_single_file (offline, config = the reference
    folder) fills UNet, VAE and CLIP-L with the reference's weights. (Its text_encoder_2 is left out: diffusers
    picks that checkpoint by the position embedding width, which tiny-xl's two encoders share.)"""
    from diffusers import StableDiffusionXLPipeline

    reference, _, ckpt = xl_round_trip
    pipe = StableDiffusionXLPipeline.from_single_file(str(ckpt), config=str(reference.path), local_files_only=True)
    for part in PARTS[:3]:
        _assert_state_dicts_identical(reference, pipe, part)


def test_second_conversion_reuses_cache(xl_round_trip, monkeypatch):
    from export.single_file import convert_single_file

    _, converted, ckpt = xl_round_trip
    monkeypatch.setenv("SD_ENGINE_CACHE", str(converted.path.parent.parent))
    assert convert_single_file(ckpt) == converted.path
    assert convert_single_file(ckpt, preset="tiny-xl") == converted.path


def test_full_size_sdxl_header_detected():
    """The full-size SDXL base layout (meta tensors: shapes only, real CLIP-L + OpenCLIP bigG widths) picks sdxl."""
    from export.single_file import choose_preset, empty_models

    preset = SDXL_PRESETS["sdxl"]
    models = empty_models(preset)
    ckpt = to_sgm(*(models[p].state_dict() for p in PARTS), preset.unet.layers_per_block,
                  len(preset.vae.block_out_channels))
    assert ckpt["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    chosen, _ = choose_preset(Path("sd_xl_base_1.0.safetensors"), ckpt, None)
    assert chosen.name == "sdxl" and chosen.pipeline_class == "StableDiffusionXLPipeline"


def test_full_size_refiner_refused_with_a_reason():
    """A refiner layout with no refiner preset of its architecture: refused, saying why and what to do."""
    from export.single_file import choose_preset, empty_models

    preset = SDXL_PRESETS["sdxl"]
    models = empty_models(preset)
    ckpt = to_sgm(models["unet"].state_dict(), models["vae"].state_dict(), None, models["text_encoder_2"].state_dict(),
                  preset.unet.layers_per_block, len(preset.vae.block_out_channels))
    with pytest.raises(ValueError, match="(?s)does not match any supported model family.*SDXL refiner checkpoint "
                                         r"\(conditioner.embedders.0.model.\* only\).*diffusers folder"):
        choose_preset(Path("sd_xl_refiner_1.0.safetensors"), ckpt, None)


def test_missing_open_clip_tensor_is_named(xl_round_trip, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    _, _, ckpt = xl_round_trip
    state = load_file(str(ckpt))
    del state["conditioner.embedders.1.model.ln_final.weight"]
    path = tmp_path / "broken-xl.safetensors"
    save_file(state, str(path))
    monkeypatch.setenv("SD_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"(?s)tiny-xl: text_encoder_2: 1 missing \(e.g. text_model.final_layer_norm"):
        load_model(path)
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())


def test_sd_file_refused_as_sdxl(tmp_path, monkeypatch, tiny_folder):
    from export.single_file import convert_single_file

    monkeypatch.setenv("SD_ENGINE_CACHE", str(tmp_path / "cache"))
    ckpt = write_ldm_checkpoint(tiny_folder, tmp_path / "tiny-ldm.safetensors")
    with pytest.raises(ValueError, match="(?s)does not match preset 'tiny-xl'.*unet: missing 'label_emb.0.0.weight'"):
        convert_single_file(ckpt, preset="tiny-xl")


def test_open_clip_writer_inverts_diffusers():
    """Our open_clip writer is the exact inverse of diffusers' convert_open_clip_checkpoint (non-square
    projection, so a missing transpose shows)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                                                       intermediate_size=40, projection_dim=16, hidden_act="gelu"))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    ckpt = open_clip_to_ldm(sd)
    assert ckpt["conditioner.embedders.1.model.text_projection"].shape == (24, 16)
    back = convert_open_clip_checkpoint(model, ckpt, prefix="conditioner.embedders.1.model.")
    assert back.keys() == sd.keys()
    for k, value in sd.items():
        torch.testing.assert_close(back[k], value, atol=0, rtol=0, msg=k)


@pytest.mark.skipif("tiny-xl-refiner" not in SDXL_PRESETS, reason="no tiny-xl-refiner preset")
def test_refiner_round_trip(tmp_path_factory):
    """An sgm refiner file (OpenCLIP bigG as conditioner.embedders.0.model.*, no CLIP-L) converts to a
    StableDiffusionXLImg2ImgPipeline folder with requires_aesthetics_score, bit-exact."""
    reference, converted, _ = _round_trip(tmp_path_factory, "tiny-xl-refiner")
    index = json.loads((converted.path / "model_index.json").read_text())
    assert index == json.loads((reference.path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"]
    assert converted.family.name == "sdxl-refiner" and converted.dims == reference.dims
    for part in PARTS:
        _assert_state_dicts_identical(reference, converted, part)
