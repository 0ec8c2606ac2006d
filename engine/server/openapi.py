"""The OpenAPI document: every status a route answers, with its schema, and no unresolved `$ref`.

FastAPI documents what it validates itself. /v1/generate reads its body by hand (JSON or multipart), so its
request body is declared here from `GenerateBody`'s JSON schema, with the nested models (`LoraRef`) moved to
`components/schemas` where their `$ref`s point. Errors are `ErrorBody` (OpenAI's shape) and 400, never FastAPI's
422, which the server does not answer.
"""
from __future__ import annotations

from typing import Any

from fastapi.openapi.utils import get_openapi

from engine.server.schemas import ErrorBody, GenerateBody

REF_TEMPLATE = "#/components/schemas/{model}"
FILE_FIELDS = ("init_image", "mask", "ip_image")  # multipart file parts of /v1/generate
ERROR_TEXT = {
    400: "bad request: a field, the body or the Host header (the message names it)",
    401: "missing or wrong API key (--api-key): send Authorization: Bearer <key>",
    403: "cross-site request from an origin not in --cors-origin",
    404: "no such image: expired (--image-ttl-s), deleted for room (--image-dir-mb), or never generated",
    413: "body over --max-body-mb",
    415: "content type other than application/json or multipart/form-data",
    429: "queue full (--max-queue); Retry-After says when to retry",
    500: "the generation failed (the message names the cause)",
    503: "loading, warming up, draining or failed; Retry-After says when to retry",
    504: "no answer within --timeout-s",
}
PNG_SCHEMA = {"type": "string", "format": "binary"}
READY_503 = {"description": "not ready: loading, warming, draining or failed", "content": {"application/json": {
    "schema": {"type": "object", "required": ["status"],
               "properties": {"status": {"type": "string"}, "error": {"type": "string"}}}}}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody, "description": ERROR_TEXT[s]} for s in statuses}


ROUTE_ERRORS: dict[str, dict[int | str, dict[str, Any]]] = {  # `responses=` of each kind of route
    "health": _errors(400),  # the Host check applies to every route
    "ready": {**_errors(400), 503: READY_503},
    "read": _errors(400, 401),
    "info": _errors(400, 401, 503),
    "generate": _errors(400, 401, 403, 413, 415, 429, 500, 503, 504),
    "generated": {200: {"description": "the images: JSON (base64 PNGs with their parameters); one PNG with "
                                       "response_format png; server-sent events with stream (progress, preview, "
                                       "then the JSON answer as the `result` event)",
                        "content": {"application/json": {"schema": {"type": "object"}},
                                    "image/png": {"schema": PNG_SCHEMA},
                                    "text/event-stream": {"schema": {"type": "string"}}}},
                  **_errors(400, 401, 403, 413, 415, 429, 500, 503, 504)},
    "file": {200: {"description": "the PNG", "content": {"image/png": {"schema": PNG_SCHEMA}}},
             **_errors(400, 404, 503)},  # no 401: the name is the credential (engine/server/image_files.py)
}


def _generate_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """(GenerateBody's schema with $refs into components, the component schemas it refers to)."""
    schema = GenerateBody.model_json_schema(ref_template=REF_TEMPLATE)
    return schema, schema.pop("$defs", {})


def generate_request_body() -> dict[str, Any]:
    """/v1/generate's requestBody: JSON, or multipart with the images as file parts."""
    schema, _ = _generate_schemas()
    form = {**schema, "properties": {**schema["properties"],
                                     **{f: {"type": "string", "format": "binary"} for f in FILE_FIELDS},
                                     "loras": {"type": "string", "contentMediaType": "application/json",
                                               "description": 'the JSON body\'s `loras` as JSON text: '
                                                              '[{"name": "style", "scale": 0.8}]'}}}
    return {"required": True, "content": {"application/json": {"schema": schema},
                                          "multipart/form-data": {"schema": form}}}


def openapi_document(app) -> dict[str, Any]:
    """The app's OpenAPI document (built once): FastAPI's, plus GenerateBody's nested models, less 422."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        doc.setdefault("components", {}).setdefault("schemas", {}).update(_generate_schemas()[1])
        for operations in doc.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        schemas = doc["components"]["schemas"]
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
    return app.openapi_schema
