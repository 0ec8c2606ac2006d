"""The body of POST /v1/generate: JSON, or multipart with the init image and mask as file parts, read by hand (the
route's OpenAPI body is engine/server/openapi.py's); the images are decoded last, in a worker thread, after the
caller's admission check."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import PIL.Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest

from engine.server.schemas import FORM_JSON, MAX_CONTROLS, ApiError, GenerateBody, validation_error

log = logging.getLogger("engine.serve")
Decoder = Callable[[str | bytes, str], Awaitable[PIL.Image.Image]]  # (base64 text or file bytes, field) -> image
IMAGE_FIELDS = ("init_image", "mask", "ip_image")  # base64 (JSON) or file parts (multipart)
CONTROL_FILES = "control_image"  # multipart: one file part per ControlNet, in the order of `controls`
RETRY_UNAVAILABLE_S = 5  # Retry-After when the upload cannot be stored (as when draining or failed)
# bodies at least this large are joined (engine/server/guard.py) and parsed in a worker thread: on the event loop,
# a dozen 16 MB uploads arriving together held it ~15 ms each, back to back (/healthz p99 151 ms meanwhile)
OFF_LOOP_BYTES = 2**20


async def read_generate_body(http: HttpRequest, admit: Callable[[], None],
                            decode: Decoder) -> tuple[GenerateBody, dict[str, Any]]:
    """The /v1/generate body from JSON or multipart form data, and its decoded init image / mask / image prompt and
    control images
    (`control_image`: a list in the order of `controls`); `admit` is called between the two (it raises what the
    request would get anyway: nothing is decoded for a request refused)."""
    control_files: list[bytes] = []
    ctype = http.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    files: dict[str, Any] = {}
    try:
        if ctype == "multipart/form-data":
            form = await http.form(max_files=len(IMAGE_FIELDS) + MAX_CONTROLS, max_fields=32)
            fields: dict[str, Any] = {}
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name == CONTROL_FILES:
                        control_files.append(await value.read())
                        continue
                    if name not in IMAGE_FIELDS:
                        raise ApiError(400, f"{name}: only {', '.join(IMAGE_FIELDS)} and {CONTROL_FILES} may be files",
                                       name)
                    files[name] = await value.read()
                elif name in FORM_JSON:  # loras, controls: JSON text, checked as the JSON body's
                    if name in fields:
                        raise ApiError(400, f"{name}: send one {name} field, a JSON array", name)
                    fields[name] = FORM_JSON[name](value) if value.strip() else []
                elif value != "":
                    fields[name] = value
            body = GenerateBody.model_validate(fields, strict=False)  # form fields are text: "7" is a number
        elif ctype == "application/json":
            raw = await http.body()
            body = (GenerateBody.model_validate_json(raw) if len(raw) < OFF_LOOP_BYTES
                    else await asyncio.to_thread(GenerateBody.model_validate_json, raw))
        else:
            raise ApiError(415, f"content type {ctype!r} is not accepted; send application/json or "
                                "multipart/form-data", kind="unsupported_media_type")
    except ValidationError as err:
        raise validation_error(err) from None
    except HTTPException as err:  # multipart parser limits (too many fields / files)
        raise ApiError(400, f"multipart body: {err.detail}") from None
    except OSError as exc:  # the upload's spool file could not be written (a full disk): never the path
        log.error("multipart upload not stored: %s", exc)
        raise ApiError(503, f"cannot store the upload now ({exc.strerror or type(exc).__name__}); retry later",
                       kind="unavailable", headers={"Retry-After": str(RETRY_UNAVAILABLE_S)}) from None
    sources = {name: files.get(name, getattr(body, name)) for name in IMAGE_FIELDS}
    controls = _control_sources(body, control_files)
    if any(source is not None for source in sources.values()) or controls:
        admit()
    for name, source in sources.items():  # off the event loop, with a pixel limit (engine/server/schemas.py)
        files[name] = await decode(source, name) if source is not None else None
    files[CONTROL_FILES] = [await decode(source, "controls") for source in controls]
    return body, files


def _control_sources(body: GenerateBody, parts: list[bytes]) -> list[str | bytes]:
    """Each control's image: its base64 `image`, or (multipart) the file part of its place; 400 naming `controls`
    when the counts differ or a net has both or neither."""
    if parts and len(parts) != len(body.controls):
        raise ApiError(400, f"controls: {len(parts)} {CONTROL_FILES} file parts for {len(body.controls)} controls; "
                            "send one per control, in order", "controls")
    out: list[str | bytes] = []
    for i, ref in enumerate(body.controls):
        source = parts[i] if parts else ref.image
        if source is None or (parts and ref.image is not None):
            raise ApiError(400, f"controls: ControlNet {ref.name!r} needs exactly one image: its base64 `image`, or a "
                                f"{CONTROL_FILES} file part (multipart)", "controls")
        out.append(source)
    return out
