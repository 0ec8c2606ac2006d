"""Which request kinds (txt2img, img2img, inpaint) a session's model takes: RequestError naming the field when it
takes not this one, checked before any work (engine/pipeline.py's prepare)."""
from __future__ import annotations

from pathlib import Path

from engine.request import Request, RequestError
from export.families import Family
from export.specs import Dims


def check_kind(r: Request, family: Family, dims: Dims, has_encoder: bool, model: str | None, model_dir: Path) -> None:
    """An img2img-only model (the SDXL refiner, the x4 upscaler) needs an init image; img2img and inpainting need
    the latent encoder (not the upscaler: its image is a condition, not encoded); inpainting needs a UNet that can
    (9 channels, or 4 that blend latents), and a 9-channel inpainting UNet takes nothing else."""
    if r.kind == "txt2img" and not family.txt2img:
        raise RequestError("init_image", f"model {model!r} ({family.name}) is img2img only: give an init image")
    if r.kind != "txt2img" and not has_encoder and family.low_res is None:
        encoder = family.roles.latent_encoder
        wanted = ",".join(dict.fromkeys(family.default_components(dims) + (encoder,)))
        raise RequestError("init_image", f"{r.kind} needs the {encoder} engine, which {model_dir} lacks: rebuild with "
                                         f"python -m engine.build --model {model} --engine-dir {model_dir.parent} "
                                         f"--components {wanted}")
    if r.kind == "inpaint" and not family.can_inpaint(dims):
        raise RequestError("mask", f"model {model!r} cannot inpaint: its UNet takes {dims.unet_in_channels} channels "
                                   "(4 blends latents, 9 is an inpainting UNet)")
    if dims.inpainting_unet and r.kind != "inpaint":
        raise RequestError("mask", f"model {model!r} is an inpainting model (9-channel UNet): give an init image and "
                                   "a mask")


def takes(family: Family, dims: Dims, has_encoder: bool) -> dict:
    """What a model takes (the server's /v1/info): a prompt or none, the request kinds, its family's own request
    fields, and a class-conditional model's classes (labels 0..n-1, the last the unconditional class)."""
    if dims.inpainting_unet:
        kinds = ["inpaint"]
    else:
        kinds = [kind for kind, ok in (("txt2img", family.txt2img),
                                       ("img2img", has_encoder or family.low_res is not None),
                                       ("inpaint", has_encoder and family.can_inpaint(dims))) if ok]
    out = {"prompt": bool(family.roles.text_encoders), "kinds": kinds, "fields": list(family.request_fields)}
    return out | ({"classes": dims.n_classes} if dims.n_classes else {})
