"""The up-front memory estimate (engine/memory.py, export/footprint.py): footprints read from model configs, the
estimate against hand-computed sizes, and a request past the available memory refused before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import memory
from engine.request import Request, RequestError
from export.footprint import Footprint, folder_footprint

# the published configs' relevant fields (Stable Diffusion 1.5 and SDXL base)
SD15_UNET = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "attention_head_dim": 8}
SDXL_UNET = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "attention_head_dim": [5, 10, 20]}
SD_VAE = {"block_out_channels": [128, 256, 512, 512]}


def write_folder(root: Path, unet: dict, vae: dict) -> Path:
    for sub, config in (("unet", unet), ("vae", vae)):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("unet, want", [
    (SD15_UNET, Footprint(attention_scale=8, attention_heads=8, decoder_channels=128, decoder_attention=True)),
    (SDXL_UNET, Footprint(attention_scale=16, attention_heads=10, decoder_channels=128, decoder_attention=True)),
])
def test_footprints_of_the_published_configs(tmp_path, unet, want):
    assert folder_footprint(write_folder(tmp_path, unet, SD_VAE)) == want


def test_the_x4_upscaler_footprint_counts_self_attention_only(tmp_path):
    """stable-diffusion-x4-upscaler: 3 VAE blocks (4 pixels per latent); its first three UNet levels attend to the text
    only (only_cross_attention), so the first self-attention is the fourth level's, at 4 x 2**3 pixels per token."""
    unet = {"down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3, "attention_head_dim": 8,
            "only_cross_attention": [True, True, True, False]}
    got = folder_footprint(write_folder(tmp_path, unet, {"block_out_channels": [128, 256, 512]}))
    assert got == Footprint(attention_scale=32, attention_heads=8, decoder_channels=128, decoder_attention=True)


def test_a_unet2dmodel_footprint_reads_its_head_width(tmp_path):
    """UNet2DModel (the LDM paper's unconditional and super-resolution UNets): attention_head_dim is each head's width,
    so the first attention level's 448 channels are 14 heads of 32 (UNet2DConditionModel reads it as the count)."""
    unet = {"_class_name": "UNet2DModel", "block_out_channels": [224, 448, 672, 896], "attention_head_dim": 32,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]}
    got = folder_footprint(write_folder(tmp_path, unet, {"block_out_channels": [128, 256, 512]}))
    assert got == Footprint(attention_scale=8, attention_heads=14, decoder_channels=128, decoder_attention=True)


def test_the_tiny_preset_footprint(tiny_folder):
    # tiny: vae block_out_channels [16, 16, 32, 32] (8 pixels per latent), attention on the first UNet level with
    # attention_head_dim [1, 2]
    assert folder_footprint(tiny_folder) == Footprint(attention_scale=8, attention_heads=1, decoder_channels=16,
                                                      decoder_attention=True)


def test_sd15_at_512_with_guidance_in_fp32():
    got = memory.estimate(Footprint(), 512, 512, images=1, cfg=True, precision="fp32", attention="decomposed",
                          latent_scale=8)
    assert got.unet_bytes == 2 * 2 * 8 * 4096 * 4096 * 4 == 2 * 2**30  # scores + softmax, 2 rows, 8 heads
    assert got.decoder_bytes == 3 * 128 * 512 * 512 * 4  # > the mid-block attention's 2 * 4096**2 * 4
    half = memory.estimate(Footprint(), 512, 512, 1, True, "fp16", "decomposed", 8)
    assert half.unet_bytes == got.unet_bytes // 2
    fused = memory.estimate(Footprint(), 512, 512, 1, True, "fp16", "fused", 8)
    assert fused.unet_bytes == 0 and fused.decoder_bytes == 3 * 128 * 512 * 512 * 2


def test_a_request_past_the_available_memory_is_refused_naming_the_size(ort_pipeline):
    with pytest.raises(RequestError) as err:
        ort_pipeline.prepare(Request(prompt="x", height=16384, width=16384, steps=2))
    assert err.value.field == "height"
    message = str(err.value)
    assert "16384x16384 x 1 image(s) needs at least" in message and "GiB is available on cpu" in message, message
    ort_pipeline.prepare(Request(prompt="x", height=64, width=64, steps=2))  # fits: no error
    assert ort_pipeline.info["footprint"] == vars(Footprint(8, 1, 16, True))  # build.json keeps it
