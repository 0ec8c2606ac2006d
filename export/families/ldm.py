"""The Latent Diffusion paper's own models (https://arxiv.org/abs/2112.10752), as diffusers keeps them: a
`UNet2DModel` denoiser (no cross-attention), a VQ-regularised autoencoder (`VQModel`), DDIM. No text: a request
gives no prompt (engine/request.py `with_prompt`) and runs without guidance (the UNet once per step).

`ldm-uncond` (`LDMPipeline` folders: unet/, vqvae/, scheduler/): unconditional; latents divided by the autoencoder's
scaling factor before the VQ decoder, as that pipeline decodes.

`ldm-sr` (`LDMSuperResolutionPipeline` folders: unet/, vqvae/, scheduler/): the low-resolution image, in [-1, 1] at
the latent size, concatenated to the latents *before* the sampler scales the UNet's input (as that pipeline does);
no text, no guidance, no strength; a VQ-f4 autoencoder, so the image out is 4x the image in (engine/upscale.py's
`LowResImage`: the same path as the x4 upscaler's, without the noise).

The VQ decoder graph includes the nearest-codebook quantisation of `VQModel.decode` (export/families/ldm_wrappers.py);
any latent channels (3 for f4) and scale factor, read from the folder.
"""
from __future__ import annotations

from typing import Any

from export.errors import RequestError
from export.families.base import Family, LowRes, Outputs, Roles
from export.specs import LDM_SPECS

_W = "export.families.ldm_wrappers"
LDM_MODEL_CLASSES = {"unet": ("diffusers", "UNet2DModel"), "vqvae": ("diffusers", "VQModel")}
LDM_WRAPPERS = {"unet": f"{_W}:Unet2DWrapper", "vae_decoder": f"{_W}:VqDecoderWrapper",
                "vae_encoder": f"{_W}:VqEncoderWrapper"}  # LDMSuperResolutionPipeline decodes latents as they are
SCALED_VQ = {"vae_decoder": f"{_W}:VqDecoderScaled", "vae_encoder": f"{_W}:VqEncoderScaled"}  # the other pipelines


def no_text(text: Outputs) -> dict[str, Any]:
    return {}


def no_guidance(r: Any, dims: Any) -> dict[str, Any]:
    """No guidance: the pipelines have none, the UNet runs once per step (recorded as run: guidance 1)."""
    return {"guidance_scale": 1.0}


def _sr_defaults(r: Any, dims: Any) -> dict[str, Any]:
    """No guidance; RequestError for a strength other than 1."""
    if r.strength not in (None, 1.0):
        raise RequestError("strength", f"strength {r.strength} is not for LDM super-resolution: it denoises from pure "
                                       "noise with the init image as its condition; leave strength unset (or 1)")
    return no_guidance(r, dims)


LDM_SR = Family(
    name="ldm-sr",
    specs=LDM_SPECS,
    roles=Roles(text_encoders=()),
    tokenizers=(),
    pipeline_classes=("LDMSuperResolutionPipeline",),
    wrappers=LDM_WRAPPERS,
    model_classes=LDM_MODEL_CLASSES,
    conditioning=no_text,
    request_defaults=_sr_defaults,
    blend_inpainting=False,
    txt2img_components=("unet", "vae_decoder"),
    txt2img=False,  # an init image always: the low-resolution image
    default_strength=(1.0, 1.0),
    low_res=LowRes(scheduler_config=None, before_scaling=True),
    reseed_step_noise=True,
)

LDM_UNCOND = Family(
    name="ldm-uncond",
    specs=LDM_SPECS,
    roles=Roles(text_encoders=()),
    tokenizers=(),
    pipeline_classes=("LDMPipeline",),
    wrappers={**LDM_WRAPPERS, **SCALED_VQ},
    model_classes=LDM_MODEL_CLASSES,
    conditioning=no_text,
    request_defaults=no_guidance,
    blend_inpainting=False,
    txt2img_components=("unet", "vae_decoder"),
    reseed_step_noise=True,
)
