"""SDXL in fp16. The VAE overflows in fp16: an fp16 build keeps a `force_upcast` VAE in fp32 (as diffusers' SDXL
pipelines upcast it), the rest in fp16; a VAE whose config says `force_upcast: false` (the fp16-fix VAE) stays
fp16. The fp16 UNet exports (diffusers' mixed-dtype time-id Concat is cast first) and equals diffusers'."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.build import build_all, component_precision
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from engine.request import Request
from export.families import SD, SDXL


@pytest.fixture(scope="module")
def xl_folder(engine_cache):
    from export.models import materialize_preset
    from export.presets import ALL_PRESETS

    return materialize_preset(ALL_PRESETS["tiny-xl"])


def test_which_components_are_upcast(xl_folder, tiny_folder, tmp_path):
    assert json.loads((xl_folder / "vae" / "config.json").read_text()).get("force_upcast", True)
    assert component_precision(SDXL, xl_folder, "vae_decoder", "fp16") == "fp32"
    assert component_precision(SDXL, xl_folder, "vae_encoder", "fp16") == "fp32"
    assert component_precision(SDXL, xl_folder, "unet", "fp16") == "fp16"
    assert component_precision(SDXL, xl_folder, "vae_decoder", "fp32") == "fp32"
    assert component_precision(SD, tiny_folder, "vae_decoder", "fp16") == "fp16"  # SD pipelines never upcast
    fixed = tmp_path / "fp16_fix"
    shutil.copytree(xl_folder, fixed)
    config = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert component_precision(SDXL, fixed, "vae_decoder", "fp16") == "fp16"


def test_fp16_sdxl_build_runs_the_vae_in_fp32(xl_folder, tmp_path):
    build_all(BuildConfig(model="tiny-xl", backend="onnxruntime", precision="fp16", engine_dir=tmp_path, height=64,
                          width=64), progress=False)
    record = json.loads(next(tmp_path.glob("*/build.json")).read_text())
    precisions = {name: entry["precision"] for name, entry in record["components"].items()}
    assert precisions == {"clip": "fp16", "clip2": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    pipe = Pipeline.load(tmp_path)
    assert pipe.runners["vae_decoder"].dtypes["latent"] == torch.float32
    assert pipe.runners["unet"].dtypes["sample"] == torch.float16
    image = pipe.run(Request(prompt="a lighthouse", steps=4, height=64, width=64), progress=False)[0]
    assert image.pixels.shape == (64, 64, 3) and np.ptp(image.pixels) > 0
    pipe.close()


def test_fp16_unet_wrapper_equals_diffusers_unet(xl_folder):
    from diffusers import UNet2DConditionModel

    from export.families.sdxl_wrappers import XLUNetWrapper

    ours = XLUNetWrapper(UNet2DConditionModel.from_pretrained(xl_folder / "unet", torch_dtype=torch.float16))
    theirs = UNet2DConditionModel.from_pretrained(xl_folder / "unet", torch_dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    cfg = theirs.config
    sample = torch.randn(2, 4, 8, 8, generator=g).half()
    hidden = torch.randn(2, 77, cfg.cross_attention_dim, generator=g).half()
    pooled = torch.randn(2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                         generator=g).half()
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 8, 16, 64, 64]])
    t = torch.tensor([500, 20])
    with torch.no_grad():
        got = ours(sample, t, hidden, pooled, time_ids)
        want = theirs(sample, t, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                      return_dict=False)[0]
    assert got.dtype == torch.float16 and torch.equal(got, want)
