"""A1111's hires fix: txt2img at the request's size, the result upscaled by `hires_scale`, then img2img at that
size with `hires_strength` over `hires_steps`, one image out.

Upscalers (`hires_upscaler`): "latent" interpolates the first pass's latents bilinearly and "latent-nearest" by the
nearest latent (A1111's "Latent" and "Latent (nearest)": torch's interpolate, no antialiasing), with no VAE round
trip; "lanczos" decodes, resizes the pixels with Lanczos and encodes again (it needs the VAE encoder); "x4" decodes,
runs the x4 upscaler built into the same engine dir on each image (engine/upscale.py: the request's prompts, sampler,
steps, guidance and image seed, at `noise_level`, default 20), resizes its 4x image with Lanczos to the target and
encodes that. The second
pass's noise comes from a generator seeded again with the image's seed (A1111's rule), so image k of a request is
that of seed + k through both passes. The second pass resolves what the request left to the engine at its own size,
as a request for that size would (SDXL's size conditioning, diffusers' img2img defaults; `vae_tiling` "auto"). Its
parameters record both passes: the first size, `Hires upscale`, `Hires
steps`, `Hires upscaler` and `Denoising strength`.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from export.errors import RequestError

if TYPE_CHECKING:
    import torch

    from engine.request import Generated, PreparedRequest

FIELD = "hires_scale"  # engine/passes.py: the field that turns it on
LATER_FIELDS = ("noise_level",)  # the x4 upscaler's, between the passes; the second pass runs on the same model
UPSCALERS = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "lanczos": "Lanczos",
             "x4": "SD x4 upscaler"}  # ours -> A1111's name (A1111 has no x4: ours names the model)
X4 = "sd-upscaler"  # the family the x4 upscaler's model is of (export/families/upscale.py)
PIXEL_UPSCALERS = ("lanczos", "x4")  # decode, upscale in pixels, encode again: they need the latent encoder
MAX_SCALE = 4.0
OFF = {"hires_scale": None, "hires_steps": None}  # a request with these is an ordinary one
SOURCE = "hires fix"  # the second pass's init image: its start is the first pass's (Row.latents or Row.image)


def wanted(r: Any) -> bool:
    return r.hires_scale is not None


def check(r: Any) -> None:
    """RequestError naming the field for hires options a pipeline cannot run (on a request that asks for hires)."""
    scale = r.hires_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or not 1 < scale <= MAX_SCALE:
        raise RequestError("hires_scale", f"hires_scale {scale!r} must be a number in (1, {MAX_SCALE:g}]")
    steps = r.hires_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000):
        raise RequestError("hires_steps", f"hires_steps {steps!r} must be an integer in [1, 1000] (None = steps)")
    strength = r.hires_strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise RequestError("hires_strength", f"hires_strength {strength!r} must be in (0, 1]")
    if r.hires_upscaler not in UPSCALERS:
        raise RequestError("hires_upscaler", f"hires_upscaler {r.hires_upscaler!r} is not one of "
                                             f"{', '.join(UPSCALERS)}")
    if r.init_image is not None:
        raise RequestError("hires_scale", "the hires fix is a txt2img option: drop init_image or hires_scale")
    if r.noise_level is not None and r.hires_upscaler != "x4":
        raise RequestError("noise_level", f"noise_level is the x4 upscaler's: hires_upscaler {r.hires_upscaler} takes "
                                          "none (use x4, or drop noise_level)")


def target(r: Any, multiple: int) -> tuple[int, int]:
    """The second pass's (height, width): the first's times hires_scale; RequestError naming hires_scale when that
    is not a multiple of the model's size step."""
    h, w = round(r.height * r.hires_scale), round(r.width * r.hires_scale)
    if h % multiple or w % multiple:
        raise RequestError("hires_scale", f"hires_scale {r.hires_scale:g} makes {h}x{w} of {r.height}x{r.width}: not "
                                          f"a multiple of {multiple} pixels; choose a scale whose target is")
    return h, w


def second_pass(r: Any, multiple: int) -> Any:
    """The img2img request of the second pass (its init image set by `run`)."""
    h, w = target(r, multiple)
    return replace(r, height=h, width=w, steps=r.hires_steps or r.steps, strength=r.hires_strength, noise_level=None,
                   **OFF)  # noise_level: the x4 upscaler's, between the passes


def resolved_second(pipe: Any, r: Any, given: Any) -> Any:
    """The second pass's request of the prepared `r`, resolved at its own size as `r` was at its size (the fields the
    request `given` left to the engine: SDXL's time ids, `vae_tiling` "auto"); its seed `r`'s."""
    from engine.request import with_family_fields

    asked = replace(given or r, seed=r.seed, height=r.height, width=r.width)
    second = pipe.with_tiling(second_pass(asked, pipe.dims.size_multiple))
    return replace(with_family_fields(second, pipe.family, pipe.dims), init_image=SOURCE)  # img2img; its start: by `run`


def run(pipe: Any, p: PreparedRequest, j: int, size: int, **kw: Any) -> list[Generated]:
    """The images of one prepared hires request through `pipe` (engine/pipeline.py), in batches of `size`."""
    r = p.request
    first = replace(p, request=replace(r, **OFF))
    second = resolved_second(pipe, r, p.given)
    out: list[Generated] = []
    rows = first.rows(j)
    for start in range(0, len(rows), size):
        batch = rows[start:start + size]
        latents, _, _ = pipe.run_batch(batch, p.cfg, decode=False, **kw)  # [B, C, h, w]
        upscaled = _upscaled(pipe, latents, first.request, second, r.hires_upscaler, [row.seed for row in batch])
        rows2 = [replace(row, request=second, **init) for row, init in zip(batch, upscaled, strict=True)]
        pixels, timings, graphed = pipe.run_batch(rows2, p.cfg, **kw)
        out += [pipe.result(replace(row, request=r), px, graphed, timings)  # recorded as asked: both passes
                for row, px in zip(batch, pixels, strict=True)]
    return out


def prepare(pipe: Any, r: Any, given: Any) -> None:
    """The checks a hires request needs against the engines (`pipe`), before any work: the target size within the
    engines' sizes and memory (its own tiling), an img2img-capable model, the VAE encoder for Lanczos; RequestError
    naming the field."""
    from export.specs import check_size

    second = second_pass(r, pipe.dims.size_multiple)
    try:
        check_size(pipe.dims, second.height, second.width, pipe.profile.lo, pipe.profile.hi)
        tile = pipe.tiling(resolved_second(pipe, r, given))
        h, w = second.height, second.width
        pipe.check_memory(h, w, r.images, r.guidance_scale > 1, (min(tile.tile, h), min(tile.tile, w)) if tile else None)
    except RequestError as exc:
        raise RequestError("hires_scale", f"hires_scale {r.hires_scale:g} ({second.height}x{second.width}): {exc}") \
            from None
    if pipe.dims.inpainting_unet:
        raise RequestError("hires_scale", "the hires fix needs img2img, which an inpainting model does not do")
    if r.hires_upscaler in PIXEL_UPSCALERS and not pipe.has_role("latent_encoder"):
        raise RequestError("hires_upscaler", f"hires_upscaler {r.hires_upscaler} encodes the upscaled image: it needs "
                                             f"the {pipe.family.roles.latent_encoder} engine, which these engines lack "
                                             "(use latent, or rebuild with it)")
    if r.hires_upscaler == "x4":
        _check_x4(pipe, r)


def _x4_request(r: Any, image: Any, seed: int) -> Any:
    """The x4 upscaler's request for one first-pass image (PIL): the request's prompts, sampler, steps, guidance."""
    from engine.request import Request

    return Request(prompt=r.prompt, negative_prompt=r.negative_prompt, prompt_syntax=r.prompt_syntax, steps=r.steps,
                   guidance_scale=r.guidance_scale, sampler=r.sampler, seed=seed, init_image=image,
                   noise_level=r.noise_level)


def _check_x4(pipe: Any, r: Any) -> None:
    """The x4 upscaler beside `pipe` (loaded now), and its request for a first-pass image of this size, checked;
    RequestError naming hires_upscaler (or the upscaler's own field: noise_level)."""
    import PIL.Image

    try:
        upscaler = pipe.companion(X4)
    except LookupError as exc:
        raise RequestError("hires_upscaler", f"hires_upscaler x4 needs the x4 upscaler: {exc}") from None
    gray = PIL.Image.new("RGB", (r.width, r.height), (128, 128, 128))
    try:
        upscaler.prepare(_x4_request(r, gray, r.seed))
    except RequestError as exc:
        if exc.field == "noise_level":
            raise
        raise RequestError("hires_upscaler", f"hires_upscaler x4 on a {r.width}x{r.height} image: {exc}") from None


def _upscaled(pipe: Any, latents: torch.Tensor, r1: Any, r2: Any, upscaler: str,
              seeds: list[int]) -> list[dict[str, Any]]:
    """Each row's start for the second pass: `latents` [1, C, h2, w2] (latent upscalers) or `image` [1, 3, H2, W2]
    in [-1, 1] (Lanczos on the decoded pixels, or on the x4 upscaler's image of them; `seeds`: the rows')."""
    import torch

    scale = pipe.dims.vae_scale
    if upscaler not in PIXEL_UPSCALERS:
        mode = "nearest" if upscaler == "latent-nearest" else "bilinear"
        up = torch.nn.functional.interpolate(latents.float().cpu(), size=(r2.height // scale, r2.width // scale),
                                             mode=mode, antialias=False)
        return [{"latents": up[i:i + 1], "image": None} for i in range(len(up))]
    import PIL.Image

    from engine.images import load_image

    pixels = [PIL.Image.fromarray(px) for px in pipe.decode(latents, r1)]  # [H, W, 3] uint8 each
    if upscaler == "x4":  # each image 4x through the upscaler beside this model, with its own seed
        x4 = pipe.companion(X4)
        done = x4.run([_x4_request(r1, img, seed) for img, seed in zip(pixels, seeds, strict=True)], progress=False,
                      batch_size=len(pixels))
        pixels = [PIL.Image.fromarray(g.pixels) for g in done]
    lanczos = PIL.Image.Resampling.LANCZOS
    return [{"image": load_image(img.resize((r2.width, r2.height), lanczos), r2.height, r2.width, False),
             "latents": None} for img in pixels]
