"""What one asks the engine for, and what one gets back: `Request` in, one `Generated` per image out.

`Request` holds the generation defaults (the CLI and the server read them from here). Image k of a
request uses seed `seed + k` (A1111's convention) and records it, so any image regenerates alone;
`seed = -1` draws a random seed and records it. An init image makes it img2img; an init image and a
mask make it inpainting (white = repaint).
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.images import ImageSource

MAX_SEED = 2**64 - 1  # torch.Generator takes 64-bit seeds
MAX_STEPS = 1000
MAX_IMAGES = 64  # images per request
RANDOM_SEED = -1
IMG2IMG_STRENGTH = 0.8  # diffusers' defaults when strength is not given
INPAINT_STRENGTH = 1.0


@dataclass
class Request:
    prompt: str = "a photograph of an astronaut riding a horse"
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5  # <= 1 runs the UNet once per step (no classifier-free guidance)
    sampler: str = "dpmpp_2m"
    seed: int = 0  # image k uses seed + k; -1 = a random seed (recorded in the result)
    height: int | None = None  # None = the engine's default size
    width: int | None = None
    images: int = 1  # images for this prompt
    init_image: ImageSource | None = None  # img2img / inpainting source image
    strength: float | None = None  # (0, 1]; None = 0.8 for img2img, 1.0 for inpainting (diffusers' defaults)
    mask: ImageSource | None = None  # inpainting: white pixels are repainted
    resize: bool = False  # resize init image and mask to the requested size instead of refusing

    @property
    def kind(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"

    def resolved(self) -> "Request":
        """A copy with the random seed drawn and the strength default filled in."""
        seed = secrets.randbits(32) if self.seed == RANDOM_SEED else self.seed
        strength = self.strength
        if strength is None and self.kind != "txt2img":
            strength = INPAINT_STRENGTH if self.kind == "inpaint" else IMG2IMG_STRENGTH
        return replace(self, seed=seed, strength=strength)

    def check(self) -> None:
        """ValueError naming the value and the allowed range for anything a pipeline cannot run."""
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise ValueError("prompt and negative prompt must be strings")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps {self.steps} must be in [1, {MAX_STEPS}]")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance scale {self.guidance_scale} must be a finite number >= 0")
        if not isinstance(self.images, int) or not 1 <= self.images <= MAX_IMAGES:
            raise ValueError(f"images per prompt {self.images} must be in [1, {MAX_IMAGES}]")
        if not isinstance(self.seed, int) or not (self.seed == RANDOM_SEED or 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed {self.seed} must be in [0, 2**64-1], or -1 for a random seed")
        if self.seed != RANDOM_SEED and self.seed + self.images - 1 > MAX_SEED:
            raise ValueError(f"seed {self.seed} + {self.images} images runs past 2**64-1")
        if self.strength is not None:
            if self.init_image is None:
                raise ValueError("strength needs an init image (img2img or inpainting)")
            if not (isinstance(self.strength, (int, float)) and 0 < self.strength <= 1):
                raise ValueError(f"strength {self.strength} is outside (0, 1]")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs an init image to inpaint")


@dataclass
class Generated:
    """One image and everything needed to make it again."""

    pixels: np.ndarray  # [H, W, 3] uint8
    params: dict[str, Any]  # prompt, negative_prompt, steps, guidance_scale, sampler, seed (this image's), ...
    timings_ms: dict[str, float] = field(default_factory=dict)  # of the batch it ran in

    def save(self, path: str | Path) -> Path:
        """Write the image in the format `path`'s suffix names (.png, .jpg/.jpeg, .webp) with its parameters."""
        from engine.png import save_image

        return save_image(self.pixels, Path(path), self.params)


def image_params(request: Request, index: int) -> dict[str, Any]:
    """What a result records of its request: image `index` of it, with its own seed."""
    skip = ("init_image", "mask", "images", "resize")
    params = {f.name: getattr(request, f.name) for f in fields(request) if f.name not in skip}
    params.update(seed=request.seed + index, index=index, kind=request.kind)
    if request.kind == "txt2img":
        params.pop("strength")
    for key in ("init_image", "mask"):
        value = getattr(request, key)
        if isinstance(value, (str, Path)):
            params[key] = str(value)
    return params
