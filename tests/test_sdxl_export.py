"""SDXL export groundwork on `tiny-xl`: presets, the family, the diffusers folder, and every component's ONNX
graph vs its torch module in ONNX Runtime; SD's registry and family stay as they were."""
from __future__ import annotations

import json

import pytest
import torch

from export.families import FAMILIES, SD, SDXL, detect_family, get_family, sdxl_time_ids
from export.onnx_export import ExportOptions, export_component
from export.presets import ALL_PRESETS, PRESETS, SDXL_PRESETS
from export.specs import COMPONENTS, SDXL_COMPONENTS, SDXL_SPECS, SPECS, Dims, get_spec
from tests.helpers import check_graph, check_parity


@pytest.fixture(scope="module")
def tiny_xl(engine_cache):
    from export.models import load_model

    return load_model("tiny-xl")


@pytest.fixture(scope="module")
def tiny_xl_pipe(tiny_xl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_xl.path, local_files_only=True)


# ---- presets, specs, family (no weights) ----


def test_sdxl_presets():
    tiny, full = SDXL_PRESETS["tiny-xl"], SDXL_PRESETS["sdxl"]
    assert set(ALL_PRESETS) == set(PRESETS) | {"tiny-xl", "tiny-xl-refiner", "tiny-xl-inpaint", "sdxl", "sdxl-refiner",
                                               "sdxl-inpaint", "tiny-upscaler", "sd-x4-upscaler", "tiny-ldm-sr",
                                               "tiny-ldm-uncond", "tiny-ldm-cin", "tiny-ldm-text", "tiny-ldm-semantic",
                                               "tiny-ldm-layout", "tiny-ldm-text-vq"}
    assert not set(PRESETS) & set(SDXL_PRESETS)
    assert {p.family for p in PRESETS.values()} == {"sd"}
    assert {p.family for p in SDXL_PRESETS.values()} == {"sdxl", "sdxl-refiner"}
    assert tiny.pipeline_class == full.pipeline_class == "StableDiffusionXLPipeline"
    t = tiny.unet_config()
    assert t["cross_attention_dim"] == tiny.text_dim == tiny.clip.hidden_size + tiny.clip2.hidden_size == 64
    assert t["addition_embed_type"] == "text_time"
    assert t["projection_class_embeddings_input_dim"] == 6 * t["addition_time_embed_dim"] + tiny.pooled_dim == 80
    f = full.unet_config()  # SDXL 1.0 base's published config
    assert f["cross_attention_dim"] == full.text_dim == 768 + 1280 == 2048
    assert f["projection_class_embeddings_input_dim"] == 2816 and full.pooled_dim == 1280
    assert f["transformer_layers_per_block"] == (1, 2, 10) and f["attention_head_dim"] == (5, 10, 20)
    assert f["sample_size"] == 128 and full.vae_config()["scaling_factor"] == 0.13025


def test_sdxl_preset_has_sdxl_base_parameter_counts():
    """The `sdxl` preset builds (on the meta device: no memory) with SDXL 1.0 base's exact parameter counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    p = SDXL_PRESETS["sdxl"]
    with torch.device("meta"):
        models = (UNet2DConditionModel(**p.unet_config()), AutoencoderKL(**p.vae_config()),
                  CLIPTextModel(CLIPTextConfig(**p.clip.config())),
                  CLIPTextModelWithProjection(CLIPTextConfig(**p.clip2.config())))
    counts = [sum(x.numel() for x in m.parameters()) for m in models]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]


def test_sd_registry_unchanged():
    assert COMPONENTS == ("clip", "unet", "vae_decoder", "vae_encoder") and tuple(SPECS) == COMPONENTS
    assert get_spec("clip") is SPECS["clip"] and get_family("sd") is SD and SD.specs is SPECS
    assert SPECS["unet"].input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert SD.default_components(Dims()) == ("clip", "unet", "vae_decoder")
    assert SD.request_conditioning is None and not SD.zero_empty_negative and SD.roles.denoiser == "unet"
    with pytest.raises(ValueError, match="unknown component"):
        get_spec("clip2")


def test_sdxl_specs_shapes():
    d = Dims(text_dim=2048, text2_dim=1280, pooled_dim=1280, time_ids=6)
    assert tuple(SDXL_SPECS) == SDXL_COMPONENTS and FAMILIES["sdxl"] is SDXL and SDXL.specs is SDXL_SPECS
    assert SDXL.roles.text_encoders == ("clip", "clip2") and SDXL.tokenizers == ("tokenizer", "tokenizer_2")
    assert SDXL.default_components(d) == ("clip", "clip2", "unet", "vae_decoder")
    assert SDXL.spec("clip").output_shapes(d, 2, 1024, 1024) == {"text_embeddings": (2, 77, 768)}
    assert SDXL.spec("clip2").output_shapes(d, 2, 1024, 1024) == {"text_embeddings": (2, 77, 1280),
                                                                  "text_embeds": (2, 1280)}
    assert SDXL.spec("unet").input_shapes(d, 2, 1024, 1024) == {
        "sample": (2, 4, 128, 128), "timestep": (2,), "encoder_hidden_states": (2, 77, 2048),
        "text_embeds": (2, 1280), "time_ids": (2, 6)}
    assert SDXL.spec("clip2").model_folder == "text_encoder_2"
    assert SDXL.spec("vae_decoder") is SPECS["vae_decoder"] and SDXL.spec("vae_encoder") is SPECS["vae_encoder"]


# ---- the materialised tiny-xl folder ----


def test_tiny_xl_is_a_diffusers_sdxl_folder(tiny_xl, tiny_xl_pipe, tiny_folder):
    from export.models import folder_dims, resolve_model

    folder = tiny_xl.path
    assert resolve_model(folder)[0] == folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert detect_family(folder) is SDXL and tiny_xl.family is SDXL
    assert detect_family(tiny_folder) is SD  # SD folders stay SD
    # residuals: conv_in, block 0's resnet and downsampler (32), block 1's resnet (64), the mid block (64)
    assert folder_dims(folder) == tiny_xl.dims == Dims(text_dim=64, text2_dim=32, pooled_dim=32, time_ids=6,
                                                       vae_scale=8, unet_scale=2, residual_channels=(32, 32, 32, 64, 64),
                                                       residual_scales=(1, 1, 2, 2, 2), vae_sample_size=128)
    assert type(tiny_xl_pipe).__name__ == "StableDiffusionXLPipeline"
    # tokenizer_2: the same CLIP vocabulary, padded with "!" (id 0) like SDXL's; tokenizer pads with eos
    assert tiny_xl_pipe.tokenizer_2.pad_token == tiny_xl.tokenizer_2.pad_token == "!"
    assert tiny_xl.tokenizer_2.pad_token_id == 0 and tiny_xl.tokenizer.pad_token == "<|endoftext|>"
    assert tiny_xl.tokenizer_2.get_vocab() == tiny_xl.tokenizer.get_vocab()
    image = tiny_xl_pipe("a lighthouse", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_conditioning_matches_diffusers_encode_prompt(tiny_xl, tiny_xl_pipe):
    from export.models import component_module

    prompts = ["", "a lighthouse at dusk"]  # [uncond; cond], as the pipeline batches them

    def ids(tokenizer):
        return tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(torch.int32)

    def unused(width: int) -> torch.Tensor:  # no textual-inversion token: token_embeds is never read
        return torch.full((2, 77, width), float("nan"))

    with torch.no_grad():
        c1 = component_module(tiny_xl, "clip")(ids(tiny_xl.tokenizer), unused(tiny_xl.dims.text_dim -
                                                                            tiny_xl.dims.text2_dim))
        c2, pooled = component_module(tiny_xl, "clip2")(ids(tiny_xl.tokenizer_2), unused(tiny_xl.dims.text2_dim))
        cond = SDXL.conditioning({"clip": {"text_embeddings": c1},
                                  "clip2": {"text_embeddings": c2, "text_embeds": pooled}})
        pe, npe, pp, npp = tiny_xl_pipe.encode_prompt(prompts[1], device="cpu", do_classifier_free_guidance=True,
                                                      negative_prompt=prompts[0])
    torch.testing.assert_close(cond["encoder_hidden_states"], torch.cat([npe, pe]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cond["text_embeds"], torch.cat([npp, pp]), atol=1e-6, rtol=0)
    want = tiny_xl_pipe._get_add_time_ids((96, 64), (0, 0), (96, 64), torch.float32,
                                          text_encoder_projection_dim=tiny_xl.dims.pooled_dim)
    got = sdxl_time_ids(4, 96, 64)["time_ids"]
    assert got.shape == (4, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, want.repeat(4, 1))


def test_load_component_reads_the_family(tiny_xl):
    from export.families.sdxl_wrappers import XLClip2Wrapper, XLUNetWrapper
    from export.models import load_component

    assert isinstance(load_component(tiny_xl.path, "clip2"), XLClip2Wrapper)
    assert isinstance(load_component(tiny_xl.path, "unet", family="sdxl"), XLUNetWrapper)
    with pytest.raises(ValueError, match="unknown component 'clip2' for family 'sd'"):
        load_component(tiny_xl.path, "clip2", family="sd")


# ---- ONNX export parity ----


@pytest.fixture(scope="module")
def exported(tiny_xl, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_sdxl")
    return out, {c: export_component(tiny_xl, c, out / f"{c}.onnx", ExportOptions()) for c in SDXL_COMPONENTS}


@pytest.mark.parametrize("name", SDXL_COMPONENTS)
def test_sdxl_component_matches_torch(tiny_xl, exported, name):
    out, infos = exported
    path = out / f"{name}.onnx"
    spec = SDXL.spec(name)
    assert tiny_xl.family is SDXL
    check_graph(path, spec)
    assert [i["name"] for i in infos[name]["inputs"]] == spec.input_names
    check_parity(tiny_xl, name, path)  # every output, at the export shape and another batch and size
