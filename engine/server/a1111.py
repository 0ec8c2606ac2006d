"""AUTOMATIC1111's web UI API, the part its clients use (`/sdapi/v1/...`), on the server's own generation path.

POST txt2img / img2img become the same `Request` as POST /v1/generate (built through `GenerateBody`, so every
check and default is that route's) and run through `ServerState.generate`; `<lora:name:weight>` prompt tags name
adapters of --lora-dir. `batch_size` x `n_iter` images take seeds seed, seed + 1, ... (seed -1 draws one). An
option A1111 turns off by default is accepted when off and ignored; one asking for what this server cannot do
(face restoration, variation seeds, scripts, ...) is a 400 naming the field, the value and what is
allowed (`OFF_ONLY`). Unknown fields are ignored, as A1111 clients send many. GET sd-models, samplers, loras,
options, progress and scripts answer in A1111's shapes without server paths.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import PIL.Image
import PIL.ImageOps
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request as HttpRequest

from engine import refiner
from engine.hires import UPSCALERS as HIRES_UPSCALERS
from engine.png import model_name, parameters_text, png_bytes
from engine.request import MAX_SEED, RANDOM_SEED, Generated, RequestError
from engine.sampler_registry import REGISTRY, Sampler
from engine.server.openapi import ROUTE_ERRORS
from engine.server.schemas import ApiError, GenerateBody, LoraRef, validation_error

if TYPE_CHECKING:
    from engine.server.app import ServerState

PREFIX = "/sdapi/v1"
ROUTES = ("/txt2img", "/img2img", "/sd-models", "/samplers", "/loras", "/embeddings", "/options", "/progress", "/scripts")
RANDOM_SEED_BELOW = 2**32  # seed -1 draws below this, as A1111 does
# Request / GenerateBody field -> the A1111 field a client sent it as (errors name the client's field)
A1111_FIELDS = {"guidance_scale": "cfg_scale", "sampler": "sampler_name", "images": "batch_size",
                "strength": "denoising_strength", "init_image": "init_images", "loras": "prompt",
                "resize": "resize_mode", "refiner_switch": "refiner_switch_at", "hires_scale": "hr_scale",
                "hires_steps": "hr_second_pass_steps", "hires_strength": "denoising_strength",
                "hires_upscaler": "hr_upscaler"}
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network prompt tag: <kind:arguments>
AUTOMATIC = ("", "automatic")  # `scheduler` values that keep the sampler's own schedule
# the eta our table of a sampler's scheduler class runs with, where A1111's eta changes that sampler and ours takes
# none (DDIM takes A1111's eta: Sampler.takes_eta)
FIXED_ETA = {"EulerAncestralDiscreteScheduler": 1.0}


def _falsy(value: Any) -> bool:
    return not value


@dataclass(frozen=True)
class OffOnly:
    """An A1111 option this server runs only in its "off" state: `off(value)` says a value is that state."""

    field: str
    allowed: str
    off: Callable[[Any], bool] = _falsy
    with_mask: bool = False  # checked only when a mask is given (inpainting)
    with_hr: bool = False  # checked only with enable_hr (the hires fix)


OFF_ONLY = (
    OffOnly("hr_resize_x", "0 (the target is hr_scale times the size)", lambda v: v == 0, with_hr=True),
    OffOnly("hr_resize_y", "0 (the target is hr_scale times the size)", lambda v: v == 0, with_hr=True),
    OffOnly("hr_checkpoint_name", "null (the second pass runs the same model)", with_hr=True),
    OffOnly("hr_sampler_name", "null (the second pass runs the first's sampler)", with_hr=True),
    OffOnly("hr_scheduler", "null or automatic (the first pass's schedule)",
            lambda v: (v or "").strip().lower() in AUTOMATIC, with_hr=True),
    OffOnly("hr_prompt", "\"\" (the second pass takes the prompt)", with_hr=True),
    OffOnly("hr_negative_prompt", "\"\" (the second pass takes the negative prompt)", with_hr=True),
    OffOnly("restore_faces", "false or null (no face restoration)"),
    OffOnly("tiling", "false or null (no tiling)"),
    OffOnly("subseed_strength", "0 (no variation seeds)", lambda v: v == 0),
    OffOnly("seed_resize_from_h", "-1 or 0 (no seed resize)", lambda v: v <= 0),
    OffOnly("seed_resize_from_w", "-1 or 0 (no seed resize)", lambda v: v <= 0),
    OffOnly("styles", "[] (this server has no saved styles)"),
    OffOnly("script_name", "null (no scripts)"),
    OffOnly("alwayson_scripts", "{} (no extensions)"),
    OffOnly("s_churn", "0", lambda v: v == 0),
    OffOnly("s_noise", "1", lambda v: v == 1),
    OffOnly("s_min_uncond", "0", lambda v: v == 0),
    OffOnly("save_images", "false (nothing is saved on the server: the images are in the answer)"),
    OffOnly("resize_mode", "0 (just resize)", lambda v: v == 0),
    OffOnly("initial_noise_multiplier", "null or 1", lambda v: v is None or v == 1),
    OffOnly("mask_blur", "0 (the mask is used as sent, binarised)", lambda v: not v, with_mask=True),
    OffOnly("inpainting_fill", "1 (original: the masked area starts from the init image)", lambda v: v == 1,
            with_mask=True),
    OffOnly("inpaint_full_res", "false (whole picture)", with_mask=True),
)
OVERRIDES_HONOURED = {"CLIP_stop_at_last_layers": (1,)}  # override_settings we already run; plus our checkpoint


class _Common(BaseModel):
    """What txt2img and img2img share; defaults are A1111's documented ones, except the size (null = the
    engines' default size)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(RANDOM_SEED, ge=RANDOM_SEED, le=MAX_SEED, description="-1 = random")
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, description="an A1111 name of GET /sdapi/v1/samplers")
    sampler_index: str = Field("Euler", description="deprecated: used when sampler_name is null")
    scheduler: str | None = Field(None, description="automatic (the sampler's own), or karras where listed")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="null = the engines' default size")
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    s_churn: float = 0.0
    s_noise: float = 1.0
    s_min_uncond: float = 0.0
    override_settings: dict[str, Any] = Field(default_factory=dict)
    refiner_checkpoint: str | None = Field(None, description="the SDXL refiner built beside the model; with "
                                           "refiner_switch_at")
    refiner_switch_at: float | None = Field(None, description="the share of the steps the base runs, (0, 1)")
    disable_extra_networks: bool = False
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False


class Txt2ImgBody(_Common):
    """POST /sdapi/v1/txt2img (denoising_strength and the hr_* fields only matter with enable_hr: the hires fix,
    engine/hires.py)."""

    enable_hr: bool = False
    denoising_strength: float = 0.75
    hr_scale: float = 2.0
    hr_upscaler: str | None = Field(None, description=f"one of {', '.join(HIRES_UPSCALERS.values())}; null = Latent")
    hr_second_pass_steps: int = Field(0, ge=0, description="0 = steps")
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgBody(_Common):
    """POST /sdapi/v1/img2img: the first init image, and a mask for inpainting (white = repaint)."""

    init_images: list[str] = Field(min_length=1, max_length=1, description="one base64 image (or data URL)")
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int | None = 4  # A1111's blur when omitted
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    """txt2img / img2img's answer: base64 PNGs (with their `parameters` text chunk), the request's fields, and
    `info`, a JSON string."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


@dataclass
class Info:
    """The `info` JSON of an answer, in A1111's keys."""

    prompt: str
    negative_prompt: str
    seed: int
    all_seeds: list[int]
    subseed: int
    all_subseeds: list[int]
    sampler_name: str
    cfg_scale: float
    steps: int
    width: int
    height: int
    batch_size: int
    infotexts: list[str]
    all_prompts: list[str]
    all_negative_prompts: list[str]
    sd_model_name: str | None
    denoising_strength: float | None = None
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1
    seed_resize_from_h: int = -1
    restore_faces: bool = False
    sd_model_hash: str | None = None  # no checkpoint file hash is known (engine/png.py)
    styles: list[str] = field(default_factory=list)
    index_of_first_image: int = 0
    clip_skip: int = 1
    extra_generation_params: dict[str, Any] = field(default_factory=dict)
    job_timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))


@dataclass
class Job:
    """A txt2img / img2img in progress: iterations done of n_iter (the step is the server state's)."""

    kind: str
    total: int
    steps: int
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    done: int = 0


def _refuse(name: str, value: Any, allowed: str) -> ApiError:
    shown = repr(sorted(value) if isinstance(value, dict) else value)[:80]
    return ApiError(400, f"{name} {shown} is not supported by this server; allowed: {allowed}", name)


def check_off(body: _Common) -> None:
    """ApiError 400 for the first option set to something this server cannot run (`OFF_ONLY`)."""
    has_mask, hires = getattr(body, "mask", None) is not None, bool(getattr(body, "enable_hr", False))
    for rule in OFF_ONLY:
        if rule.field in type(body).model_fields and (has_mask or not rule.with_mask) and (hires or not rule.with_hr):
            value = getattr(body, rule.field)
            if not rule.off(value):
                raise _refuse(rule.field, value, rule.allowed)
    for key, value in body.override_settings.items():
        honoured = OVERRIDES_HONOURED.get(key, ())
        if key == "sd_model_checkpoint" or value in honoured:
            continue  # the checkpoint is checked against ours by the route
        raise _refuse(f"override_settings.{key}", value, ", ".join(
            f"{k} {v[0]!r}" for k, v in OVERRIDES_HONOURED.items()) + ", sd_model_checkpoint (this model)")


def pick_sampler(body: _Common) -> Sampler:
    """The registry record `sampler_name` (else `sampler_index`) names, with `scheduler`; A1111 names (any case)
    or ours. ApiError 400 naming the field and the allowed names."""
    name_field = "sampler_name" if body.sampler_name else "sampler_index"
    asked = (body.sampler_name or body.sampler_index).strip()
    known = {s.a1111_name.lower(): s for s in REGISTRY.values()} | dict(REGISTRY)
    record = known.get(asked.lower()) or known.get(asked)
    if record is None:
        raise _refuse(name_field, asked, ", ".join(s.a1111_name for s in REGISTRY.values()))
    scheduler = (body.scheduler or "").strip().lower()
    if scheduler not in AUTOMATIC:
        karras_name = record.a1111_name.removesuffix(" Karras") + " Karras"
        karras = known.get(karras_name.lower()) if scheduler == "karras" else None
        if karras is None:
            with_karras = [s.a1111_name.removesuffix(" Karras") for s in REGISTRY.values()
                           if s.a1111_name.endswith(" Karras")]
            raise _refuse("scheduler", body.scheduler, f"automatic; karras with {', '.join(with_karras)}")
        record = karras
    fixed = FIXED_ETA.get(record.scheduler)
    if body.eta is not None and fixed is not None and body.eta != fixed:
        raise _refuse("eta", body.eta, f"null or {fixed:g} (this server's {record.a1111_name} runs with eta "
                                       f"{fixed:g})")
    return record


def lora_tags(prompt: str, enabled: bool) -> tuple[str, list[dict[str, Any]]]:
    """The prompt without its extra-network tags, and the `loras` (/v1/generate's) of its `<lora:name:weight>` tags
    (none when `enabled` is false); ApiError 400 naming `prompt` and the tag for any other tag or a bad one."""
    loras = []
    for match in EXTRA_NETWORK.finditer(prompt):
        tag, kind, args = match.group(0), match.group(1), match.group(2).split(":")
        if kind != "lora" or len(args) > 2:
            raise ApiError(400, f"prompt: {tag!r} is not supported; allowed: <lora:name> or <lora:name:weight> "
                                "(one weight, no other extra networks)", "prompt")
        try:
            ref = LoraRef.model_validate({"name": args[0].strip(), "scale": float(args[1]) if args[1:] else 1.0})
        except ValueError as err:  # a weight that is not a number, or pydantic's ValidationError
            reason = validation_error(err).message if isinstance(err, ValidationError) else "weight is not a number"
            raise ApiError(400, f"prompt: {tag!r}: {reason}", "prompt") from None
        loras.append(ref.model_dump())
    return EXTRA_NETWORK.sub("", prompt).strip(), loras if enabled else []


def _renamed(err: ApiError) -> ApiError:
    """`err` naming the client's A1111 field instead of ours (`loras.0.name` -> `prompt`)."""
    param = (err.param or "").split(".")[0]
    if param not in A1111_FIELDS:
        return err
    message = err.message.removeprefix(f"{err.param}:").removeprefix(f"{param}:").strip()
    return ApiError(err.status, f"{A1111_FIELDS[param]}: {message}", A1111_FIELDS[param])


def hires_fields(body: _Common) -> dict[str, Any]:
    """The /v1/generate hires fields of a txt2img body with enable_hr (none without); ApiError 400 naming
    hr_upscaler for an upscaler we do not have."""
    if not isinstance(body, Txt2ImgBody) or not body.enable_hr:
        return {}
    names = {v.lower(): k for k, v in HIRES_UPSCALERS.items()}
    upscaler = names.get((body.hr_upscaler or "Latent").strip().lower())
    if upscaler is None:
        raise _refuse("hr_upscaler", body.hr_upscaler, ", ".join(HIRES_UPSCALERS.values()))
    return {"hires_scale": body.hr_scale, "hires_steps": body.hr_second_pass_steps or None,
            "hires_strength": body.denoising_strength, "hires_upscaler": upscaler}


def _generate_body(body: _Common, sampler: Sampler, prompt: str, loras: list[dict[str, Any]], seed: int,
                   strength: float | None, refiner_switch: float | None = None) -> GenerateBody:
    """The /v1/generate body of one iteration (batch_size images from `seed`); its checks, our field names
    renamed to the client's."""
    fields: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": body.negative_prompt, "steps": body.steps,
        "guidance_scale": float(body.cfg_scale), "sampler": sampler.name, "seed": seed, "height": body.height,
        "width": body.width, "images": body.batch_size, "loras": loras, "refiner_switch": refiner_switch,
        "eta": float(body.eta or 0.0) if sampler.takes_eta else 0.0, **hires_fields(body)}
    if strength is not None:
        fields.update(strength=float(strength), resize=True)  # resize_mode 0: just resize, as A1111
    try:
        return GenerateBody.model_validate(fields)
    except ValidationError as err:
        raise _renamed(validation_error(err)) from None


def add_a1111_routes(app: FastAPI, state: ServerState) -> None:
    """Register /sdapi/v1/* on `app`, generating through `state`."""
    jobs: list[Job] = []

    def checkpoint() -> str:
        if state.pipeline is None:
            raise ApiError(503, "engines not loaded yet", kind="unavailable", headers={"Retry-After": "1"})
        return model_name(state.pipeline.info.get("model")) or "model"

    async def images(http: HttpRequest, body: _Common, kind: str, init: PIL.Image.Image | None,
                     mask: PIL.Image.Image | None, strength: float | None) -> ImagesResponse:
        wanted = body.override_settings.get("sd_model_checkpoint")
        if wanted is not None and wanted != checkpoint():
            raise _refuse("override_settings.sd_model_checkpoint", wanted, f"{checkpoint()!r} (the model served)")
        sampler = pick_sampler(body)
        switch = await refiner_switch(body)
        total = body.batch_size * body.n_iter
        if total > state.config.max_images:
            raise ApiError(400, f"batch_size x n_iter = {total} images is over this server's limit (--max-images "
                                f"{state.config.max_images})", "n_iter")
        prompt, loras = lora_tags(body.prompt, not body.disable_extra_networks)
        seed = secrets.randbelow(RANDOM_SEED_BELOW) if body.seed == RANDOM_SEED else body.seed
        job = Job(kind, body.n_iter, body.steps)
        jobs.append(job)
        made: list[Generated] = []
        try:
            for i in range(body.n_iter):
                one = _generate_body(body, sampler, prompt, loras, seed + i * body.batch_size, strength, switch)
                try:
                    request = one.to_request(init, mask, state.config.lora_dir)
                except ValueError as exc:  # a tag naming no adapter of --lora-dir
                    raise ApiError(400, f"prompt: {str(exc).removeprefix('loras: ')}", "prompt") from None
                try:
                    outcome = await state.generate(http, request, A1111_FIELDS)
                except ApiError as err:
                    raise _renamed(err) from None
                made += outcome.images
                job.done = i + 1
        finally:
            jobs.remove(job)
        pngs = await asyncio.to_thread(lambda: [png_bytes(g.pixels, g.params) for g in made])
        first = made[0].params
        subseeds = [body.subseed + k if body.subseed >= 0 else -1 for k in range(total)]
        info = Info(prompt=body.prompt, negative_prompt=body.negative_prompt, seed=seed,
                    all_seeds=[g.params["seed"] for g in made], subseed=subseeds[0], all_subseeds=subseeds,
                    sampler_name=sampler.a1111_name, cfg_scale=body.cfg_scale, steps=body.steps,
                    width=first["width"], height=first["height"], batch_size=body.batch_size,
                    infotexts=[parameters_text(g.params) for g in made], all_prompts=[body.prompt] * total,
                    all_negative_prompts=[body.negative_prompt] * total, sd_model_name=checkpoint(),
                    denoising_strength=first.get("strength", first.get("hires_strength")))
        echo = body.model_dump()
        if isinstance(body, Img2ImgBody) and not body.include_init_images:
            echo.update(init_images=None, mask=None)
        encoded = [base64.b64encode(p).decode() for p in pngs] if body.send_images else []
        return ImagesResponse(images=encoded, parameters=echo, info=json.dumps(asdict(info)))

    async def refiner_switch(body: _Common) -> float | None:
        """The handoff A1111's refiner fields ask for (None: no refiner); ApiError 400 naming refiner_checkpoint
        when it is not the refiner beside the served model (engine/refiner.py)."""
        if body.refiner_checkpoint is None:
            return None
        if body.refiner_switch_at is None:
            raise ApiError(400, "refiner_checkpoint needs refiner_switch_at, the share of the steps the base runs",
                           "refiner_switch_at")
        checkpoint()  # 503 until the engines are loaded
        assert state.pipeline is not None
        try:
            ref = await asyncio.to_thread(refiner.refiner_of, state.pipeline)
        except RequestError as exc:
            raise ApiError(400, f"refiner_checkpoint: {exc}", "refiner_checkpoint") from None
        name = model_name(ref.info.get("model"))
        if body.refiner_checkpoint not in (name, ref.info.get("model")):
            raise _refuse("refiner_checkpoint", body.refiner_checkpoint, f"{name!r} (the refiner beside the model)")
        return body.refiner_switch_at

    generate_docs: dict[str, Any] = {"responses": ROUTE_ERRORS["generate"], "response_model": ImagesResponse}

    @app.post(PREFIX + "/txt2img", **generate_docs)
    async def txt2img(body: Txt2ImgBody, http: HttpRequest) -> ImagesResponse:
        """AUTOMATIC1111's txt2img: the same images as POST /v1/generate for the same prompt, seed and settings."""
        check_off(body)
        return await images(http, body, "txt2img", None, None, None)

    @app.post(PREFIX + "/img2img", **generate_docs)
    async def img2img(body: Img2ImgBody, http: HttpRequest) -> ImagesResponse:
        """AUTOMATIC1111's img2img: init_images[0] and denoising_strength, and with `mask` inpainting (mask_blur 0,
        inpainting_fill 1, inpaint_full_res false; inpainting_mask_invert 1 repaints the black area)."""
        check_off(body)
        state.admit()  # before any decoding: 503 / 429 as the generation would answer
        init = await state.decode(body.init_images[0], "init_images")
        mask = await state.decode(body.mask, "mask") if body.mask is not None else None
        if mask is not None and body.inpainting_mask_invert:
            mask = PIL.ImageOps.invert(mask.convert("L"))
        return await images(http, body, "img2img", init, mask, body.denoising_strength)

    @app.get(PREFIX + "/sd-models", responses=ROUTE_ERRORS["info"])
    async def sd_models() -> list[dict[str, Any]]:
        """The served model (A1111's shape; no file path or checkpoint hash is known or given)."""
        name = checkpoint()
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]

    @app.get(PREFIX + "/samplers", responses=ROUTE_ERRORS["read"])
    async def samplers() -> list[dict[str, Any]]:
        """Every sampler by its A1111 name; our name is its alias."""
        return [{"name": s.a1111_name, "aliases": [s.name], "options": {}} for s in REGISTRY.values()]

    @app.get(PREFIX + "/loras", responses=ROUTE_ERRORS["read"])
    async def loras() -> list[dict[str, Any]]:
        """The adapters of --lora-dir, for <lora:name:weight> tags (file names only, never the folder)."""
        folder = state.config.lora_dir
        files = await asyncio.to_thread(lambda: sorted(folder.glob("*.safetensors")) if folder else [])
        return [{"name": p.stem, "alias": p.stem, "path": p.name, "metadata": {}} for p in files]

    @app.get(PREFIX + "/embeddings", responses=ROUTE_ERRORS["info"])
    async def embeddings() -> dict[str, Any]:
        """The textual-inversion embeddings of --embeddings-dir, in A1111's shape (`shape`: the first text
        encoder's width; no training step or checkpoint is known)."""
        checkpoint()  # 503 until the engines are loaded
        assert state.pipeline is not None
        loaded = {e.name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                           "shape": int(next(iter(e.vectors.values())).shape[1]), "vectors": e.count}
                  for e in state.pipeline.text.embeddings.values()}
        return {"loaded": loaded, "skipped": {}}

    @app.get(PREFIX + "/options", responses=ROUTE_ERRORS["info"])
    async def options() -> dict[str, Any]:
        """The settings A1111 clients read: the checkpoint and what the images are written with."""
        return {"sd_model_checkpoint": checkpoint(), "sd_checkpoint_hash": None, "CLIP_stop_at_last_layers": 1,
                "samples_format": "png", "enable_pnginfo": True}

    @app.get(PREFIX + "/progress", responses=ROUTE_ERRORS["read"])
    async def progress() -> dict[str, Any]:
        """The oldest txt2img / img2img in progress: its iterations done of n_iter and the running batch's step
        (request batching; step batching reports no step); no preview image; all zero when idle."""
        job = jobs[0] if jobs else None
        step, steps = state.step_progress or (0, job.steps if job else 0)
        state_json = {"skipped": False, "interrupted": False, "job": job.kind if job else "",
                      "job_count": job.total if job else 0, "job_timestamp": job.timestamp if job else "0",
                      "job_no": job.done if job else 0, "sampling_step": step, "sampling_steps": steps}
        fraction = (job.done + (step / steps if steps else 0.0)) / job.total if job else 0.0
        return {"progress": min(1.0, fraction), "eta_relative": 0.0, "state": state_json, "current_image": None,
                "textinfo": None}

    @app.get(PREFIX + "/scripts", responses=ROUTE_ERRORS["read"])
    async def scripts() -> dict[str, list[str]]:
        """No scripts or extensions (clients such as webuiapi ask at start)."""
        return {"txt2img": [], "img2img": []}
