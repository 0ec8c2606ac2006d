"""Stable Diffusion's x4 upscaler (`StableDiffusionUpscalePipeline` folders): the production descendant of the
Latent Diffusion paper's super-resolution model.

- SD 2.x's one text encoder and conditioning; a UNet of 7 input channels: the 4 latent channels, then the
  low-resolution RGB image (at the latent size) concatenated after the sampler scales its input, in the order
  [uncond; cond] under guidance; its noise level is the UNet's `class_labels` [2B] (an embedding of 1000 classes).
- The init image is that low-resolution image: it is noised at `noise_level` (default 20, at most the folder's
  `max_noise_level`, 350) with the DDPM schedule of `low_res_scheduler/`, and the latents start from pure noise, so
  there is no strength and no latent encoder (engine/upscale.py).
- Its VAE upsamples by 4 (three blocks), with the scaling factor the folder says (0.08333 for the released model):
  the image out is 4x the image in.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from export.errors import RequestError
from export.families.base import Family, LowRes, Roles
from export.families.sd import SD_MODEL_CLASSES, VAE_WRAPPERS, sd_conditioning
from export.specs import UPSCALE_SPECS

LOW_RES = LowRes()
NOISE_LEVELS = 1000  # the UNet's class embeddings: what any folder's max_noise_level stays under

_W = "export.families.sd_wrappers"
_U = "export.families.upscale_wrappers"


def _noise_levels(rows: Sequence[Any], cfg: bool) -> dict[str, Any]:
    """The UNet's class labels: each row's noise level, int32 [B or 2B] ([uncond; cond] rows the same)."""
    import torch

    levels = [row.request.noise_level for row in rows]
    return {"class_labels": torch.tensor(levels * (2 if cfg else 1), dtype=torch.int32)}


def _defaults(r: Any, dims: Any) -> dict[str, Any]:
    """The noise level filled in (diffusers' 20); RequestError for a strength other than 1 or a level outside
    [0, 350] (the model's own max_noise_level is checked against its engine: engine/upscale.py)."""
    if r.strength not in (None, 1.0):
        raise RequestError("strength", f"strength {r.strength} is not for the x4 upscaler: it denoises from pure noise "
                                       "with the init image as its condition; leave strength unset (or 1)")
    level = LOW_RES.default_noise_level if r.noise_level is None else r.noise_level
    if not 0 <= level <= LOW_RES.max_noise_level:
        raise RequestError("noise_level", f"noise_level {level} is outside [0, {LOW_RES.max_noise_level}]")
    return {"noise_level": level}


UPSCALER = Family(
    name="sd-upscaler",
    specs=UPSCALE_SPECS,
    roles=Roles(text_encoders=("clip",)),
    tokenizers=("tokenizer",),
    pipeline_classes=("StableDiffusionUpscalePipeline",),
    wrappers={"clip": f"{_W}:ClipWrapper", "unet": f"{_U}:UpscaleUNetWrapper", **VAE_WRAPPERS},
    model_classes=SD_MODEL_CLASSES,
    conditioning=sd_conditioning,
    request_conditioning=_noise_levels,
    request_fields=("noise_level", "clip_skip"),
    request_defaults=_defaults,
    blend_inpainting=False,
    txt2img_components=("clip", "unet", "vae_decoder"),
    txt2img=False,  # an init image always: the low-resolution image to upscale
    default_strength=(1.0, 1.0),
    upcast_vae=True,  # diffusers' upscale pipeline decodes in fp32 where the VAE's config says force_upcast
    low_res=LOW_RES,
)
