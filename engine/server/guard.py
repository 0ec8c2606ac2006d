"""The server's outermost ASGI middleware: request bodies over --max-body-mb get a 413 before the app sees them,
and every answer is counted in sd_http_requests_total by route (never by a random path)."""
from __future__ import annotations

import asyncio
import json

from engine.server.a1111 import PREFIX as A1111_PREFIX
from engine.server.a1111 import ROUTES as A1111_ROUTES
from engine.server.bodies import OFF_LOOP_BYTES
from engine.server.image_files import ROUTE as IMAGE_ROUTE
from engine.server.metrics import Metrics
from engine.server.schemas import ApiError

DRAIN_FACTOR = 4  # a body over the limit is still read (and dropped) up to this many times the limit
METRIC_PATHS = ("/", "/healthz", "/readyz", "/metrics", "/v1/info", "/v1/generate", "/v1/images/generations", "/docs",
                "/openapi.json", *(A1111_PREFIX + route for route in A1111_ROUTES))


def path_label(path: str) -> str:
    """The metrics label of a request path: a route's path, or "other" (no label per random path)."""
    if path.startswith(IMAGE_ROUTE):
        return IMAGE_ROUTE + "{name}"
    return path if path in METRIC_PATHS else "other"


class Guard:
    """ASGI middleware: bodies over `max_bytes` get 413 before the app sees them; every answer is counted."""

    def __init__(self, app, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = path_label(scope.get("path", ""))

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(label, str(message["status"])).inc()
            await send(message)

        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > DRAIN_FACTOR * self.max_bytes:
            return await self._too_large(counted_send)  # far too large: answer now, the connection closes
        chunks, size = [], 0
        while True:  # read (a too-large body up to DRAIN_FACTOR x the limit is read and dropped: a client that
            message = await receive()  # sends its whole body before reading then sees the 413, not a reset)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > DRAIN_FACTOR * self.max_bytes:
                return await self._too_large(counted_send)
            if size <= self.max_bytes:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if size > self.max_bytes:
            return await self._too_large(counted_send)
        # a large join in a worker thread: bytes.join copies a large body without the GIL, so the loop runs on
        body = b"".join(chunks) if size < OFF_LOOP_BYTES else await asyncio.to_thread(b"".join, chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the real channel (disconnects)

        await self.app(scope, replay, counted_send)

    async def _too_large(self, send) -> None:
        err = ApiError(413, f"request body over --max-body-mb {self.max_bytes / 2**20:g}", kind="request_too_large")
        data = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})
