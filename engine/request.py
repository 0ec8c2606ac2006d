"""What one asks the engine for, and what one gets back: `Request` in, `PreparedRequest` once checked against an
engine, one `Generated` per image out.

`Request` holds the generation defaults (the CLI and the server read them from here). Image k of a
request uses seed `seed + k` (A1111's convention) and records it, so any image regenerates alone;
`seed = -1` draws a random 64-bit seed and records it. An init image makes it img2img; an init image and a
mask make it inpainting (white = repaint).

Some fields belong to a model family (`FAMILY_FIELDS`: SDXL's size conditioning `original_size`, `crop`,
`target_size`, the refiner's `aesthetic_score` and `negative_aesthetic_score`, SD's `clip_skip`, the x4 upscaler's
`noise_level`, the class-conditional LDM's `class_label`, semantic synthesis's `semantic_map`, the layout model's
`layout`). A model without text takes no prompt (`with_prompt`). They are None by default:
the family fills in diffusers' defaults (`Family.request_defaults`), and a model of another family refuses them.

Every bad value raises `RequestError(field, message)`: the message names the field as the Request names it; the
server answers a 400 whose `param` is the field, the CLI names its flag (`flag`).
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.control import Control
from engine.control import check as check_controls
from engine.ip_adapter import check as check_image_prompt
from engine.passes import check as check_passes
from engine.prompts import check_syntax
from engine.sampler_registry import REGISTRY
from engine.tiling import OVERLAP
from engine.tiling import check as check_tiling
from export.errors import RequestError
from export.families import Family, takers
from export.specs import Dims

if TYPE_CHECKING:  # torch and PIL load when an image or a LoRA is first used, not with the CLI's arguments
    import torch

    from engine.images import ImageSource
    from engine.lora import Adapter

__all__ = ["RequestError"]  # re-exported: the request's error type

StopFn = Callable[[], bool]  # asked by a run between steps: True = nobody waits for this batch any more


class Stopped(Exception):
    """A run stopped between two steps because its `stop` said nobody waits for the batch (timeout, disconnect)."""


def check_stop(stop: StopFn | None, i: int) -> None:
    """Stopped when `stop` (asked on the host before step `i`, no device sync) says nobody waits any more."""
    if stop is not None and stop():
        raise Stopped(f"stopped before step {i}: nobody waits for this batch")


DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"  # what a text model draws when a request gives none
MAX_SEED = 2**64 - 1  # torch.Generator takes 64-bit seeds
MAX_STEPS = 1000
MAX_IMAGES = 64  # images per request
MAX_CACHE_INTERVAL = 100  # feature caching: at most this many steps per full UNet step
CACHE_SCHEDULES = ("uniform", "center")  # engine/feature_cache.py
DECODERS = ("full", "tiny")  # engine/previews.py
RANDOM_SEED = -1


@dataclass
class Request:
    prompt: str | None = None  # None: none given (a model with text then reads DEFAULT_PROMPT; one without takes none)
    negative_prompt: str | None = None  # None: none given (SDXL then zeroes the unconditional rows, as diffusers' force_zeros_for_empty_prompt); "" is encoded like any text
    steps: int = 25
    guidance_scale: float = 7.5  # <= 1 runs the UNet once per step (no classifier-free guidance)
    sampler: str = "dpmpp_2m"
    eta: float = 0.0  # DDIM's eta: 0 deterministic, 1 DDPM-like, [0, 1]; other samplers take 0 only
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
    noise_level: int | None = None  # the x4 upscaler's low-res image noise, [0, 350]; None = the family's default (20)
    class_label: int | None = None  # a class-conditional LDM's class, 0..n-1; None = its unconditional class (the last)
    semantic_map: ImageSource | bytes | None = None  # semantic synthesis's label image (one class id per pixel);
    # a prepared request holds it loaded (export/families/ldm_semantic.py LabelMap)
    semantic_palette: str | Path | dict | None = None  # its colours' classes ({"#rrggbb": id} or a JSON file of it),
    # for a colour map; None: the map is a label image
    layout: str | Path | list | None = None  # a layout model's objects ([{"label", "box"}], or a JSON file); None = none;
    # a prepared request holds its tokens (export/families/ldm_layout.py LayoutTokens)
    loras: tuple[Adapter, ...] = ()  # LoRA adapters merged into the weights for this request (engine/lora.py)
    controls: tuple[Control, ...] = ()  # ControlNets this request uses, each with its image (engine/control.py)
    guess_mode: bool = False  # ControlNet guess mode: the nets see the conditional rows only, residuals weighted
    ip_image: ImageSource | None = None  # an image prompt, for engines built with an IP-Adapter (engine/ip_adapter.py)
    ip_scale: float = 1.0  # its weight, [0, 2]; 0 = the text-only image exactly
    clip_skip: int | None = None  # A1111's "Clip skip": 1 (None) = the last layer, 2 = the penultimate, ...; SD 1.x/2.x
    prompt_syntax: str = "a1111"  # how prompts read (engine/prompts.py): A1111's weights, chunks and BREAK; or plain
    # tiled VAE decode and encode (engine/tiling.py): "auto" = only where the untiled decode would not fit in memory
    vae_tiling: str = "auto"  # "auto" | "on" | "off"; a prepared request holds "on" or "off"
    vae_tile_size: int | None = None  # pixels per tile side; None = the VAE's sample size (diffusers' tile)
    vae_tile_overlap: float = OVERLAP  # the share of a tile blended with each neighbour (diffusers': 0.25)
    # A1111's hires fix (engine/hires.py): txt2img at height x width, upscaled by hires_scale, then img2img there
    hires_scale: float | None = None  # None = off; (1, 4]
    hires_steps: int | None = None  # the second pass's steps; None = steps
    hires_strength: float = 0.7  # its denoising strength, (0, 1] (A1111's default)
    hires_upscaler: str = "latent"  # "latent" (bilinear), "latent-nearest", "lanczos" (in pixels)
    # SDXL base -> refiner (engine/refiner.py): the share of the schedule the base runs; the refiner in the engine
    # dir runs the rest
    refiner_switch: float | None = None  # None = off; (0, 1)
    # feature caching (DeepCache; engines built with --cache-branch): engine/feature_cache.py
    cache_interval: int = 1  # a full UNet step every N steps, shallow steps between; 1 = every step in full
    cache_schedule: str = "uniform"  # where the full steps go: "uniform" (every N) | "center" (DeepCache's non-uniform)
    decoder: str = "full"  # what decodes the final images: "full" (the model's VAE) | "tiny" (the tiny VAE built with
    # --tiny-vae: faster, rougher; engine/previews.py)

    @property
    def kind(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"

    def resolved(self, default_strength: tuple[float, float]) -> Request:
        """A copy with the random seed drawn and the strength default ((img2img, inpaint): the model family's,
        e.g. SDXL's (0.3, 0.9999), as its diffusers pipelines) filled in."""
        seed = secrets.randbelow(MAX_SEED - self.images + 2) if self.seed == RANDOM_SEED else self.seed
        strength = self.strength
        if strength is None and self.kind != "txt2img":
            strength = default_strength[1] if self.kind == "inpaint" else default_strength[0]
        return replace(self, seed=seed, strength=strength)

    def check(self) -> None:
        """RequestError naming the field, the value and the allowed range for anything a pipeline cannot run."""
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str) and value is not None:
                raise RequestError(name, f"{name} must be a string or None (none given), not {type(value).__name__}")
        for name in ("steps", "images", "seed", "height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise RequestError(name, f"{name} must be an integer, not {type(value).__name__} {value!r}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise RequestError("steps", f"steps {self.steps} must be in [1, {MAX_STEPS}]")
        if (isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float))
                or not math.isfinite(self.guidance_scale) or self.guidance_scale < 0):
            raise RequestError("guidance_scale", f"guidance scale {self.guidance_scale} must be a finite number >= 0")
        if isinstance(self.images, bool) or not isinstance(self.images, int) or not 1 <= self.images <= MAX_IMAGES:
            raise RequestError("images", f"images per prompt {self.images} must be in [1, {MAX_IMAGES}]")
        if (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                or not (self.seed == RANDOM_SEED or 0 <= self.seed <= MAX_SEED)):
            raise RequestError("seed", f"seed {self.seed} must be in [0, 2**64-1], or -1 for a random seed")
        if self.seed != RANDOM_SEED and self.seed + self.images - 1 > MAX_SEED:
            raise RequestError("seed", f"seed {self.seed} + {self.images} images runs past 2**64-1")
        if (isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta)
                or not 0 <= self.eta <= 1):
            raise RequestError("eta", f"eta {self.eta!r} must be a number in [0, 1] (DDIM's: 0 deterministic)")
        if self.eta and not (self.sampler in REGISTRY and REGISTRY[self.sampler].takes_eta):
            takers_of_eta = ", ".join(s.name for s in REGISTRY.values() if s.takes_eta)
            raise RequestError("eta", f"eta {self.eta:g} is for {takers_of_eta}; sampler {self.sampler} takes eta 0")
        if self.strength is not None:
            if self.init_image is None:
                raise RequestError("strength", "strength needs an init image (img2img or inpainting)")
            if isinstance(self.strength, bool) or not (isinstance(self.strength, (int, float)) and 0 < self.strength <= 1):
                raise RequestError("strength", f"strength {self.strength} is outside (0, 1]")
        if self.mask is not None and self.init_image is None:
            raise RequestError("mask", "a mask needs an init image to inpaint")
        for what in ("height", "width"):  # the model's size multiple is checked against the engine
            v = getattr(self, what)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RequestError(what, f"{what} {v} must be a positive number of pixels (None = the engine's "
                                         "default)")
        self._check_family_fields()
        if self.loras:
            self._check_loras()
        check_controls(self.controls, self.guess_mode)
        check_image_prompt(self.ip_image, self.ip_scale)
        check_syntax(self.prompt_syntax)
        check_tiling(self.vae_tiling, self.vae_tile_size, self.vae_tile_overlap, 1)  # the model's multiple: prepare
        check_passes(self)  # the hires fix, the refiner handoff
        self._check_cache()

    def _check_cache(self) -> None:
        n = self.cache_interval
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CACHE_INTERVAL:
            raise RequestError("cache_interval", f"cache_interval {n!r} must be an integer in [1, {MAX_CACHE_INTERVAL}] "
                                                 "(1 = every step in full)")
        if self.cache_schedule not in CACHE_SCHEDULES:
            raise RequestError("cache_schedule", f"cache_schedule {self.cache_schedule!r} is not one of "
                                                 f"{', '.join(CACHE_SCHEDULES)}")
        if self.decoder not in DECODERS:
            raise RequestError("decoder", f"decoder {self.decoder!r} is not one of {', '.join(DECODERS)}")

    def _check_loras(self) -> None:
        from engine.lora import Adapter, check_lora_file

        for a in self.loras:
            if not isinstance(a, Adapter):
                raise RequestError("loras", f"loras must be Adapter(path, scale) values (parse_adapter('path:scale')), "
                                            f"not {a!r}")
            try:
                check_lora_file(Path(a.path))
            except ValueError as exc:
                raise RequestError("loras", str(exc)) from None
            if isinstance(a.scale, bool) or not (isinstance(a.scale, (int, float)) and math.isfinite(a.scale)):
                raise RequestError("loras", f"LoRA {str(a.path)!r}: scale {a.scale!r} is not a finite number")

    def _check_family_fields(self) -> None:
        for name, lowest in (("original_size", 1), ("crop", 0), ("target_size", 1)):
            value = getattr(self, name)
            if value is not None and not _int_pair(value, lowest):
                raise RequestError(name, f"{name} {_show(value)} must be two integers (height/top, width/left) "
                                         f">= {lowest}")
        skip = self.clip_skip
        if skip is not None and (isinstance(skip, bool) or not isinstance(skip, int) or skip < 1):
            raise RequestError("clip_skip", f"clip_skip {skip!r} must be an integer >= 1 (1 = the last layer, as A1111 "
                                            "numbers it)")
        level = self.noise_level
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 0):
            raise RequestError("noise_level", f"noise_level {level!r} must be an integer >= 0 (the x4 upscaler's: at "
                                              "most its max_noise_level, 350)")
        label = self.class_label
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            raise RequestError("class_label", f"class_label {label!r} must be an integer >= 0 (a class id of a "
                                              "class-conditional model)")
        for name in AESTHETIC_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise RequestError(name, f"{name} {value} must be a finite number")


TIME_ID_FIELDS = ("original_size", "crop", "target_size")
AESTHETIC_FIELDS = ("aesthetic_score", "negative_aesthetic_score")
LOADED_FIELDS = ("semantic_map", "layout")  # family fields a prepared request holds loaded: recorded as their path
FAMILY_FIELDS = (TIME_ID_FIELDS + AESTHETIC_FIELDS + ("clip_skip", "noise_level", "class_label", "semantic_palette")
                 + LOADED_FIELDS)  # taken by some model families only (Family.request_fields)
FLAGS = {"sampler": "--scheduler", "images": "--images-per-prompt", "loras": "--lora",
         "controls": "--controlnet"}  # others: --field-name


def flag(name: str) -> str:
    """The engine.generate flag of a Request field: original_size -> --original-size, sampler -> --scheduler."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)


def _int_pair(value: Any, lowest: int) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= lowest for v in value))


def with_prompt(r: Request, family: Family) -> Request:
    """A copy whose prompt suits the model: a text model reads DEFAULT_PROMPT where none was given; a model without
    text (unconditional, class-conditional, super-resolution) takes none (RequestError naming the field; "" is none,
    as A1111's clients send it)."""
    if family.roles.text_encoders:
        return r if r.prompt is not None else replace(r, prompt=DEFAULT_PROMPT)
    for name in ("prompt", "negative_prompt"):
        if getattr(r, name):
            takes = f"; it takes {', '.join(family.request_fields)}" if family.request_fields else ""
            raise RequestError(name, f"model family {family.name!r} takes no {name.replace('_', ' ')}: it has no text "
                                     f"encoder{takes}; leave {name} unset")
    return replace(r, prompt=None, negative_prompt=None)


def with_family_fields(r: Request, family: Family, dims: Dims, later: tuple[str, ...] = ()) -> Request:
    """A copy of a checked request whose size (`height` x `width`) is known, with the family's fields filled in
    (diffusers' defaults); RequestError for a field the family does not take or a value it refuses. `later`: fields
    let through for a later pass's model (engine/passes.py). The prompt too (`with_prompt`)."""
    r = with_prompt(r, family)
    for name in FAMILY_FIELDS:
        if getattr(r, name) is not None and name not in family.request_fields and name not in later:
            others = ", ".join(takers(name))
            raise RequestError(name, f"model family {family.name!r} takes no {name}; the families that do: {others}"
                                     + (f" (this one takes {', '.join(family.request_fields)})"
                                        if family.request_fields else ""))
    if family.request_defaults is None:
        return r
    return replace(r, **family.request_defaults(r, dims))


def flex_key(r: Request) -> tuple:
    """What the rows of resolved requests must share to run in one step-batched flight (steps and strength may
    differ): adapters, kind, size, sampler, guidance on/off."""
    return (r.loras, r.kind, r.height, r.width, r.sampler, r.eta, r.guidance_scale > 1.0, control_key(r),
            tiling_key(r), cache_key(r))


def cache_key(r: Request) -> tuple:
    """What rows must share to run one schedule of full and shallow steps (engine/feature_cache.py)."""
    return (r.cache_interval, r.cache_schedule) if r.cache_interval > 1 else ()


def tiling_key(r: Request) -> tuple:
    """What rows decoded (and encoded) together must share: tiled or not, and how (engine/tiling.py)."""
    return (r.vae_tile_size, r.vae_tile_overlap) if r.vae_tiling == "on" else ()


def text_chunks(texts: tuple[Any, ...]) -> int:
    """The chunks a request's prompts take: the longest of each text encoder's (1 when none were read)."""
    return max((t.chunks for t in texts), default=1)


def row_key(row: Row) -> tuple:
    """The flight key of a row: its request's, and its prompts' chunk count (engine/prompts.py: rows of one UNet
    batch take text of one length)."""
    return (*flex_key(row.request), row.chunks)


def control_key(r: Request) -> tuple:
    """What rows must share to run their ControlNets in one call each: the nets, in order, and guess mode."""
    return (tuple(c.name for c in r.controls), r.guess_mode and bool(r.controls))


def batch_key(r: Request) -> tuple:
    """What the rows of resolved requests must share to run as one static batch: the flight's key, steps and
    strength."""
    return (*flex_key(r), r.steps, r.strength)


@dataclass(frozen=True)
class Row:
    """One image to make: image `k` of a prepared request; `req` orders the results of one run."""

    req: int
    k: int
    request: Request  # resolved
    image: torch.Tensor | None  # [1, 3, H, W] in [-1, 1]
    mask: torch.Tensor | None  # [1, 1, H, W] in {0, 1}
    controls: tuple[torch.Tensor, ...] = ()  # each control image [1, 3, H, W] in [0, 1], request.controls' order
    ip_image: torch.Tensor | None = None  # the image prompt, CLIP-normalised [1, 3, S, S]
    texts: tuple[Any, ...] = ()  # its prompts read for each text encoder (engine/text.py Prompts)
    latents: torch.Tensor | None = None  # [1, C, h, w] scaled latents to start from instead of encoding `image`
    noised: bool = False  # `latents` are another model's at the schedule's start (a handoff): no noise added

    @property
    def chunks(self) -> int:
        """Its prompts' chunks of 77 text tokens: the most any text encoder's prompt or negative prompt takes."""
        return text_chunks(self.texts)

    @property
    def seed(self) -> int:
        return self.request.seed + self.k


@dataclass(frozen=True)
class PreparedRequest:
    """A request checked against one engine, once: resolved (seed drawn, size, strength and the family's fields
    filled in) with its images loaded. What may share a batch is defined here and nowhere else."""

    request: Request
    image: torch.Tensor | None = None  # [1, 3, H, W] in [-1, 1]
    mask: torch.Tensor | None = None  # [1, 1, H, W] in {0, 1}
    controls: tuple[torch.Tensor, ...] = ()  # each control image [1, 3, H, W] in [0, 1]
    ip_image: torch.Tensor | None = None  # the image prompt, CLIP-normalised [1, 3, S, S]
    texts: tuple[Any, ...] = ()  # its prompts read for each text encoder (engine/text.py Prompts)
    given: Request | None = None  # the request as asked, before the engine filled it in (a later pass's own)

    @property
    def chunks(self) -> int:
        """Its prompts' chunks of 77 text tokens (engine/prompts.py)."""
        return text_chunks(self.texts)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance on: the denoiser runs on [uncond; cond] rows."""
        return self.request.guidance_scale > 1.0

    @property
    def flex_key(self) -> tuple:
        return (*flex_key(self.request), self.chunks)

    @property
    def batch_key(self) -> tuple:
        return (*batch_key(self.request), self.chunks)

    def rows(self, req: int = -1) -> list[Row]:
        return [Row(req, k, self.request, self.image, self.mask, self.controls, self.ip_image, self.texts)
                for k in range(self.request.images)]


# the stage timings a static batch's `Generated` records, in ms; named as the first reports named them (their
# components in SD), kept so committed benchmark results and scripts read on: text encoding, start latents,
# the denoise loop and its mean step, decode, and the whole batch
TIMING_TEXT, TIMING_START, TIMING_DENOISE, TIMING_STEP, TIMING_DECODE, TIMING_TOTAL = (
    "clip", "encode", "unet", "unet_per_step", "vae", "total")


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
    skip = ("init_image", "mask", "images", "resize", "loras", "controls", "guess_mode", "ip_image", "ip_scale",
            *LOADED_FIELDS)
    if request.vae_tiling != "on":  # recorded when the VAE ran in tiles
        skip += ("vae_tiling", "vae_tile_size", "vae_tile_overlap")
    if request.hires_scale is None:  # recorded when the hires fix ran
        skip += ("hires_scale", "hires_steps", "hires_strength", "hires_upscaler")
    if request.refiner_switch is None:  # recorded when the refiner took over
        skip += ("refiner_switch",)
    if not request.eta:  # recorded where DDIM ran with noise
        skip += ("eta",)
    if request.cache_interval <= 1:  # recorded where feature caching ran
        skip += ("cache_interval", "cache_schedule")
    if request.decoder == "full":  # recorded where the tiny decoder made the image
        skip += ("decoder",)
    params = {f.name: getattr(request, f.name) for f in fields(request) if f.name not in skip}  # loras: by the pipeline
    if request.ip_image is not None:  # the adapter's name: by the pipeline
        params["ip_scale"] = request.ip_scale
    if request.controls:
        params["controls"] = [_control_params(c) for c in request.controls]
        params["guess_mode"] = request.guess_mode
    params.update(seed=request.seed + index, index=index, kind=request.kind)
    if request.kind == "txt2img":
        params.pop("strength")
    for key in ("init_image", "mask", "ip_image", "semantic_palette", *LOADED_FIELDS):  # recorded where they were paths
        value = getattr(request, key)
        value = getattr(value, "source", value)  # a loaded map keeps where it came from
        if isinstance(value, (str, Path)):
            params[key] = str(value)
    if request.prompt is None:  # a model without text
        for key in ("prompt", "negative_prompt", "prompt_syntax"):
            params.pop(key)
    for key in FAMILY_FIELDS:  # recorded where the model takes them (filled in)
        if params.get(key) is None:
            params.pop(key, None)
        elif isinstance(params[key], tuple):
            params[key] = list(params[key])
    return params


def _control_params(c: Control) -> dict[str, Any]:
    """What an image records of one ControlNet it used (its image: the path, when it was one)."""
    out: dict[str, Any] = {"name": c.name, "scale": c.scale, "start": c.start, "end": c.end}
    if c.preprocess is not None:
        out.update(preprocess=c.preprocess, low=c.low, high=c.high)
    if isinstance(c.image, (str, Path)):
        out["image"] = str(c.image)
    return out
