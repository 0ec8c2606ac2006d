"""What one asks the engine for, and what one gets back: `Request` in, one `Generated` per image out.

`Request` holds the generation defaults (the CLI and the server read them from here). Image k of a
request uses seed `seed + k` (A1111's convention) and records it, so any image regenerates alone;
`seed = -1` draws a random seed and records it. An init image makes it img2img; an init image and a
mask make it inpainting (white = repaint).

SDXL's size conditioning (`original_size`, `crop`, `target_size`; the refiner's `aesthetic_score` and
`negative_aesthetic_score` instead of `target_size`) is None by default: diffusers' defaults, filled in by
`with_time_ids` for the model's family: original = target = (height, width), crop (0, 0), and the family's
aesthetic scores (6.0 / 2.5). Other models refuse them, naming the CLI flag.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.families import Family, TimeIds

if TYPE_CHECKING:  # torch and PIL load when an image or a LoRA is first used, not with the CLI's arguments
    from engine.images import ImageSource
    from engine.lora import Adapter

MAX_SEED = 2**64 - 1  # torch.Generator takes 64-bit seeds
MAX_STEPS = 1000
MAX_IMAGES = 64  # images per request
RANDOM_SEED = -1


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
    strength: float | None = None  # (0, 1]; None = the family's default (Family.default_strength: diffusers')
    mask: ImageSource | None = None  # inpainting: white pixels are repainted
    resize: bool = False  # resize init image and mask to the requested size instead of refusing
    # SDXL size conditioning (time ids), pixels; None = diffusers' defaults (see `with_time_ids`)
    original_size: tuple[int, int] | None = None  # (height, width) of the "original" image; None = (height, width)
    crop: tuple[int, int] | None = None  # crop top-left (top, left); None = (0, 0)
    target_size: tuple[int, int] | None = None  # (height, width); None = (height, width); not for the refiner
    aesthetic_score: float | None = None  # SDXL refiner only; None = the family's default (6.0)
    negative_aesthetic_score: float | None = None  # SDXL refiner only; None = the family's default (2.5)
    loras: tuple[Adapter, ...] = ()  # LoRA adapters merged into the weights for this request (engine/lora.py)

    @property
    def kind(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"

    def resolved(self, default_strength: tuple[float, float]) -> "Request":
        """A copy with the random seed drawn and the strength default ((img2img, inpaint): the model family's,
        e.g. SDXL's (0.3, 0.9999), as its diffusers pipelines) filled in."""
        seed = secrets.randbits(32) if self.seed == RANDOM_SEED else self.seed
        strength = self.strength
        if strength is None and self.kind != "txt2img":
            strength = default_strength[1] if self.kind == "inpaint" else default_strength[0]
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
        for what in ("height", "width"):  # the model's size multiple is checked against the engine
            v = getattr(self, what)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{what} {v} must be a positive number of pixels (None = the engine's default)")
        self._check_time_ids()
        if self.loras:
            self._check_loras()

    def _check_loras(self) -> None:
        from engine.lora import Adapter, check_lora_file

        for a in self.loras:
            if not isinstance(a, Adapter):
                raise ValueError(f"loras must be Adapter(path, scale) values (parse_adapter('path:scale')), not {a!r}")
            check_lora_file(Path(a.path))
            if not (isinstance(a.scale, (int, float)) and math.isfinite(a.scale)):
                raise ValueError(f"LoRA {str(a.path)!r}: scale {a.scale!r} is not a finite number")

    def _check_time_ids(self) -> None:
        for name, lowest in (("original_size", 1), ("crop", 0), ("target_size", 1)):
            value = getattr(self, name)
            if value is not None and not _int_pair(value, lowest):
                raise ValueError(f"{flag(name)} {_show(value)} must be two integers (height/top, width/left) "
                                 f">= {lowest}")
        for name in AESTHETIC_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{flag(name)} {value} must be a finite number")


TIME_ID_FIELDS = ("original_size", "crop", "target_size")
AESTHETIC_FIELDS = ("aesthetic_score", "negative_aesthetic_score")


def flag(name: str) -> str:
    """The CLI flag of a Request field: original_size -> --original-size."""
    return "--" + name.replace("_", "-")


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)


def _int_pair(value: Any, lowest: int) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= lowest for v in value))


def _refuse_time_ids(r: Request, family: Family) -> None:
    """ValueError naming the first time-id flag this family does not take."""
    for name in TIME_ID_FIELDS + AESTHETIC_FIELDS:
        if getattr(r, name) is None:
            continue
        if not family.time_ids:
            raise ValueError(f"only SDXL models take {flag(name)}; this model is family {family.name!r}")
        if name in AESTHETIC_FIELDS and not family.aesthetic:
            raise ValueError(f"only SDXL refiner models take {flag(name)}; this model is family {family.name!r}")
        if name == "target_size" and family.aesthetic:
            raise ValueError(f"SDXL refiner models take no {flag(name)}: their time ids are original size, crop "
                             "and aesthetic score")


def with_time_ids(r: Request, family: Family) -> Request:
    """A copy of a checked request with its size `height` x `width` known and the family's time-id defaults
    filled in (nothing for a family without time ids); ValueError for a value the family does not take or a
    crop outside the original size."""
    _refuse_time_ids(r, family)
    if not family.time_ids:
        return r
    original = tuple(r.original_size or (r.height, r.width))
    crop = tuple(r.crop or (0, 0))
    if not (crop[0] < original[0] and crop[1] < original[1]):
        raise ValueError(f"--crop {_show(crop)} is outside --original-size {_show(original)}: top must be < "
                         f"{original[0]} and left < {original[1]}")
    values: dict[str, Any] = dict(original_size=original, crop=crop)
    if family.aesthetic:
        positive, negative = family.aesthetic_scores
        values.update(aesthetic_score=positive if r.aesthetic_score is None else r.aesthetic_score,
                      negative_aesthetic_score=negative if r.negative_aesthetic_score is None
                      else r.negative_aesthetic_score)
    else:
        values.update(target_size=tuple(r.target_size or (r.height, r.width)))
    return replace(r, **values)


def time_ids_of(r: Request) -> TimeIds:
    """The size conditioning of a request `with_time_ids` filled in (the fields its family ignores: 0)."""
    return TimeIds(r.original_size, r.crop, r.target_size or (0, 0), r.aesthetic_score or 0.0,
                   r.negative_aesthetic_score or 0.0)


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
    skip = ("init_image", "mask", "images", "resize", "loras")  # loras: recorded by the pipeline (name, hash)
    params = {f.name: getattr(request, f.name) for f in fields(request) if f.name not in skip}
    params.update(seed=request.seed + index, index=index, kind=request.kind)
    if request.kind == "txt2img":
        params.pop("strength")
    for key in ("init_image", "mask"):
        value = getattr(request, key)
        if isinstance(value, (str, Path)):
            params[key] = str(value)
    for key in TIME_ID_FIELDS + AESTHETIC_FIELDS:  # recorded where the model takes them (filled in)
        if params[key] is None:
            params.pop(key)
        elif isinstance(params[key], tuple):
            params[key] = list(params[key])
    return params
