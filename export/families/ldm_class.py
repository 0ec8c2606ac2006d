"""The Latent Diffusion paper's class-conditional model (its ImageNet LDM, `cin256`): a class embedding table (the
original code's `ClassEmbedder`, export/families/ldm_modules.py) gives the UNet (`UNet2DConditionModel`) one
cross-attention context token per image; a VQ autoencoder; DDIM. diffusers has no pipeline for it: the folder is ours,
diffusers-shaped (model_index.json class `LDMClassConditionalPipeline`; unet/, vqvae/, class_embedder/, scheduler/).

A request's "prompt" is its `class_label` (0..n_classes-1; the table's last row is the unconditional class, which
classifier-free guidance runs against, as the original's `get_unconditional_conditioning`; no label = that class).
The class ids reach the `class_embedder` component (the family's context encoder) with -1 for the unconditional rows.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export.errors import RequestError
from export.families.base import Family, Roles
from export.families.ldm import SCALED_VQ, no_text
from export.specs import LDM_CLASS_SPECS

UNCONDITIONAL = -1  # the class id of a guidance row: the embedder reads its table's last row
_W = "export.families.ldm_wrappers"


def _defaults(r: Any, dims: Any) -> dict[str, Any]:
    """The class label filled in (none: the unconditional class); RequestError for one outside the table."""
    top = dims.n_classes - 1
    label = top if r.class_label is None else r.class_label
    if not 0 <= label <= top:
        raise RequestError("class_label", f"class_label {label} is outside 0..{top} for this model ({top}: the "
                                          "unconditional class, the same as none)")
    return {"class_label": label}


def class_ids(rows: Sequence[Any], cfg: bool) -> dict[str, Any]:
    """The class embedder's input: each row's class, after the unconditional rows under guidance: [2B] int32."""
    import torch

    ids = [row.request.class_label for row in rows]
    return {"class_ids": torch.tensor(([UNCONDITIONAL] * len(ids) if cfg else []) + ids, dtype=torch.int32)}


def _dims(folder: Path, unet: dict, texts: list[dict]) -> dict[str, int]:
    """The class table's rows and width: the UNet's context is one token of it."""
    config = json.loads((folder / "class_embedder" / "config.json").read_text())
    return {"n_classes": int(config["n_classes"]), "text_dim": int(config["embed_dim"]), "text_len": 1}


LDM_CLASS = Family(
    name="ldm-class",
    specs=LDM_CLASS_SPECS,
    roles=Roles(text_encoders=(), context_encoder="class_embedder"),
    tokenizers=(),
    pipeline_classes=("LDMClassConditionalPipeline",),
    wrappers={"class_embedder": f"{_W}:ClassEmbedderWrapper", "unet": "export.families.sd_wrappers:UNetWrapper",
              **SCALED_VQ},
    model_classes={"unet": ("diffusers", "UNet2DConditionModel"), "vqvae": ("diffusers", "VQModel"),
                   "class_embedder": ("export.families.ldm_modules", "ClassEmbedder")},
    conditioning=no_text,
    request_conditioning=class_ids,
    request_fields=("class_label",),
    request_defaults=_defaults,
    added_dims=_dims,
    blend_inpainting=False,
    txt2img_components=("class_embedder", "unet", "vae_decoder"),
    reseed_step_noise=True,
)
