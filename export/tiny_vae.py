"""A tiny decoder (diffusers' `AutoencoderTiny`: TAESD for SD 1.x/2.x, TAESDXL for SDXL) as a component.

`engine.build --tiny-vae DIR` adds the folder (an `AutoencoderTiny` config and weights) to a model as sub-folder
`tiny_vae`, built as component `tiny_vae_decoder` with the VAE decoder's conventions (latents as the sampler sees
them [B, C, h, w] -> images [B, 3, H, W] in [-1, 1]; AutoencoderTiny's scaling factor 1.0 inside, as diffusers'
pipelines divide by it). It plays the family role `preview_decoder`: live previews every K steps, and the final
images of a request that asks for `decoder: "tiny"`. Torch-free at import: the CLI and the server read it.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from export.families.base import Family
from export.specs import SPECS, ComponentSpec

COMPONENT = "tiny_vae_decoder"
SUB = "tiny_vae"  # its model sub-folder
MODEL_CLASS = ("diffusers", "AutoencoderTiny")
WRAPPER = "export.families.sd_wrappers:VaeDecoderWrapper"  # decode(latents / scaling_factor): diffusers' pipelines' call

SPEC: ComponentSpec = replace(
    SPECS["vae_decoder"], name=COMPONENT, model_folder=SUB,
    description="tiny decoder (AutoencoderTiny: TAESD / TAESDXL): latents [B, 4, H/8, W/8] -> images [B, 3, H, W] in "
                "[-1, 1]")


def with_tiny_vae(family: Family, built: bool = True) -> Family:
    """`family` with the tiny decoder as its preview decoder (when `built`); else `family` itself."""
    if not built:
        return family
    return replace(family, specs={**family.specs, COMPONENT: SPEC},
                   roles=replace(family.roles, preview_decoder=COMPONENT),
                   wrappers={**family.wrappers, COMPONENT: WRAPPER},
                   model_classes={**family.model_classes, SUB: MODEL_CLASS})


def for_component(family: Family, name: str) -> Family:
    """`family` with the tiny decoder added when `name` is it (loading one component from an engine artifact)."""
    return with_tiny_vae(family, name == COMPONENT and name not in family.specs)


def check_folder(path: Path, latent_channels: int, model: str) -> dict[str, Any]:
    """The tiny VAE's config; ValueError, before any work, for a folder that is not an AutoencoderTiny of this
    model's latents."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--tiny-vae {path}: no config.json there (an AutoencoderTiny folder: TAESD, TAESDXL)")
    config = json.loads(config_path.read_text())
    if config.get("_class_name") != MODEL_CLASS[1]:
        raise ValueError(f"--tiny-vae {path}: its config is a {config.get('_class_name')!r}, not an AutoencoderTiny")
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        raise ValueError(f"--tiny-vae {path}: no .safetensors weights there (pickled weights are refused)")
    channels = int(config.get("latent_channels", 4))
    if channels != latent_channels:
        raise ValueError(f"--tiny-vae {path}: it decodes {channels}-channel latents; model {model}'s VAE makes "
                         f"{latent_channels} (TAESD is for SD 1.x/2.x, TAESDXL for SDXL)")
    return config


def tiny_vae_folder(base: Path, tiny: Path, root: Path) -> Path:
    """One folder that is the model `base` plus `tiny` as sub-folder `tiny_vae` (links, made once under `root`)."""
    from export.store import linked_folder

    return linked_folder(base, {SUB: tiny}, root)


def random_tiny_vae(out: Path, seed: int = 0, latent_channels: int = 4) -> Path:
    """A seeded random AutoencoderTiny with TAESD's architecture, saved (safetensors) as folder `out` (tests and
    benchmarks: no hub here); reused when it exists."""
    import torch
    from diffusers import AutoencoderTiny

    from export.store import exclusive, staging_dir

    if (out / "config.json").is_file():
        return out
    with exclusive(out):
        if not (out / "config.json").is_file():
            with staging_dir(out) as tmp:
                torch.manual_seed(seed)
                AutoencoderTiny(latent_channels=latent_channels).save_pretrained(tmp, safe_serialization=True)
    return out
