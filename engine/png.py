"""Image output that carries its generation parameters, in AUTOMATIC1111's `parameters` format.

The format follows the path's suffix (`IMAGE_FORMATS`): PNG carries the A1111 text in a `parameters`
text chunk plus our full record as JSON in an `sd_engine` chunk; JPEG and WebP carry the A1111 text in
EXIF UserComment (tag 0x9286 in the Exif IFD, "UNICODE\\0" + UTF-16-BE, as A1111 writes it with piexif).
Every write is atomic (a temp file in the same folder, then os.replace) and leaves a 0o644 file.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from engine.hires import UPSCALERS as HIRES_NAMES
from engine.sampler_registry import REGISTRY

# suffix -> Pillow format; anything else is refused
IMAGE_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 95  # JPEG / WebP quality (Pillow's default is 75)
EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment lives
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\0"  # the EXIF character-code header piexif writes for encoding="unicode"

# our sampler names -> A1111's display names, read from each sampler's record
SAMPLER_NAMES: dict[str, str] = {name: sampler.a1111_name for name, sampler in REGISTRY.items()}
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


# ---- the A1111 `parameters` text ----

def quote(value: Any) -> str:
    """A1111's infotext quoting: JSON-quote a value that would break the `Key: value, ...` line.

    A1111 quotes values containing `,`, `:` or a newline; we also quote a `"` so that a value that
    happens to start and end with quotes is not unquoted by the reader.
    """
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def model_name(model: Any) -> str | None:
    """A1111's `Model` value: the checkpoint's name without folder or extension (None stays None)."""
    if model is None:
        return None
    name = Path(str(model)).name or str(model)
    for suffix in _CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def infotext_fields(params: dict[str, Any]) -> dict[str, Any]:
    """The `Key: value` pairs of the last line, in A1111's order; keys we have no value for are omitted."""
    height, width = params.get("height"), params.get("width")
    sampler = params.get("sampler")
    fields = {
        "Steps": params.get("steps"),
        "Sampler": SAMPLER_NAMES.get(sampler, sampler) if sampler is not None else None,
        "CFG scale": params.get("guidance_scale"),
        "Seed": params.get("seed"),
        "Size": f"{width}x{height}" if height is not None and width is not None else None,
        # A1111: the first 10 hex digits of the checkpoint file's sha256. The pipeline's params carry
        # no such hash (the engine's keys hash weights *and* build options), so it is written only when
        # a caller supplies `model_hash`; a made-up hash would mislead tools that look models up by it.
        "Model hash": params.get("model_hash"),
        "Model": model_name(params.get("model")),
        "Denoising strength": params.get("strength", params.get("hires_strength") if params.get("hires_scale")
                                         else None),  # img2img / inpainting; or the hires fix's second pass
        "Hires upscale": params.get("hires_scale"),  # A1111's hires fix: both passes
        "Hires steps": params.get("hires_steps") if params.get("hires_scale") else None,  # given (A1111: 0 = steps)
        "Hires upscaler": HIRES_NAMES.get(params.get("hires_upscaler", "")) if params.get("hires_scale") else None,
        # A1111's record of a refiner: its checkpoint and the share of the steps the base ran
        "Refiner": model_name(params.get("refiner")) if params.get("refiner_switch") else None,
        "Refiner switch at": params.get("refiner_switch"),
        "Clip skip": params.get("clip_skip") if (params.get("clip_skip") or 1) > 1 else None,  # as A1111: from 2
        "Noise level": params.get("noise_level"),  # the x4 upscaler's (A1111 has none: the key says what it is)
        "Class label": params.get("class_label"),  # a class-conditional LDM's (A1111 has none either)
        "Eta": params.get("eta") or None,  # DDIM's, where it drew noise (A1111 writes "Eta" where it is not 0)
        "VAE": params.get("vae"),  # A1111's: a VAE other than the checkpoint's (here the tiny decoder)
        "Cache interval": params.get("cache_interval"),  # feature caching (DeepCache), where it ran
        "Cache schedule": params.get("cache_schedule"),
        # A1111's record of the adapters: `Lora hashes: "name: hash, name: hash"` (the prompt carries <lora:..>)
        "Lora hashes": ", ".join(f"{a['name']}: {a['hash']}" for a in params["loras"]) if params.get("loras") else None,
        # and of the textual-inversion embeddings the prompts used: `TI hashes: "name: hash"`, the name without : or ,
        "TI hashes": ", ".join(f"{re.sub('[:,]', '', n)}: {h}" for n, h in params["embeddings"].items())
        if params.get("embeddings") else None,
    }
    for j, c in enumerate(params.get("controls") or ()):  # sd-webui-controlnet's record of each unit
        mode = "ControlNet is more important" if params.get("guess_mode") else "Balanced"
        fields[f"ControlNet {j}"] = (f"Module: {c.get('preprocess') or 'none'}, Model: {c['name']}, Weight: "
                                     f"{c['scale']:g}, Guidance Start: {c['start']:g}, Guidance End: {c['end']:g}, "
                                     f"Control Mode: {mode}")
    if params.get("ip_adapter"):  # an image prompt: sd-webui-controlnet records it as one more unit
        j = len(params.get("controls") or ())
        fields[f"ControlNet {j}"] = (f"Module: ip-adapter_clip, Model: {params['ip_adapter']}, Weight: "
                                     f"{params.get('ip_scale', 1.0):g}, Guidance Start: 0, Guidance End: 1")
    return {k: v for k, v in fields.items() if v is not None}


def parameters_text(params: dict[str, Any]) -> str:
    """A1111's infotext: the prompt, `Negative prompt: ...` when there is one, then `Key: value, ...`."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in infotext_fields(params).items())
    negative = params.get("negative_prompt") or ""
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    tags = "".join(f" <lora:{a['name']}:{a['scale']:g}>" for a in params.get("loras") or ())  # A1111's convention
    return f"{params.get('prompt', '')}{tags}{negative_line}\n{line}".strip()


# ---- writers ----

def image_format(path: Path) -> str:
    """The Pillow format `path`'s suffix names; ValueError naming the suffix and the allowed ones."""
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write {path}: suffix {path.suffix or '(none)'!r} is not an image format; "
                         f"allowed: {', '.join(IMAGE_FORMATS)}")
    return fmt


def user_comment(text: str) -> bytes:
    """EXIF UserComment bytes as piexif.helper.UserComment.dump(text, encoding="unicode") makes them."""
    return UNICODE_PREFIX + text.encode("utf-16-be")


def exif_with_parameters(params: dict[str, Any]):
    """A Pillow `Image.Exif` holding the A1111 text as UserComment in the Exif IFD."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(parameters_text(params))
    return exif


def save_image(pixels: np.ndarray, path: str | Path, params: dict[str, Any]) -> Path:
    """Write `pixels` ([H, W, 3] uint8) in the format `path`'s suffix names, with its parameters."""
    path = Path(path)
    fmt = image_format(path)
    if fmt == "PNG":
        return save_png(pixels, path, params)
    from PIL import Image

    image = Image.fromarray(pixels)
    exif = exif_with_parameters(params)
    return _write_atomic(path, lambda f: image.save(f, format=fmt, exif=exif, quality=QUALITY))


def write_png(image: np.ndarray, f: IO[bytes], params: dict[str, Any]) -> None:
    """Encode `image` ([H, W, 3] uint8) as PNG into `f`, with its parameters in text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_itxt("sd_engine", json.dumps(params, ensure_ascii=False, default=str))
    Image.fromarray(image).save(f, format="PNG", pnginfo=info)


def png_bytes(image: np.ndarray, params: dict[str, Any]) -> bytes:
    """The PNG file `save_png` writes, as bytes (what the server sends)."""
    buf = io.BytesIO()
    write_png(image, buf, params)
    return buf.getvalue()


def save_png(image: np.ndarray, path: Path, params: dict[str, Any]) -> Path:
    """Write `image` ([H, W, 3] uint8) to `path` as PNG, with its parameters in text chunks."""
    return _write_atomic(Path(path), lambda f: write_png(image, f, params))


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Run `write` on a temp file next to `path`, make it 0o644 and rename it into place.

    An OSError names `path` (the file the caller asked for), never the hidden temp file.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the image from other users
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
