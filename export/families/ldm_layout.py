"""The Latent Diffusion paper's layout-to-image model (its OpenImages model): a layout (objects, each a label and a
box) as 92 tokens through a BERT-style transformer (LDMBert's encoder without a tokenizer, export/families/
ldm_wrappers.py `LayoutEncoderWrapper`) into the UNet's cross-attention (`UNet2DConditionModel`); a VQ autoencoder;
DDIM; no text, no guidance. diffusers has no pipeline for it: the folder is ours, diffusers-shaped (model_index.json
class `LDMLayoutToImagePipeline`; unet/, vqvae/, scheduler/, layout_encoder/ with `labels.json`, the label names in
class-id order).

The tokens, as the original's conditional builder makes them: each object -> (its label's class id, the token of
its box's top-left corner, the token of its bottom-right corner); a corner (x, y) in fractions of the image ->
round(y (S - 1)) S + round(x (S - 1)) with S = floor(sqrt(8192)) = 90 (Python's round: halves to even); objects
padded to 30 with the "none" token 8191 (three per missing object); then the crop's two corner tokens (the whole
image: 0 and 8099): 30 x 3 + 2 = 92. No layout is the empty one (30 "none" objects).

A request's `layout` is a JSON file's path or the list itself: `[{"label": "dog" or a class id, "box": [x0, y0, x1,
y1]}]`, in fractions of the image when every coordinate is within [0, 1], else in pixels.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import RequestError
from export.families.base import Family, Roles
from export.families.ldm import LDM_MODEL_CLASSES, SCALED_VQ, no_guidance, no_text
from export.specs import LDM_LAYOUT_SPECS

FIELD = "layout"
VOCABULARY = 8192  # the transformer's tokens
GRID = math.isqrt(VOCABULARY)  # 90 corner positions per side
NONE_TOKEN = VOCABULARY - 1  # a missing object's three tokens
MAX_OBJECTS = 30
TOKENS = 3 * MAX_OBJECTS + 2  # 92: the objects, then the crop's corners
LABELS_FILE = "layout_encoder/labels.json"


def corner_token(x: float, y: float) -> int:
    """The token of a corner at (x, y), fractions of the image."""
    return round(y * (GRID - 1)) * GRID + round(x * (GRID - 1))


@dataclass(frozen=True, eq=False)
class LayoutTokens:
    """A request's layout once read and checked: its 92 tokens, and the file it came from (recorded with the image)."""

    tokens: tuple[int, ...]
    source: str | None


def read_layout(source: Any) -> list:
    """The objects of a layout given as a JSON file's path or as the list; ValueError for anything else."""
    if isinstance(source, (str, Path)):
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the layout file {str(source)!r}: {exc}") from None
    if not isinstance(source, (list, tuple)):
        raise ValueError(f"a layout is a list of objects ({{\"label\": ..., \"box\": [x0, y0, x1, y1]}}), not "
                         f"{type(source).__name__}")
    return list(source)


def layout_tokens(objects: Sequence[Any], labels: Sequence[str], height: int, width: int) -> tuple[int, ...]:
    """The 92 tokens of a layout; ValueError naming the object and what is wrong with it."""
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"the layout has {len(objects)} objects; the model takes at most {MAX_OBJECTS}")
    boxes = []
    for i, o in enumerate(objects):
        if not isinstance(o, dict) or set(o) != {"label", "box"}:
            raise ValueError(f"object {i} must be {{\"label\": ..., \"box\": [x0, y0, x1, y1]}}, not {o!r}")
        box = o["box"]
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise ValueError(f"object {i}: box {box!r} must be four numbers [x0, y0, x1, y1]")
        boxes.append((_label_id(i, o["label"], labels), [float(v) for v in box]))
    fractions = all(0 <= v <= 1 for _, box in boxes for v in box)
    tokens: list[int] = []
    for i, (label, box) in enumerate(boxes):
        x0, y0, x1, y1 = box if fractions else (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            unit = "fractions" if fractions else "pixels"
            raise ValueError(f"object {i}: box {[_num(v) for v in box]} ({unit}) is not inside the {width}x{height} "
                             "image with x0 < x1 and y0 < y1")
        tokens += [label, corner_token(x0, y0), corner_token(x1, y1)]
    tokens += [NONE_TOKEN] * 3 * (MAX_OBJECTS - len(boxes))
    return (*tokens, corner_token(0, 0), corner_token(1, 1))  # the crop: the whole image


def _label_id(i: int, label: Any, labels: Sequence[str]) -> int:
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(labels):
            raise ValueError(f"object {i}: label id {label} is not one of the model's {len(labels)} (0..{len(labels) - 1})")
        return label
    if isinstance(label, str) and label in labels:
        return labels.index(label)
    some = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
    raise ValueError(f"object {i}: unknown label {label!r}; the model's labels: {some} (or a class id)")


def _num(v: float) -> int | float:
    return int(v) if v == int(v) else v


def _defaults(r: Any, dims: Any) -> dict[str, Any]:
    """The layout read into its tokens (RequestError naming `layout`); no guidance."""
    if isinstance(r.layout, LayoutTokens):  # read already (a request prepared again)
        return no_guidance(r, dims)
    try:
        tokens = layout_tokens(read_layout([] if r.layout is None else r.layout), dims.labels, r.height, r.width)
    except ValueError as exc:
        raise RequestError(FIELD, f"layout: {exc}") from None
    source = str(r.layout) if isinstance(r.layout, (str, Path)) else None
    return {FIELD: LayoutTokens(tokens, source), **no_guidance(r, dims)}


def tokens_input(rows: Sequence[Any], cfg: bool) -> dict[str, Any]:
    """The layout encoder's input: each row's tokens [B, 92] int32."""
    import torch

    return {"layout_tokens": torch.tensor([row.request.layout.tokens for row in rows], dtype=torch.int32)}


def _dims(folder: Path, unet: dict, texts: list[dict]) -> dict[str, Any]:
    labels = json.loads((folder / LABELS_FILE).read_text())
    config = json.loads((folder / "layout_encoder" / "config.json").read_text())
    return {"labels": tuple(labels), "n_classes": len(labels), "text_dim": int(config["d_model"]), "text_len": TOKENS}


LDM_LAYOUT = Family(
    name="ldm-layout",
    specs=LDM_LAYOUT_SPECS,
    roles=Roles(text_encoders=(), context_encoder="layout_encoder"),
    tokenizers=(),
    pipeline_classes=("LDMLayoutToImagePipeline",),
    wrappers={"layout_encoder": "export.families.ldm_wrappers:LayoutEncoderWrapper",
              "unet": "export.families.sd_wrappers:UNetWrapper", **SCALED_VQ},
    model_classes={**LDM_MODEL_CLASSES, "unet": ("diffusers", "UNet2DConditionModel"),
                   "layout_encoder": ("diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion", "LDMBertModel")},
    conditioning=no_text,
    request_conditioning=tokens_input,
    request_fields=(FIELD,),
    request_defaults=_defaults,
    added_dims=_dims,
    blend_inpainting=False,
    txt2img_components=("layout_encoder", "unet", "vae_decoder"),
    reseed_step_noise=True,
)
