"""Model families: which components a model has and how prompts become UNet conditioning.

A family is data plus one small function, so a new family (SDXL: two text encoders, pooled
embeddings, time ids) is an added entry, never an `if family == ...` in the pipeline:

- `components`: the family's component specs (the registry in export/specs.py);
- `text_encoders` / `tokenizers`: the components run on token ids and the model sub-folder of the
  tokenizer that feeds each one;
- `conditioning(text)`: the text encoders' outputs ({component: {tensor name: tensor}}) -> the extra
  UNet inputs, passed on as `**cond` by the denoise step.

Whether a model inpaints is a fact of its dims (`Dims.inpainting_unet`, a 9-channel UNet) or of the
family (`blend_inpainting`: latent blending with any ordinary UNet, as diffusers does).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from export.specs import SPECS, TXT2IMG_COMPONENTS, ComponentSpec, Dims

Conditioning = Callable[[dict[str, dict[str, Any]]], dict[str, Any]]


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
        return TXT2IMG_COMPONENTS + (("vae_encoder",) if dims.inpainting_unet else ())

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

FAMILIES: dict[str, Family] = {f.name: f for f in (SD,)}


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
