"""The Latent Diffusion paper's text-to-image model (diffusers' `LDMTextToImagePipeline`: `LDMBertModel` text encoder
with a BERT tokenizer, `UNet2DConditionModel`, a KL-f8 or VQ autoencoder in vqvae/, DDIM): `ldm-text` for a KL
autoencoder (CompVis' ldm-text2im-large-256), `ldm-text-vq` for a VQ one; model_index.json's vqvae class decides.

The text encoder is its own graph (`bert`: ids and textual-inversion vectors in, its last hidden state out, as the
pipeline reads `bert(ids)[0]`); prompts read as SD's do (A1111's syntax, chunks of 77 tokens, or plain: the
pipeline's own padding to 77). Guidance encodes "" for the unconditional rows, as the pipeline; the latents are
divided by the autoencoder's scaling factor before its decoder, as the pipeline decodes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from export.families.base import Family, Outputs, Roles
from export.families.ldm import SCALED_VQ
from export.specs import LDM_TEXT_SPECS

_BERT = "diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion"  # where diffusers defines LDMBertModel


def ldm_text_conditioning(text: Outputs) -> dict[str, Any]:
    return {"encoder_hidden_states": text["bert"]["text_embeddings"]}  # [2B, 77, C]


LDM_TEXT = Family(
    name="ldm-text",
    specs=LDM_TEXT_SPECS,
    roles=Roles(text_encoders=("bert",)),
    tokenizers=("tokenizer",),
    pipeline_classes=("LDMTextToImagePipeline",),
    wrappers={"bert": "export.families.ldm_wrappers:LdmBertWrapper", "unet": "export.families.sd_wrappers:UNetWrapper",
              "vae_decoder": "export.families.sd_wrappers:VaeDecoderWrapper",
              "vae_encoder": "export.families.sd_wrappers:VaeEncoderWrapper"},
    model_classes={"bert": (_BERT, "LDMBertModel"), "unet": ("diffusers", "UNet2DConditionModel"),
                   "vqvae": ("diffusers", "AutoencoderKL")},
    conditioning=ldm_text_conditioning,
    txt2img_components=("bert", "unet", "vae_decoder"),
    index_classes={"vqvae": "AutoencoderKL"},
    reseed_step_noise=True,
)

LDM_TEXT_VQ = replace(
    LDM_TEXT,
    name="ldm-text-vq",
    wrappers={**LDM_TEXT.wrappers, **SCALED_VQ},
    model_classes={**LDM_TEXT.model_classes, "vqvae": ("diffusers", "VQModel")},
    blend_inpainting=False,
    index_classes={"vqvae": "VQModel"},
)
