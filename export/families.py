"""Model families: which components a model has and how prompts become UNet conditioning.

A family is data plus one small function, so a new family (SDXL: two text encoders, pooled
embeddings, time ids) is an added entry, never an `if family == ...` in the pipeline:

- `components`: the family's component specs (the registry in export/specs.py);
- `text_encoders` / `tokenizers`: the components run on token ids and the model sub-folder of the
  tokenizer that feeds each one;
- `conditioning(text)`: the text encoders' outputs ({component: {tensor name: tensor}}) -> the extra
  UNet inputs, passed on as `**cond` by the denoise step.

SDXL's UNet also takes `time_ids` [2B, time_ids], which depend on the request (image size and crop), not
on the prompt: `conditioning` gives `encoder_hidden_states` and `text_embeds` only, and the pipeline adds
`time_ids` from the family's `size_conditioning(rows, cfg)` (None for SD), one `TimeIds` per image, so
both stay pure functions of what they are given.

`sdxl-refiner` is SDXL's img2img-only refiner (a StableDiffusionXLImg2ImgPipeline folder with
`requires_aesthetics_score`): `clip2` only (no `text_encoder`), and 5 time ids: original size, crop
top-left, aesthetic score (the unconditional rows: the negative aesthetic score and crop (0, 0), as
diffusers' `negative_crops_coords_top_left` default). `zero_empty_negative` is diffusers' SDXL `force_zeros_for_empty_prompt`:
with guidance and no negative prompt, the unconditional rows are zeros instead of the encoded "".

Whether a model inpaints is a fact of its dims (`Dims.inpainting_unet`, a 9-channel UNet) or of the
family (`blend_inpainting`: latent blending with any ordinary UNet, as diffusers does).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from export.specs import SDXL_SPECS, SDXL_TXT2IMG_COMPONENTS, SPECS, TXT2IMG_COMPONENTS, ComponentSpec, Dims

Conditioning = Callable[[dict[str, dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class TimeIds:
    """One image's SDXL size conditioning, in pixels, every default already filled in."""

    original_size: tuple[int, int]  # (height, width)
    crop: tuple[int, int]  # top-left (y, x)
    target_size: tuple[int, int]  # (height, width)
    aesthetic_score: float = 0.0  # refiner only
    negative_aesthetic_score: float = 0.0  # refiner only


SizeConditioning = Callable[[list[TimeIds], bool], dict[str, Any]]  # (one per image, CFG on) -> UNet inputs


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
    time_ids: int = 0  # width of the UNet's `time_ids` input (SDXL 6, the refiner 5)
    zero_empty_negative: bool = False  # no negative prompt under CFG: zero unconditional rows (SDXL)
    aesthetic_scores: tuple[float, float] | None = None  # (positive, negative) defaults: an aesthetic-score model
    txt2img: bool = True  # False: img2img only (the SDXL refiner)
    default_strength: tuple[float, float] = (0.8, 1.0)  # (img2img, inpaint) when a request gives none: diffusers'
    upcast_vae: bool = False  # fp16 builds keep the VAE in fp32 when its config says force_upcast (SDXL's overflows)

    @property
    def aesthetic(self) -> bool:
        """A model whose time ids end with an aesthetic score (diffusers' `requires_aesthetics_score`)."""
        return self.aesthetic_scores is not None

    def matches(self, index: dict) -> bool:
        """Whether a diffusers model_index.json describes a model of this family."""
        return (index.get("_class_name", "") in self.pipeline_classes
                and bool(index.get("requires_aesthetics_score", False)) == self.aesthetic)

    def model_folders(self) -> tuple[str, ...]:
        """The sub-folders a diffusers folder of this family must have (weights, tokenizers, scheduler)."""
        subs = [s.model_folder for s in self.specs.values()] + list(self.tokenizers)
        return tuple(dict.fromkeys(subs + [self.scheduler_config.split("/")[0]]))

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def spec(self, name: str) -> ComponentSpec:
        if name not in self.specs:
            raise ValueError(f"unknown component {name!r} for family {self.name!r}; "
                             f"choose from {', '.join(self.specs)}")
        return self.specs[name]

    def default_components(self, dims: Dims) -> tuple[str, ...]:
        """What `engine.build` builds by default: txt2img, plus the VAE encoder that a 9-channel inpainting
        UNet or an img2img-only model cannot work without."""
        needs_encoder = dims.inpainting_unet or not self.txt2img
        return self.txt2img_components + (("vae_encoder",) if needs_encoder else ())

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
    """The text encoders' penultimate hidden states concatenated on the last axis (in the family's
    `text_encoders` order: clip, clip2; the refiner has clip2 only), and clip2's pooled projection, as
    diffusers' StableDiffusionXLPipeline.encode_prompt makes them. `time_ids` come from the family's
    size_conditioning: they depend on the request's size, not the prompt."""
    import torch

    hidden = torch.cat([out["text_embeddings"] for out in text.values()], dim=-1)
    return {"encoder_hidden_states": hidden,  # [2B, 77, C1 + C2] (refiner: [2B, 77, C2])
            "text_embeds": text["clip2"]["text_embeds"]}  # [2B, P]


def _time_id_rows(rows: list[list[float]], negative: list[list[float]] | None) -> dict[str, Any]:
    import torch

    return {"time_ids": torch.tensor((negative or []) + rows, dtype=torch.float32)}


def _sdxl_size_conditioning(rows: list[TimeIds], cfg: bool) -> dict[str, Any]:
    """float32 [B or 2B, 6]: original size (h, w), crop top-left (y, x), target size (h, w); the unconditional
    rows are the same (diffusers, when no negative sizes are given)."""
    ids = [[*t.original_size, *t.crop, *t.target_size] for t in rows]
    return _time_id_rows(ids, ids if cfg else None)


def _refiner_size_conditioning(rows: list[TimeIds], cfg: bool) -> dict[str, Any]:
    """float32 [B or 2B, 5]: original size (h, w), crop top-left (y, x), aesthetic score; the unconditional
    rows take the negative aesthetic score and crop (0, 0), as diffusers' refiner defaults do."""
    ids = [[*t.original_size, *t.crop, t.aesthetic_score] for t in rows]
    neg = [[*t.original_size, 0, 0, t.negative_aesthetic_score] for t in rows]
    return _time_id_rows(ids, neg if cfg else None)


def sdxl_time_ids(batch: int, height: int, width: int, crop_top_left: tuple[int, int] = (0, 0),
                  original_size: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """SDXL's size conditioning of `batch` identical rows, float32 [batch, 6]; diffusers' defaults: both sizes
    are the generated size, no crop."""
    row = TimeIds(original_size or (height, width), crop_top_left, target_size or (height, width))
    return _sdxl_size_conditioning([row] * batch, cfg=False)


SDXL = Family(
    name="sdxl",
    specs=SDXL_SPECS,
    text_encoders=("clip", "clip2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    conditioning=_sdxl_conditioning,
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                      "StableDiffusionXLInpaintPipeline"),
    txt2img_components=SDXL_TXT2IMG_COMPONENTS,
    size_conditioning=_sdxl_size_conditioning,
    time_ids=6,
    zero_empty_negative=True,
    default_strength=(0.3, 0.9999),  # StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline
    upcast_vae=True,  # diffusers' SDXL pipelines run a force_upcast VAE in fp32; the fp16-fix VAE says false
)

SDXL_REFINER = replace(  # SDXL without the first text encoder, aesthetic score instead of target size
    SDXL,
    name="sdxl-refiner",
    specs={k: v for k, v in SDXL_SPECS.items() if k != "clip"},
    text_encoders=SDXL.text_encoders[1:],
    tokenizers=SDXL.tokenizers[1:],
    pipeline_classes=("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    txt2img_components=SDXL_TXT2IMG_COMPONENTS[1:],
    size_conditioning=_refiner_size_conditioning,
    time_ids=5,
    zero_empty_negative=False,  # the refiner's force_zeros_for_empty_prompt
    aesthetic_scores=(6.0, 2.5),  # diffusers' aesthetic_score / negative_aesthetic_score defaults
    txt2img=False,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD, SDXL, SDXL_REFINER)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; this engine knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(folder: Path) -> Family:
    """The family of a diffusers folder, from its model_index.json pipeline class (and, for SDXL img2img,
    `requires_aesthetics_score`: the refiner). ValueError for a class no family has, or for a model the
    family would run without one of its parts (a refiner folder that also names a `text_encoder`)."""
    index = json.loads((folder / "model_index.json").read_text())
    family = next((f for f in FAMILIES.values() if f.matches(index)), None)
    if family is None:
        cls = index.get("_class_name", "")
        aesthetic = " with requires_aesthetics_score" if index.get("requires_aesthetics_score") else ""
        known = "; ".join(f"{f.name}: {', '.join(f.pipeline_classes)}" + (" with requires_aesthetics_score"
                                                                          if f.aesthetic else "")
                          for f in FAMILIES.values())
        raise ValueError(f"{folder}: pipeline class {cls!r}{aesthetic} is not supported; supported: {known}")
    every = {s.model_folder for f in FAMILIES.values() for s in f.specs.values()}
    unused = sorted(sub for sub in every - set(family.model_folders()) if (index.get(sub) or [None])[0])
    if unused:
        raise ValueError(f"{folder}: a {family.name} model has no {', '.join(unused)}, but model_index.json "
                         f"names it; expected {', '.join(family.model_folders())}")
    return family
