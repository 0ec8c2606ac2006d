"""SDXL base and refiner: two text encoders (the refiner has the second only), pooled text embeddings and
size conditioning ("time ids") as extra UNet inputs, the KL autoencoder of SD.

- `clip` returns the penultimate hidden state, `clip2` its penultimate hidden state and pooled projection; the
  UNet takes both hidden states concatenated on the last axis, `text_embeds` and `time_ids` (export/specs.py).
- time ids, float32, one row per image: original size (h, w), crop top-left (y, x), target size (h, w) for the
  base; original size, crop, aesthetic score for the refiner. Under guidance the unconditional rows repeat the
  base's ids, and take the negative aesthetic score and crop (0, 0) for the refiner (diffusers' defaults).
- The request fields behind them (`original_size`, `crop`, `target_size`; the refiner's `aesthetic_score` and
  `negative_aesthetic_score` instead of `target_size`) default to diffusers': both sizes the generated size,
  crop (0, 0), aesthetic scores 6.0 / 2.5.
- `force_zeros_for_empty_prompt` (base only): with guidance and no negative prompt, the unconditional rows are
  zeros instead of the encoded "".
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from export.errors import RequestError
from export.families.base import Family, Outputs, Roles
from export.families.sd import SD_MODEL_CLASSES, VAE_WRAPPERS
from export.specs import SDXL_SPECS, SDXL_TXT2IMG_COMPONENTS

BASE_TIME_IDS = 6  # original size, crop top-left, target size
REFINER_TIME_IDS = 5  # original size, crop top-left, aesthetic score
AESTHETIC_SCORES = (6.0, 2.5)  # diffusers' aesthetic_score / negative_aesthetic_score defaults (the refiner)

_W = "export.families.sdxl_wrappers"  # torch modules, imported when export needs them


@dataclass(frozen=True)
class TimeIds:
    """One image's SDXL size conditioning, in pixels, every default already filled in."""

    original_size: tuple[int, int]  # (height, width)
    crop: tuple[int, int]  # top-left (y, x)
    target_size: tuple[int, int]  # (height, width)
    aesthetic_score: float = 0.0  # refiner only
    negative_aesthetic_score: float = 0.0  # refiner only


# ---- conditioning ----


def sdxl_conditioning(text: Outputs) -> dict[str, Any]:
    """The text encoders' penultimate hidden states concatenated on the last axis (clip, clip2; the refiner has
    clip2 only), and clip2's pooled projection, as diffusers' StableDiffusionXLPipeline.encode_prompt makes them."""
    import torch

    hidden = torch.cat([out["text_embeddings"] for out in text.values()], dim=-1)
    return {"encoder_hidden_states": hidden,  # [2B, 77, C1 + C2] (refiner: [2B, 77, C2])
            "text_embeds": text["clip2"]["text_embeds"]}  # [2B, P]


def time_ids_of(r: Any) -> TimeIds:
    """The size conditioning of a resolved request (its family fields filled in; the ones it lacks: 0)."""
    return TimeIds(tuple(r.original_size), tuple(r.crop), tuple(r.target_size or (0, 0)), r.aesthetic_score or 0.0,
                   r.negative_aesthetic_score or 0.0)


def _time_id_rows(rows: list[list[float]], negative: list[list[float]] | None) -> dict[str, Any]:
    import torch

    return {"time_ids": torch.tensor((negative or []) + rows, dtype=torch.float32)}


def base_time_ids(rows: Sequence[TimeIds], cfg: bool) -> dict[str, Any]:
    """float32 [B or 2B, 6]: original size (h, w), crop top-left (y, x), target size (h, w); the unconditional
    rows are the same (diffusers, when no negative sizes are given)."""
    ids = [[*t.original_size, *t.crop, *t.target_size] for t in rows]
    return _time_id_rows(ids, ids if cfg else None)


def refiner_time_ids(rows: Sequence[TimeIds], cfg: bool) -> dict[str, Any]:
    """float32 [B or 2B, 5]: original size (h, w), crop top-left (y, x), aesthetic score; the unconditional rows
    take the negative aesthetic score and crop (0, 0), as diffusers' refiner defaults do."""
    ids = [[*t.original_size, *t.crop, t.aesthetic_score] for t in rows]
    neg = [[*t.original_size, 0, 0, t.negative_aesthetic_score] for t in rows]
    return _time_id_rows(ids, neg if cfg else None)


def sdxl_time_ids(batch: int, height: int, width: int, crop_top_left: tuple[int, int] = (0, 0),
                  original_size: tuple[int, int] | None = None, target_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """SDXL's size conditioning of `batch` identical rows, float32 [batch, 6]; diffusers' defaults: both sizes
    are the generated size, no crop."""
    row = TimeIds(original_size or (height, width), crop_top_left, target_size or (height, width))
    return base_time_ids([row] * batch, cfg=False)


def _base_request_conditioning(rows: Sequence[Any], cfg: bool) -> dict[str, Any]:
    return base_time_ids([time_ids_of(row.request) for row in rows], cfg)


def _refiner_request_conditioning(rows: Sequence[Any], cfg: bool) -> dict[str, Any]:
    return refiner_time_ids([time_ids_of(row.request) for row in rows], cfg)


# ---- request fields ----


def _sizes(r: Any) -> dict[str, Any]:
    """original_size and crop of a request whose height and width are known; RequestError for a crop outside."""
    original = tuple(r.original_size or (r.height, r.width))
    crop = tuple(r.crop or (0, 0))
    if not (crop[0] < original[0] and crop[1] < original[1]):
        shown = " ".join(map(str, crop)), " ".join(map(str, original))
        raise RequestError("crop", f"crop {shown[0]} is outside original_size {shown[1]}: top must be < "
                                   f"{original[0]} and left < {original[1]}")
    return dict(original_size=original, crop=crop)


def _base_defaults(r: Any, dims: Any) -> dict[str, Any]:
    return {**_sizes(r), "target_size": tuple(r.target_size or (r.height, r.width))}


def _refiner_defaults(r: Any, dims: Any) -> dict[str, Any]:
    positive, negative = AESTHETIC_SCORES
    return {**_sizes(r), "aesthetic_score": positive if r.aesthetic_score is None else r.aesthetic_score,
            "negative_aesthetic_score": negative if r.negative_aesthetic_score is None else r.negative_aesthetic_score}


# ---- dims ----


def _added_dims(time_ids: int):
    def added(folder: Path, unet: dict, texts: list[dict]) -> dict[str, int]:
        """The last text encoder is clip2, with the pooled projection; the UNet's text_time embedding must take
        `time_ids` ids."""
        pooled = int(texts[-1]["projection_dim"])
        found, rest = divmod(int(unet["projection_class_embeddings_input_dim"]) - pooled,
                             int(unet["addition_time_embed_dim"]))
        if rest or unet.get("addition_embed_type") != "text_time" or found != time_ids:
            raise ValueError(f"{folder}: the UNet's added conditioning is not the text_time embedding with "
                             f"{time_ids} time ids ({unet.get('addition_embed_type')!r}, "
                             f"projection_class_embeddings_input_dim {unet['projection_class_embeddings_input_dim']})")
        return dict(text2_dim=texts[-1]["hidden_size"], pooled_dim=pooled, time_ids=time_ids)

    return added


SDXL = Family(
    name="sdxl",
    specs=SDXL_SPECS,
    roles=Roles(text_encoders=("clip", "clip2")),
    tokenizers=("tokenizer", "tokenizer_2"),
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                      "StableDiffusionXLInpaintPipeline"),
    wrappers={"clip": f"{_W}:XLClipWrapper", "clip2": f"{_W}:XLClip2Wrapper", "unet": f"{_W}:XLUNetWrapper",
              **VAE_WRAPPERS},
    model_classes={**SD_MODEL_CLASSES, "text_encoder_2": ("transformers", "CLIPTextModelWithProjection")},
    conditioning=sdxl_conditioning,
    request_conditioning=_base_request_conditioning,
    request_fields=("original_size", "crop", "target_size"),
    request_defaults=_base_defaults,
    added_dims=_added_dims(BASE_TIME_IDS),
    index_flags={"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
    single_file_text={"text_encoder": ("clip", "conditioner.embedders.0.transformer."),
                      "text_encoder_2": ("open_clip", "conditioner.embedders.1.model.")},
    txt2img_components=SDXL_TXT2IMG_COMPONENTS,
    default_strength=(0.3, 0.9999),  # StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline
    upcast_vae=True,  # diffusers' SDXL pipelines run a force_upcast VAE in fp32; the fp16-fix VAE says false
    embedding_keys={"clip": "clip_l", "clip2": "clip_g"},  # A1111's SDXL embeddings
)

SDXL_REFINER = replace(  # SDXL without the first text encoder, aesthetic score instead of target size
    SDXL,
    name="sdxl-refiner",
    specs={k: v for k, v in SDXL_SPECS.items() if k != "clip"},
    roles=Roles(text_encoders=("clip2",)),
    tokenizers=SDXL.tokenizers[1:],
    pipeline_classes=("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    wrappers={k: v for k, v in SDXL.wrappers.items() if k != "clip"},
    model_classes={k: v for k, v in SDXL.model_classes.items() if k != "text_encoder"},
    request_conditioning=_refiner_request_conditioning,
    request_fields=("original_size", "crop", "aesthetic_score", "negative_aesthetic_score"),
    request_defaults=_refiner_defaults,
    added_dims=_added_dims(REFINER_TIME_IDS),
    index_flags={"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
    single_file_text={"text_encoder_2": ("open_clip", "conditioner.embedders.0.model.")},
    txt2img_components=SDXL_TXT2IMG_COMPONENTS[1:],
    txt2img=False,
    embedding_keys={"clip2": "clip_g"},
)
