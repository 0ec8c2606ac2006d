"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet on [latents (+ mask + masked-image latents)],
a KL autoencoder. The wrappers give each component the conventions of export/specs.py."""
from __future__ import annotations

from typing import Any

import torch

from export.families.base import Family, Outputs, Roles
from export.specs import SPECS

SD_MODEL_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                    "text_encoder": ("transformers", "CLIPTextModel")}


class ClipWrapper(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):  # [B, 77] int32 -> [B, 77, C]
        return self.text_encoder(input_ids.long()).last_hidden_state


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):  # [2B, 4, h, w], [2B], [2B, 77, C]
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / vae.config.scaling_factor

    def forward(self, latent):  # raw latents [B, 4, h, w] -> images [B, 3, H, W] in [-1, 1]
        return self.vae.decode(latent * self.inv_scale, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = vae.config.scaling_factor

    def forward(self, images):  # [B, 3, H, W] in [-1, 1] -> scaled latent mean and std [B, 4, h, w] each
        dist = self.vae.encode(images).latent_dist
        return dist.mean * self.scale, dist.std * self.scale


VAE_WRAPPERS = {"vae_decoder": VaeDecoderWrapper, "vae_encoder": VaeEncoderWrapper}


def sd_conditioning(text: Outputs) -> dict[str, Any]:
    return {"encoder_hidden_states": text["clip"]["text_embeddings"]}  # [2B, 77, C]


SD = Family(
    name="sd",
    specs=SPECS,
    roles=Roles(text_encoders=("clip",)),
    tokenizers=("tokenizer",),
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    wrappers={"clip": ClipWrapper, "unet": UNetWrapper, **VAE_WRAPPERS},
    model_classes=SD_MODEL_CLASSES,
    conditioning=sd_conditioning,
)
