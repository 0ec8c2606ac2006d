"""SDXL's "ensemble of experts" in one request: the base model denoises the first `refiner_switch` of the
schedule and the refiner (the sdxl-refiner model built into the same engine dir) the rest, from the base's
latents; one image out.

As diffusers' base pipeline (`denoising_end=switch`, `output_type="latent"`) followed by its img2img refiner
(`denoising_start=switch`, those latents as its image): both passes take the `steps`-step schedule of the
request's sampler, split at the first step whose timestep is below round(T * (1 - switch))
(samplers.switch_step). The refiner continues from the base's latents as they are (no noise drawn or added),
with its own text encoder, time ids (aesthetic scores) and VAE, and draws its steps' noise from a generator seeded
again with the image's seed. LoRA adapters, ControlNets and image prompts apply to the base only. The result
records both models: `refiner_switch` and `refiner` (A1111's "Refiner switch at" and "Refiner").
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.errors import RequestError

if TYPE_CHECKING:
    from engine.request import Generated, PreparedRequest

FIELD = "refiner_switch"  # engine/passes.py: the field that turns it on
LATER_FIELDS = ("aesthetic_score", "negative_aesthetic_score")  # the refiner's own conditioning
FAMILY = "sdxl-refiner"  # the model it hands over to
BASES = ("sdxl",)  # the families whose latents that model continues
SOURCE = "refiner handoff"  # the refiner pass's init image: the base's latents (Row.latents)


def wanted(r: Any) -> bool:
    return r.refiner_switch is not None


def check(r: Any) -> None:
    """RequestError naming refiner_switch for a value or a combination no engine can run."""
    s = r.refiner_switch
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 < s < 1:
        raise RequestError(FIELD, f"refiner_switch {s!r} must be a number in (0, 1): the share of the schedule "
                                  "the base model runs")
    if r.init_image is not None:
        raise RequestError(FIELD, "the refiner handoff is a txt2img option: drop init_image or refiner_switch")


def refiner_of(pipe: Any) -> Any:
    """The refiner pipeline beside the base `pipe` (loaded on first use); RequestError naming refiner_switch when
    `pipe` is no SDXL base or its engine dir holds no refiner."""
    model = pipe.info.get("model")
    if pipe.family.name not in BASES:
        raise RequestError(FIELD, f"model {model!r} ({pipe.family.name}) hands over to no refiner: the handoff is "
                                  f"for SDXL base models ({', '.join(BASES)})")
    try:
        return pipe.companion(FAMILY)
    except LookupError as exc:
        raise RequestError(FIELD, f"refiner_switch needs an SDXL refiner beside {model!r}: {exc}") from None


def beside(pipe: Any) -> str | None:
    """The model id of the refiner a handoff from `pipe` would use (its engine dir read, nothing loaded); None when
    there is none (or several)."""
    from engine.cache import find_family_dir

    if pipe.family.name not in BASES:
        return None
    try:
        return find_family_dir(Path(pipe.info["engine_dir"]).parent, FAMILY).name
    except LookupError:
        return None


def second_request(ref: Any, r: Any) -> Any:
    """The refiner pass's request: the base's prompts, sampler, steps, guidance and seed; the refiner's time ids
    (diffusers' defaults where the request gives none); nothing of the base's adapters and conditions."""
    from engine.request import with_family_fields

    second = replace(r, init_image=SOURCE, strength=None, target_size=None, refiner_switch=None, loras=(),
                     controls=(), guess_mode=False, ip_image=None)
    return with_family_fields(second, ref.family, ref.dims)


def split(pipe: Any, ref: Any, r: Any) -> tuple[Any, Any]:
    """(the base's schedule, ending at the switch; the refiner's, starting there), on each model's device."""
    from engine import samplers

    def schedule(p: Any, start: int | None = None) -> Any:
        return samplers.make_schedule(r.sampler, p.scheduler_config, r.steps, start=start, eta=r.eta)

    def at(p: Any, s: Any) -> int:
        return samplers.switch_step(s, r.refiner_switch, int(p.scheduler_config.get("num_train_timesteps", 1000)))

    base = schedule(pipe)
    end, start = at(pipe, base), at(ref, schedule(ref))
    if end < 1 or start >= r.steps:
        raise RequestError(FIELD, f"refiner_switch {r.refiner_switch:g} at {r.steps} steps gives the base {end} and "
                                  f"the refiner {r.steps - start} steps: each needs one at least (move the switch or "
                                  "raise steps)")
    return replace(base, end=end).to(pipe.device), schedule(ref, start).to(ref.device)


def prepare(pipe: Any, r: Any, given: Any) -> None:
    """The checks of a handoff against both models, before any work; RequestError naming the field."""
    from export.specs import check_size

    ref = refiner_of(pipe)
    ours, theirs = (pipe.dims.latent_channels, pipe.dims.vae_scale), (ref.dims.latent_channels, ref.dims.vae_scale)
    if ours != theirs:
        raise RequestError(FIELD, f"the refiner {ref.info.get('model')!r} takes latents of {theirs[0]} channels at "
                                  f"1/{theirs[1]} scale, the base makes {ours[0]} at 1/{ours[1]}")
    try:
        check_size(ref.dims, r.height, r.width, ref.profile.lo, ref.profile.hi)
        ref.check_memory(r.height, r.width, r.images, r.guidance_scale > 1)
        ref.text.read(second_request(ref, r))
        split(pipe, ref, r)
    except RequestError as exc:
        if exc.field == FIELD:
            raise
        raise RequestError(FIELD, f"the refiner {ref.info.get('model')!r}: {exc}") from None
    except ValueError as exc:  # the refiner's scheduler refusing the sampler or steps
        raise RequestError(FIELD, f"the refiner {ref.info.get('model')!r}: {exc}") from None


def run(pipe: Any, p: PreparedRequest, j: int, size: int, **kw: Any) -> list[Generated]:
    """The images of one prepared handoff request through the base `pipe` and its refiner, in batches of `size`."""
    r = p.request
    ref = refiner_of(pipe)
    first_schedule, second_schedule = split(pipe, ref, r)
    second = second_request(ref, r)
    texts = ref.text.read(second)
    ref.use_adapters(())
    rows = p.rows(j)
    step = min(size, ref.profile.hi.batch)
    out: list[Generated] = []
    for start in range(0, len(rows), step):
        batch = rows[start:start + step]
        latents, _, _ = pipe.run_batch(batch, p.cfg, decode=False, schedule=first_schedule, **kw)  # [B, C, h, w]
        rows2 = [replace(row, request=second, image=None, mask=None, controls=(), ip_image=None, texts=texts,
                         latents=latents[i:i + 1], noised=True) for i, row in enumerate(batch)]
        pixels, timings, graphed = ref.run_batch(rows2, p.cfg, schedule=second_schedule, **kw)
        for row, px in zip(batch, pixels, strict=True):
            done = pipe.result(row, px, graphed, timings)  # recorded as asked, with the refiner's name
            done.params["refiner"] = ref.info.get("model")
            out.append(done)
    return out
