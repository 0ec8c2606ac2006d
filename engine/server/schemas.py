"""The HTTP API's bodies (pydantic), their errors, and their conversion to `engine.request.Request`.

Two ways in: `GenerateBody` (POST /v1/generate: every Request field, JSON or multipart) and `ImagesBody`
(POST /v1/images/generations: OpenAI's Images API, with our fields as extra body fields). Field defaults
come from `Request`. Unknown fields are refused (400 naming the field), as are prompts with control
characters and base64 that is not an image. What only the loaded engines can judge (size against the
built profile, steps for the sampler, img2img without a VAE encoder) is checked by the app.
"""
from __future__ import annotations

import base64
import binascii
import io
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

import PIL.Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from engine.control import MAX_SCALE as MAX_CONTROL_SCALE
from engine.control import Control
from engine.hires import MAX_SCALE as MAX_HIRES_SCALE
from engine.ip_adapter import MAX_SCALE as MAX_IP_SCALE
from engine.lora import Adapter
from engine.request import MAX_CACHE_INTERVAL, MAX_SEED, MAX_STEPS, RANDOM_SEED, Request
from engine.sampler_registry import get as sampler_record
from engine.server.lora_dir import adapter_in_dir
from engine.tiling import MAX_OVERLAP
from export.families.ldm_layout import MAX_OBJECTS as MAX_LAYOUT_OBJECTS
from export.families.upscale import LOW_RES

_R = Request()
MAX_PROMPT_CHARS = 4000  # far past 4 chunks of 75 tokens (engine/prompts.py names the limit); longer is refused
MAX_GUIDANCE = 100.0
MAX_LORAS = 8  # adapters per request
MAX_LORA_SCALE = 10.0
MAX_CONTROLS = 4  # ControlNets per request
MAX_CLIP_SKIP = 48  # text encoder layers a clip skip may name (the engine checks its own encoder)
_CONTROL = Control(name="", image="")  # a ControlNet's defaults
MAX_SIDE = 8192  # pixels; the built profile is usually far smaller and is checked by the app
MAX_INPUT_PIXELS = 4096 * 4096  # decoded init image / mask
ALLOWED_CONTROL = "\t\n\r"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every answer other than 200 (OpenAI's error shape); the OpenAPI document's error schema."""

    error: ErrorDetail


class ApiError(Exception):
    """An answer other than 200: status, message, the field at fault (OpenAI's error shape)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _text(value: str | None) -> str | None:
    if value is None:
        return value
    bad = [c for c in value if (unicodedata.category(c) in ("Cc", "Cs") and c not in ALLOWED_CONTROL)]
    if bad:
        raise ValueError(f"contains control character {bad[0]!r} (U+{ord(bad[0]):04X}); only tab and newlines "
                         "are allowed")
    return value


def _sampler(value: str) -> str:
    sampler_record(value)  # ValueError naming the value and the registry's samplers
    return value


def _optional_sampler(value: str | None) -> str | None:
    return None if value is None else _sampler(value)


STRICT = ConfigDict(extra="forbid", strict=True)  # JSON types as sent: "seed": "7" or false is a 400, not 7 / 0


class _Common(BaseModel):
    model_config = STRICT

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(_R.negative_prompt, max_length=MAX_PROMPT_CHARS,
                                        description='null or absent: none (SDXL zeroes the unconditional half); "" '
                                        "is encoded like any text")
    steps: int = Field(_R.steps, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(_R.guidance_scale, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    seed: int = Field(_R.seed, ge=RANDOM_SEED, le=MAX_SEED, description="image k uses seed + k; -1 = random")
    prompt_syntax: Literal["a1111", "plain"] = Field(_R.prompt_syntax, description="a1111: (word:1.2), [word], "
                                                     "BREAK and chunks of 75 tokens as A1111 reads them; plain: the "
                                                     "text as it is")

    _check_text = field_validator("prompt", "negative_prompt")(_text)


class LoraRef(BaseModel):
    """One adapter of the server's --lora-dir, by file stem, and its scale."""

    model_config = STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=200,
                      description="file stem of a .safetensors in the server's --lora-dir")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)


def resolve_loras(refs: list[LoraRef], lora_dir: Path | None) -> tuple[Adapter, ...]:
    """Adapters for a request's `loras`, each file resolved inside `lora_dir` and parsed (engine/server/lora_dir.py);
    ValueError starting `loras:` naming the adapter, never a path, when the server will not use one."""
    if not refs:
        return ()
    if lora_dir is None:
        raise ValueError("loras: this server serves no LoRA adapters (start it with --lora-dir)")
    return tuple(adapter_in_dir(lora_dir, ref.name, ref.scale) for ref in refs)


_FORM_LORAS: TypeAdapter[list[LoraRef]] = TypeAdapter(Annotated[list[LoraRef], Field(max_length=MAX_LORAS)])


class LayoutObject(BaseModel):
    """One object of a layout-to-image model's layout: a label (a name of the model's, or its class id) and a box."""

    model_config = STRICT

    label: str | int = Field(description="a label of the model's (/v1/info), or its class id")
    box: tuple[float, float, float, float] = Field(description="[x0, y0, x1, y1]: fractions of the image when all "
                                                   "are within [0, 1], else pixels")


class ControlRef(BaseModel):
    """One ControlNet of the engines (built with engine.build --controlnet), its image and how it applies
    (engine.control.Control)."""

    model_config = STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64,
                      description="the ControlNet's name: the folder name it was built from")
    image: str | None = Field(None, description="the control image, base64 PNG/JPEG/WebP (or data URL); multipart: "
                              "null here and a `control_image` file part per net, in order")
    scale: float = Field(_CONTROL.scale, ge=0, le=MAX_CONTROL_SCALE, allow_inf_nan=False)
    start: float = Field(_CONTROL.start, ge=0, le=1, allow_inf_nan=False, description="fraction of the steps")
    end: float = Field(_CONTROL.end, ge=0, le=1, allow_inf_nan=False, description="fraction of the steps")
    preprocess: Literal["canny"] | None = Field(None, description="canny: make the map from an ordinary image")
    low: int = Field(_CONTROL.low, ge=0, le=255, description="canny low threshold")
    high: int = Field(_CONTROL.high, ge=0, le=255, description="canny high threshold")

    def to_control(self, image: PIL.Image.Image) -> Control:
        return Control(self.name, image, self.scale, self.start, self.end, self.preprocess, self.low, self.high)


_FORM_CONTROLS: TypeAdapter[list[ControlRef]] = TypeAdapter(
    Annotated[list[ControlRef], Field(max_length=MAX_CONTROLS)])


def _form_json(adapter: TypeAdapter, text: str, field: str, example: str) -> Any:
    """A multipart body's JSON-text field (`loras`, `controls`) validated as strictly as the JSON body's; ApiError 400
    naming the field (and the item's field) otherwise."""
    try:
        return adapter.validate_json(text)
    except ValidationError as err:
        errors = err.errors()
        if errors and errors[0].get("type") == "json_invalid":
            reason = errors[0].get("ctx", {}).get("error", errors[0].get("msg"))
            raise ApiError(400, f"{field}: the form field is not JSON ({reason}); send a JSON array such as "
                                f"{example}", field) from None
        raise validation_error([{**e, "loc": (field, *e.get("loc", ()))} for e in errors]) from None


def form_controls(text: str) -> list[ControlRef]:
    """A multipart body's `controls` field (images as `control_image` file parts, in order)."""
    return _form_json(_FORM_CONTROLS, text, "controls",
                      '[{"name": "edges", "scale": 0.8}] with one control_image file part per net')


def form_loras(text: str) -> list[LoraRef]:
    """A multipart body's `loras` field: `[{"name": "style", "scale": 0.8}]`."""
    return _form_json(_FORM_LORAS, text, "loras", '[{"name": "style", "scale": 0.8}]')


FORM_JSON = {"loras": form_loras, "controls": form_controls}  # multipart fields sent as JSON text


class GenerateBody(_Common):
    """POST /v1/generate: one Request."""

    prompt: str | None = Field(_R.prompt, max_length=MAX_PROMPT_CHARS, description="null or absent: none given (a "
                               "text model reads the default prompt; unconditional and class-conditional models "
                               "take none)")
    clip_skip: int | None = Field(_R.clip_skip, ge=1, le=MAX_CLIP_SKIP, description="A1111's clip skip (SD 1.x / "
                                  "2.x): 1 or null = the last layer, 2 = the penultimate")
    sampler: str = _R.sampler
    eta: float = Field(_R.eta, ge=0, le=1, allow_inf_nan=False, description="DDIM's eta: 0 deterministic, 1 "
                       "DDPM-like (other samplers take 0)")
    height: int | None = Field(_R.height, ge=1, le=MAX_SIDE, description="null = the engines' default size")
    width: int | None = Field(_R.width, ge=1, le=MAX_SIDE)
    images: int = Field(_R.images, ge=1, description="images for this prompt (at most the server's --max-images)")
    init_image: str | None = Field(None, description="img2img / inpainting source: base64 PNG/JPEG/WebP (or data URL)")
    strength: float | None = Field(_R.strength, gt=0, le=1)
    mask: str | None = Field(None, description="inpainting mask, base64 image; white = repaint")
    resize: bool = _R.resize
    original_size: tuple[int, int] | None = Field(None, description="SDXL time ids: [height, width]; null = the size")
    crop: tuple[int, int] | None = Field(None, description="SDXL time ids: crop top-left [top, left]; null = [0, 0]")
    target_size: tuple[int, int] | None = Field(None, description="SDXL time ids: [height, width]; null = the size")
    aesthetic_score: float | None = Field(None, allow_inf_nan=False, description="SDXL refiner; null = 6.0")
    negative_aesthetic_score: float | None = Field(None, allow_inf_nan=False, description="SDXL refiner; null = 2.5")
    noise_level: int | None = Field(None, ge=0, le=LOW_RES.max_noise_level, description="x4 upscaler: the noise "
                                    "added to init_image (the low-resolution image); null = "
                                    f"{LOW_RES.default_noise_level}")
    class_label: int | None = Field(_R.class_label, ge=0, description="class-conditional LDM: the class id, 0..n-1 "
                                    "(/v1/info says n); null = the unconditional class")
    semantic_map: str | None = Field(None, description="semantic synthesis LDM: a label image (PNG, mode L or P: one "
                                     "class id per pixel), base64 or a data URL, at the request's size")
    semantic_palette: dict[str, int] | None = Field(None, max_length=4096, description='with a colour semantic_map: '
                                                    '{"#rrggbb": class id} for each of its colours')
    layout: list[LayoutObject] | None = Field(None, max_length=MAX_LAYOUT_OBJECTS, description="layout-to-image LDM: "
                                              "the objects to place; null = none")
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS,
                                 description="LoRA adapters of the server's --lora-dir, merged without a rebuild")
    controls: list[ControlRef] = Field(default_factory=list, max_length=MAX_CONTROLS,
                                       description="ControlNets of the engines, each with its control image")
    guess_mode: bool = _R.guess_mode
    ip_image: str | None = Field(None, description="an image prompt (engines built with an IP-Adapter): base64 "
                                 "PNG/JPEG/WebP (or data URL), or a file part (multipart)")
    ip_scale: float = Field(_R.ip_scale, ge=0, le=MAX_IP_SCALE, description="the image prompt's weight; 0 = the "
                            "text-only image")
    vae_tiling: Literal["auto", "on", "off"] = Field(_R.vae_tiling, description="tiled VAE: auto = only where the "
                                                     "untiled decode would not fit in memory")
    vae_tile_size: int | None = Field(_R.vae_tile_size, ge=16, le=MAX_SIDE, description="pixels per tile side; "
                                      "null = the VAE's sample size")
    vae_tile_overlap: float = Field(_R.vae_tile_overlap, ge=0, lt=MAX_OVERLAP, description="share of a tile blended "
                                    "with each neighbour")
    hires_scale: float | None = Field(_R.hires_scale, gt=1, le=MAX_HIRES_SCALE, allow_inf_nan=False,
                                      description="A1111's hires fix: upscale the image by this, then img2img there")
    hires_steps: int | None = Field(_R.hires_steps, ge=1, le=MAX_STEPS, description="null = steps")
    hires_strength: float = Field(_R.hires_strength, gt=0, le=1, description="the second pass's denoising strength")
    hires_upscaler: Literal["latent", "latent-nearest", "lanczos", "x4"] = _R.hires_upscaler
    refiner_switch: float | None = Field(_R.refiner_switch, gt=0, lt=1, allow_inf_nan=False,
                                         description="SDXL: the share of the schedule the base runs; the refiner "
                                         "built beside it runs the rest")
    cache_interval: int = Field(_R.cache_interval, ge=1, le=MAX_CACHE_INTERVAL,
                                description="feature caching (engines built with --cache-branch): a full UNet step "
                                            "every N steps, its shallow graph between; 1 = every step in full")
    cache_schedule: Literal["uniform", "center"] = Field(_R.cache_schedule, description="where the full steps go")
    decoder: Literal["full", "tiny"] = Field(_R.decoder, description="what decodes the final images: the model's VAE, "
                                                                    "or the tiny VAE built with --tiny-vae")
    response_format: Literal["json", "png"] = "json"
    stream: bool = Field(False, description="answer with server-sent events: progress after every step, previews "
                                            "every preview_every steps, then the JSON answer as the `result` event")
    preview_every: int = Field(0, ge=0, le=MAX_STEPS, description="with stream: a preview image every K steps "
                                                                  "(0 = progress only)")

    _check_sampler = field_validator("sampler")(_sampler)

    def to_request(self, init_image: PIL.Image.Image | None = None, mask: PIL.Image.Image | None = None,
                   lora_dir: Path | None = None, control_images: list[PIL.Image.Image] | None = None,
                   ip_image: PIL.Image.Image | None = None) -> Request:
        controls = tuple(ref.to_control(img) for ref, img in zip(self.controls, control_images or [], strict=True))
        return Request(loras=resolve_loras(self.loras, lora_dir), controls=controls, guess_mode=self.guess_mode,
                       ip_image=ip_image, ip_scale=self.ip_scale, prompt_syntax=self.prompt_syntax,
                       clip_skip=self.clip_skip, vae_tiling=self.vae_tiling, vae_tile_size=self.vae_tile_size,
                       vae_tile_overlap=self.vae_tile_overlap, hires_scale=self.hires_scale,
                       hires_steps=self.hires_steps, hires_strength=self.hires_strength,
                       hires_upscaler=self.hires_upscaler, refiner_switch=self.refiner_switch,
                       cache_interval=self.cache_interval, cache_schedule=self.cache_schedule, decoder=self.decoder,
                       prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                       guidance_scale=self.guidance_scale, sampler=self.sampler, eta=self.eta, seed=self.seed,
                       height=self.height,
                       width=self.width, images=self.images, init_image=init_image, strength=self.strength,
                       mask=mask, resize=self.resize, original_size=self.original_size, crop=self.crop,
                       target_size=self.target_size, aesthetic_score=self.aesthetic_score,
                       negative_aesthetic_score=self.negative_aesthetic_score, noise_level=self.noise_level,
                       class_label=self.class_label,
                       semantic_map=None if self.semantic_map is None else decode_image(self.semantic_map,
                                                                                        "semantic_map"),
                       semantic_palette=self.semantic_palette,
                       layout=None if self.layout is None else [o.model_dump() for o in self.layout])


class ImagesBody(_Common):
    """POST /v1/images/generations: OpenAI's Images API; model, quality, style and user are accepted and ignored."""

    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description='"WIDTHxHEIGHT"; null or "auto" = the engines\' default size')
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="url (the default, as OpenAI's): a link to GET /v1/images/files/{name}, deleted after the "
        "server's --image-ttl-s; b64_json: the PNG in the answer")
    output_format: Literal["png"] | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    sampler: str | None = Field(None, description="extra body field (OpenAI has none), as /v1/generate names it; "
                                "null = `scheduler`, else the default sampler")
    scheduler: str | None = Field(None, description="the same as `sampler` (its earlier name here); both given "
                                  "must agree")

    _check_sampler = field_validator("sampler", "scheduler")(_optional_sampler)

    @model_validator(mode="after")
    def _one_sampler(self) -> ImagesBody:
        if self.sampler is not None and self.scheduler is not None and self.sampler != self.scheduler:
            raise ValueError(f"sampler {self.sampler!r} and scheduler {self.scheduler!r} disagree: they are one "
                             "field (scheduler is its other name); send one")
        return self

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            parse_size(value)
        return value

    def to_request(self) -> Request:
        width, height = parse_size(self.size) if self.size not in (None, "auto") else (None, None)
        return Request(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                       prompt_syntax=self.prompt_syntax,
                       guidance_scale=self.guidance_scale, sampler=self.sampler or self.scheduler or _R.sampler,
                       seed=self.seed, height=height,
                       width=width, images=self.n)


class ImageData(BaseModel):
    """One image of an Images API answer: `url` or `b64_json`, as the request's response_format asked."""

    url: str | None = Field(None, description="PNG at GET /v1/images/files/{name}; gone after --image-ttl-s")
    b64_json: str | None = Field(None, description="the PNG, base64")


class ImagesAnswer(BaseModel):
    """POST /v1/images/generations' answer (OpenAI's shape)."""

    created: int
    data: list[ImageData]


def parse_size(size: str) -> tuple[int, int]:
    """(width, height) of "WIDTHxHEIGHT"."""
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 5 for p in parts):
        raise ValueError(f"size {size!r} must be WIDTHxHEIGHT in pixels, e.g. 512x512")
    width, height = int(parts[0]), int(parts[1])
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"size {size!r}: each side must be in [1, {MAX_SIDE}]")
    return width, height


B64_PIECE = 1 << 20  # characters of base64 decoded at once (a multiple of 4)


def b64decode_in_pieces(text: str) -> bytes:
    """Strict base64, decoded a piece at a time: binascii holds the GIL for a whole call (about 50 ms for 16 MB), and
    between pieces the event loop's thread gets its turn (binascii.Error as b64decode's)."""
    if len(text) <= B64_PIECE:
        return base64.b64decode(text, validate=True)
    if len(text) % 4 or "=" in text[:-2]:  # padding only at the very end, as one call would insist
        raise binascii.Error("incorrect padding")
    return b"".join(base64.b64decode(text[i:i + B64_PIECE], validate=True) for i in range(0, len(text), B64_PIECE))


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what uploads may be (PIL's format names); the 400 names them


def decode_image(data: str | bytes, field: str) -> PIL.Image.Image:
    """A decoded image from base64 text (a data URL is fine) or raw file bytes; ApiError 400 naming `field`."""
    if isinstance(data, str):
        text = data
        if data.startswith("data:"):
            header, comma, text = data.partition(",")
            if not comma:
                raise ApiError(400, f"{field} is a data URL without data: expected 'data:image/png;base64,<base64>'",
                               field)
        try:
            data = b64decode_in_pieces(text)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{field} is not valid base64", field) from None
    try:
        with PIL.Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:  # TIFF, BMP, GIF, ...: refused
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise ApiError(400, f"{field} is {img.width}x{img.height}; at most {MAX_INPUT_PIXELS} pixels", field)
            img.load()
            return img.copy()
    except PIL.UnidentifiedImageError:
        raise ApiError(400, f"{field} is not an image (PNG, JPEG or WebP)", field) from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ApiError(400, f"{field} is not a readable image ({reason})", field) from exc


def validation_error(err: ValidationError | list[dict[str, Any]]) -> ApiError:
    """400 naming the first bad field of a pydantic / FastAPI validation error."""
    errors = err.errors() if isinstance(err, ValidationError) else err
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return ApiError(400, f"malformed JSON body: {reason}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "missing":
        msg = "field required"
    return ApiError(400, f"{param}: {msg}" if param else msg, param)
