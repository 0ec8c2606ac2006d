"""The Latent Diffusion paper's semantic synthesis (its landscapes model: `conditioning_key: concat`): a label map,
one class id per pixel, through the original code's spatial rescaler (one-hot over its classes, bilinear x0.5 per
stage, a bias-free 1x1 convolution; export/families/ldm_modules.py) to the latents' size, concatenated to them
before the sampler scales the UNet's input (`UNet2DModel`, in 2C, out C); a VQ autoencoder; DDIM; no text, no
guidance. Convolutional throughout, so any size that is a multiple of the model's step runs, far past the training
size. diffusers has no pipeline for it: the folder is ours, diffusers-shaped (model_index.json class
`LDMSemanticSynthesisPipeline`; unet/, vqvae/, semantic_encoder/, scheduler/).

A request's `semantic_map` (a path, PNG bytes, a PIL image or a 2-D integer array) is a label image: mode L, P (the
palette index is the class) or I; or a colour image with `semantic_palette` (a JSON file's path or the mapping
itself: {"#rrggbb": class id}) saying each colour's class. It must have the request's size (or `resize`: nearest).
Its classes (and colours) are checked before any work.
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import RequestError
from export.families.base import Family, Roles
from export.families.ldm import LDM_MODEL_CLASSES, LDM_WRAPPERS, SCALED_VQ, no_text
from export.specs import LDM_SEMANTIC_SPECS

FIELD = "semantic_map"


@dataclass(frozen=True, eq=False)
class LabelMap:
    """A request's map once loaded and checked: the class ids [H, W] int32 and where they came from (a path, recorded
    with the image; None for an image or array given in memory)."""

    labels: Any
    source: str | None
LABEL_MODES = ("L", "P", "I", "I;16")  # PIL modes whose pixel values are class ids


def read_palette(source: Any) -> dict[int, int]:
    """A colour palette ({"#rrggbb": class id}, or a JSON file of it) as 0xRRGGBB -> class id; ValueError."""
    if isinstance(source, (str, Path)):
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the palette file {str(source)!r}: {exc}") from None
    if not isinstance(source, dict) or not source:
        raise ValueError('a palette maps colours to class ids: {"#rrggbb": id, ...}')
    out = {}
    for colour, label in source.items():
        text = str(colour).removeprefix("#")
        if len(text) != 6 or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise ValueError(f"palette colour {colour!r} is not #rrggbb")
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"palette colour {colour!r}: class {label!r} is not an integer")
        out[int(text, 16)] = label
    return out


def _colour_labels(image: Any, palette: dict[int, int]) -> Any:
    """An RGB image's class ids through the palette; ValueError naming the first colour it does not list."""
    import numpy as np

    rgb = np.asarray(image.convert("RGB")).astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # [H, W] 0xRRGGBB
    colours, inverse = np.unique(codes, return_inverse=True)
    missing = [int(c) for c in colours if int(c) not in palette]
    if missing:
        y, x = (int(v[0]) for v in np.nonzero(codes == missing[0]))
        raise ValueError(f"colour #{missing[0]:06x} at (x {x}, y {y}) is not in the palette")
    return np.array([palette[int(c)] for c in colours], np.int64)[inverse.reshape(codes.shape)]


def load_labels(source: Any, n_classes: int, height: int, width: int, resize: bool,
                palette: dict[int, int] | None = None) -> Any:
    """The label map as int32 [height, width]; ValueError saying what is wrong (not a label image, its size, a class
    past the model's, a colour the palette lacks)."""
    import numpy as np
    import PIL.Image

    if isinstance(source, np.ndarray):
        if source.ndim != 2 or source.dtype.kind not in "iu":
            raise ValueError(f"a semantic map array must be 2-D integers (class ids), not {source.dtype} "
                             f"{list(source.shape)}")
        image = PIL.Image.fromarray(source.astype(np.int32), mode="I")
    else:
        if isinstance(source, (str, Path)):
            image = PIL.Image.open(source)
        elif isinstance(source, bytes):
            image = PIL.Image.open(io.BytesIO(source))
        elif isinstance(source, PIL.Image.Image):
            image = source
        else:
            raise ValueError(f"a semantic map is a path, PNG bytes, a PIL image or an array, not {type(source).__name__}")
        if image.mode not in LABEL_MODES and palette is None:
            raise ValueError(f"a semantic map is a label image (one class id per pixel: mode {', '.join(LABEL_MODES)}), "
                             f"not a mode {image.mode} image; or give a palette of its colours (semantic_palette)")
    if image.size != (width, height):
        if not resize:
            raise ValueError(f"the semantic map is {image.width}x{image.height}, the request {width}x{height}: give "
                             "its size as height and width, or resize (nearest)")
        image = image.resize((width, height), PIL.Image.Resampling.NEAREST)
    labels = (_colour_labels(image, palette) if palette is not None else np.asarray(image)).astype(np.int32)
    if labels.min() < 0 or labels.max() >= n_classes:
        bad = int(labels.max() if labels.max() >= n_classes else labels.min())
        y, x = (int(v[0]) for v in np.nonzero(labels == bad))
        raise ValueError(f"class {bad} at (x {x}, y {y}) is not one of the model's {n_classes} classes "
                         f"(0..{n_classes - 1})")
    return labels


def _defaults(r: Any, dims: Any) -> dict[str, Any]:
    """The map loaded and checked (RequestError naming semantic_map); no guidance (the model has none)."""
    if isinstance(r.semantic_map, LabelMap):  # loaded already (a request prepared again)
        return {"guidance_scale": 1.0}
    if r.semantic_map is None:
        raise RequestError(FIELD, "a semantic synthesis model needs a semantic map (a label image: one class id per "
                                  "pixel)")
    try:
        palette = None if r.semantic_palette is None else read_palette(r.semantic_palette)
    except ValueError as exc:
        raise RequestError("semantic_palette", f"semantic_palette: {exc}") from None
    try:
        labels = load_labels(r.semantic_map, dims.n_classes, r.height, r.width, r.resize, palette)
    except (ValueError, OSError) as exc:  # OSError: PIL cannot read the file
        raise RequestError(FIELD, f"semantic_map: {exc}") from None
    source = str(r.semantic_map) if isinstance(r.semantic_map, (str, Path)) else None
    return {FIELD: LabelMap(labels, source), "guidance_scale": 1.0}


def labels_input(rows: Sequence[Any], cfg: bool) -> dict[str, Any]:
    """The semantic encoder's input: each row's label map [B, 1, H, W] int32."""
    import numpy as np
    import torch

    return {"labels": torch.from_numpy(np.stack([row.request.semantic_map.labels for row in rows])[:, None])}


def _dims(folder: Path, unet: dict, texts: list[dict]) -> dict[str, int]:
    config = json.loads((folder / "semantic_encoder" / "config.json").read_text())
    return {"n_classes": int(config["in_channels"])}


def _warmup(height: int, width: int) -> dict[str, Any]:
    import numpy as np

    return {FIELD: np.zeros((height, width), np.int32)}


LDM_SEMANTIC = Family(
    name="ldm-semantic",
    specs=LDM_SEMANTIC_SPECS,
    roles=Roles(text_encoders=(), map_encoder="semantic_encoder"),
    tokenizers=(),
    pipeline_classes=("LDMSemanticSynthesisPipeline",),
    wrappers={**LDM_WRAPPERS, **SCALED_VQ, "semantic_encoder": "export.families.ldm_wrappers:SemanticEncoderWrapper"},
    model_classes={**LDM_MODEL_CLASSES, "semantic_encoder": ("export.families.ldm_modules", "SpatialRescaler")},
    conditioning=no_text,
    request_conditioning=labels_input,
    request_fields=(FIELD, "semantic_palette"),
    request_defaults=_defaults,
    added_dims=_dims,
    blend_inpainting=False,
    txt2img_components=("semantic_encoder", "unet", "vae_decoder"),
    warmup_fields=_warmup,
    reseed_step_noise=True,
)
