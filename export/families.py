"""Model families: which components a model has and how prompts become UNet conditioning.

A family is data plus one small function, so a new family (SDXL: two text encoders, pooled
embeddings, time ids) is an added entry, never an `if family == ...` in the pipeline:

- `components`: the family's component specs (the registry in export/specs.py);
- `text_encoders` / `tokenizers`: the components run on token ids and the model sub-folder of the
  tokenizer that feeds each one;
- `conditioning(text)`: the text encoders' outputs ({component: {tensor name: tensor}}) -> the extra
  UNet inputs, passed on as `**cond` by the denoise step.

SDXL's UNet also takes `time_ids` [2B, 6], which depend on the request (image size and crop), not on
the prompt: `conditioning` gives `encoder_hidden_states` and `text_embeds` only, and the pipeline adds
`time_ids` from the family's `size_conditioning(batch, height, width)` (None for SD), so both stay pure
functions of what they are given. `zero_empty_negative` is diffusers' SDXL `force_zeros_for_empty_prompt`:
with guidance and no negative prompt, the unconditional rows are zeros instead of the encoded "".

Whether a model inpaints is a fact of its dims (`Dims.inpainting_unet`, a 9-channel UNet) or of the
family (`blend_inpainting`: latent blending with any ordinary UNet, as diffusers does).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from export.specs import SDXL_SPECS, SDXL_TXT2IMG_COMPONENTS, SPECS, TXT2IMG_COMPONENTS, ComponentSpec, Dims

Conditioning = Callable[[dict[str, dict[str, Any]]], dict[str, Any]]
SizeConditioning = Callable[[int, int, int], dict[str, Any]]  # (UNet batch, height px, width px) -> inputs


@dataclass(frozen=True)
class Family:
    name: str
    specs: dict[str, ComponentSpec]  # every component the family can build
    text_encoders: tuple[str, ...]  # components run on token ids, in order
    tokenizers: tuple[str, ...]  # model sub-folder of each text encoder's tokenizer
    conditioning: Conditioning  # text encoder outputs -> UNet conditioning inputs
    pipeline_classes: tuple[str, ...]  # diffusers model_index.json `_class_name`s of this family
    blend_inpainting: bool = True  # an ordinary UNet can inpaint by latent blending
    scheduler_config: str = "scheduler/scheduler_config.json"  # in the model folder and the engine dir
    txt2img_components: tuple[str, ...] = TXT2IMG_COMPONENTS  # what txt2img needs
    size_conditioning: SizeConditioning | None = None  # per-request extra UNet inputs (SDXL: time_ids)
    zero_empty_negative: bool = False  # no negative prompt under CFG: zero unconditional rows (SDXL)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def spec(self, name: str) -> ComponentSpec:
        if name not in self.specs:
            raise ValueError(f"unknown component {name!r} for family {self.name!r}; "
                             f"choose from {', '.join(self.specs)}")
        return self.specs[name]

    def default_components(self, dims: Dims) -> tuple[str, ...]:
        """What `engine.build` builds by default: txt2img, plus the VAE encoder a 9-channel inpainting
        UNet cannot work without."""
        return self.txt2img_components + (("vae_encoder",) if dims.inpainting_unet else ())

    def can_inpaint(self, dims: Dims) -> bool:
        return dims.inpainting_unet or (self.blend_inpainting and dims.unet_in_channels == dims.latent_channels)


def _sd_conditioning(text: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"encoder_hidden_states": text["clip"]["text_embeddings"]}  # [2B, 77, C]


SD = Family(
    name="sd",
    specs=SPECS,
    text_encoders=("clip",),
    tokenizers=("tokenizer",),
    conditioning=_sd_conditioning,
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
)



def _sdxl_conditioning(text: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Both encoders' penultimate hidden states concatenated on the last axis, and clip2's pooled projection,
    as diffusers' StableDiffusionXLPipeline.encode_prompt makes them. `time_ids` come from
    `sdxl_time_ids` (the family's size_conditioning): they depend on the request's size, not the prompt."""
    import torch

    hidden = torch.cat([text["clip"]["text_embeddings"], text["clip2"]["text_embeddings"]], dim=-1)
    return {"encoder_hidden_states": hidden,  # [2B, 77, C1 + C2]
            "text_embeds": text["clip2"]["text_embeds"]}  # [2B, P]


def sdxl_time_ids(batch: int, height: int, width: int, crop_top_left: tuple[int, int] = (0, 0),
                  original_size: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """SDXL's size conditioning, float32 [batch, 6]: original size (h, w), crop top-left (y, x), target size
    (h, w); diffusers' defaults: both sizes are the generated size, no crop, the same for the negative rows."""
    import torch

    row = [*(original_size or (height, width)), *crop_top_left, *(target_size or (height, width))]
    return {"time_ids": torch.tensor([row], dtype=torch.float32).repeat(batch, 1)}


SDXL = Family(
    name="sdxl",
    specs=SDXL_SPECS,
    text_encoders=("clip", "clip2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    conditioning=_sdxl_conditioning,
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                      "StableDiffusionXLInpaintPipeline"),
    txt2img_components=SDXL_TXT2IMG_COMPONENTS,
    size_conditioning=sdxl_time_ids,
    zero_empty_negative=True,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD, SDXL)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; this engine knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(folder: Path) -> Family:
    """The family of a diffusers folder, from its model_index.json pipeline class."""
    index = json.loads((folder / "model_index.json").read_text())
    cls = index.get("_class_name", "")
    for family in FAMILIES.values():
        if cls in family.pipeline_classes:
            return family
    known = ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ValueError(f"{folder}: pipeline class {cls!r} is not supported; supported: {known}")
