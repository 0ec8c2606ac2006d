"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet on [latents (+ mask + masked-image latents)],
a KL autoencoder. The wrappers give each component the conventions of export/specs.py."""
from __future__ import annotations

from typing import Any

from export.families.base import Family, Outputs, Roles
from export.specs import SPECS

_W = "export.families.sd_wrappers"  # torch modules, imported when export needs them
VAE_WRAPPERS = {"vae_decoder": f"{_W}:VaeDecoderWrapper", "vae_encoder": f"{_W}:VaeEncoderWrapper"}
SD_MODEL_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                    "text_encoder": ("transformers", "CLIPTextModel")}


def sd_conditioning(text: Outputs) -> dict[str, Any]:
    return {"encoder_hidden_states": text["clip"]["text_embeddings"]}  # [2B, 77, C]


SD = Family(
    name="sd",
    specs=SPECS,
    roles=Roles(text_encoders=("clip",)),
    tokenizers=("tokenizer",),
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    wrappers={"clip": f"{_W}:ClipWrapper", "unet": f"{_W}:UNetWrapper", **VAE_WRAPPERS},
    model_classes=SD_MODEL_CLASSES,
    conditioning=sd_conditioning,
    request_fields=("clip_skip",),  # A1111's clip skip (SDXL's conditioning is the penultimate layer already)
)
