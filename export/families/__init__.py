"""Model families, one module each (`sd`, `sdxl`: SDXL base and its refiner, `upscale`: the x4 upscaler, `ldm`: the
Latent Diffusion paper's own models, `ldm_class`: its class-conditional one, `ldm_text`: its text-to-image one,
`ldm_semantic`: its semantic synthesis, `ldm_layout`: its layout-to-image model), and the one registry of them.

What a family is and owns: export/families/base.py. Which family a diffusers folder is: `detect_family`, from its
model_index.json pipeline class (and, for SDXL img2img, `requires_aesthetics_score`: the refiner).
"""
from __future__ import annotations

from pathlib import Path

from export.families.base import Family, LowRes, Roles, read_index
from export.families.ldm import LDM_SR, LDM_UNCOND
from export.families.ldm_class import LDM_CLASS
from export.families.ldm_layout import LDM_LAYOUT
from export.families.ldm_semantic import LDM_SEMANTIC
from export.families.ldm_text import LDM_TEXT, LDM_TEXT_VQ
from export.families.sd import SD
from export.families.sdxl import SDXL, SDXL_REFINER, TimeIds, sdxl_time_ids
from export.families.upscale import UPSCALER

__all__ = ["FAMILIES", "LDM_CLASS", "LDM_LAYOUT", "LDM_SEMANTIC", "LDM_SR", "LDM_TEXT", "LDM_TEXT_VQ", "LDM_UNCOND", "SD", "SDXL", "SDXL_REFINER", "UPSCALER", "Family", "LowRes", "Roles", "TimeIds",
           "detect_family", "get_family", "sdxl_time_ids", "takers"]

FAMILIES: dict[str, Family] = {f.name: f for f in (SD, SDXL, SDXL_REFINER, UPSCALER, LDM_SR, LDM_UNCOND,
                                                                 LDM_CLASS, LDM_TEXT, LDM_TEXT_VQ, LDM_SEMANTIC,
                                                                 LDM_LAYOUT)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; this engine knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def takers(request_field: str) -> tuple[str, ...]:
    """The families that take a family-specific request field."""
    return tuple(f.name for f in FAMILIES.values() if request_field in f.request_fields)


def detect_family(folder: Path) -> Family:
    """The family of a diffusers folder. ValueError for a class no family has, or for a model the family would
    run without one of its parts (a refiner folder that also names a `text_encoder`)."""
    index = read_index(folder)
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
