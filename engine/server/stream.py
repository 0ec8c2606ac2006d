"""`POST /v1/generate` with `"stream": true`: the request's progress as server-sent events, then its answer.

Events (`text/event-stream`, one JSON object per `data:` line):

    event: progress   {"step": 3, "total": 20}                          after every denoise step of its batch
    event: preview    {"step": 5, "total": 20, "index": 0, "b64_png": ..}  every `preview_every` steps, each image
    event: result     the non-streamed answer's JSON (images, seeds, params, timings)
    event: error      {"error": {...}} in the server's error shape, when the generation fails after the stream began

The request is checked (400 in the usual JSON shape) before the stream starts. Previews decode with the tiny decoder
where the engines have one (engine/previews.py), in the batch's thread between two steps, and are PNG-encoded there;
the events cross to the event loop through a queue. A streamed request's images are the non-streamed request's: the
same batch, the same rows. Streaming needs request batching (`--batching request`, the default): a step-batched
flight is refused with 400 naming `stream`.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi.responses import StreamingResponse

from engine.png import png_bytes
from engine.request import Generated
from engine.server.batcher import Outcome

log = logging.getLogger("engine.serve")

Listener = Callable[[int, int, list[int], "np.ndarray | None"], None]  # (done, total, image indexes, pixels or None)


def answer(outcome: Outcome, pngs: list[bytes], timings: dict[str, float]) -> dict[str, Any]:
    """The JSON answer of /v1/generate (streamed: the `result` event's data)."""
    return {"created": int(time.time()),
            "images": [{"b64_png": base64.b64encode(b).decode(), "seed": g.params["seed"],
                        "params": json.loads(json.dumps(g.params, default=str))}
                       for b, g in zip(pngs, outcome.images, strict=True)],
            "timings_ms": timings, "batch_images": outcome.batch_images}


def encode(images: list[Generated]) -> list[bytes]:
    return [png_bytes(g.pixels, g.params) for g in images]


class Stream:
    """One streamed request's events, pushed from the batch thread, read on the event loop."""

    def __init__(self, preview_every: int):
        self.preview_every = preview_every
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()

    def push(self, event: str, data: dict) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (event, data))

    def on_step(self, done: int, total: int, indexes: list[int], pixels: np.ndarray | None) -> None:
        """The batch thread's call after a step: progress, and this request's previews when due for it."""
        self.push("progress", {"step": done, "total": total})
        if pixels is not None and self.preview_every and done % self.preview_every == 0:
            for k, px in zip(indexes, pixels, strict=True):
                self.push("preview", {"step": done, "total": total, "index": k,
                                      "b64_png": base64.b64encode(png_bytes(px, {})).decode()})

    async def events(self, work: asyncio.Task, result: Callable[[Any], Any]) -> AsyncIterator[str]:
        """The event stream until `work` ends: its queued events, then `result(outcome)` as the `result` event (or
        the error of `work` as an `error` event)."""
        try:
            while True:
                get = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({get, work}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    yield _event(*get.result())
                    continue
                get.cancel()
                while not self.queue.empty():
                    yield _event(*self.queue.get_nowait())
                yield await _last(work, result)
                return
        finally:
            if not work.done():  # the client went away mid-stream: its job leaves (or its batch stops)
                work.cancel()


async def _last(work: asyncio.Task, result: Callable[[Any], Any]) -> str:
    from engine.server.schemas import ApiError

    try:
        return _event("result", await result(work.result()))
    except ApiError as exc:  # timeout, draining, a failed batch: the status the plain request would have had
        return _event("error", {**exc.body(), "status": exc.status})
    except Exception as exc:  # noqa: BLE001 - logged; the client gets the server's error shape, never a traceback
        log.error("streamed request failed: %s: %s", type(exc).__name__, exc)
        return _event("error", {**ApiError(500, "internal server error", kind="server_error").body(), "status": 500})


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def respond(state: Any, http: Any, request: Any, preview_every: int,
                  result: Callable[[Any], Any]) -> StreamingResponse:
    """A streamed /v1/generate on the server's `state`: ApiError 400 before the stream for a bad request (or a
    step-batching server), then the events; `result(outcome)` makes the `result` event's data."""
    from engine.server.schemas import ApiError

    if state.config.batching != "request":
        raise ApiError(400, "stream needs request batching (this server runs --batching step)", "stream")
    prepared = await state.prepare(request, {})
    events = Stream(preview_every)
    work = asyncio.ensure_future(state.generate(http, prepared, stream=events))
    return StreamingResponse(events.events(work, result), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def route(jobs: list, streams: list[Stream | None]) -> Callable[[int, int, list, np.ndarray | None], None]:
    """An engine/previews.py `emit` for a batch of `jobs` (the run's requests, in order): each streamed job gets the
    step and its own rows' previews."""
    def emit(done: int, total: int, rows: list, pixels: np.ndarray | None) -> None:
        for j, stream in enumerate(streams):
            if stream is None:
                continue
            mine = [i for i, row in enumerate(rows) if row.req == j]
            stream.on_step(done, total, [rows[i].k for i in mine], None if pixels is None else pixels[mine])

    return emit
