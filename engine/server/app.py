"""The ASGI app: routes, error answers, body limit, warm-up and drain, around one Pipeline and one Batcher.

`create_app(config)` returns a FastAPI app whose lifespan loads the engine directory once (in a thread),
starts the batcher and runs one small warm-up generation in the background; /readyz answers 200 only
after it. Each generation request is checked against the loaded engines before it is queued (bad input
is a 400 naming the field, never a 500), then waits for its batch, its timeout (504) or its client's
disconnect (dropped from the queue). Every non-200 answer has OpenAI's error shape. OpenAI `url` answers
are PNGs written under --image-dir and served at GET /v1/images/files/{name} until they expire
(engine/server/image_files.py); a background task sweeps the folder while the app runs.
"""
from __future__ import annotations

import asyncio
import base64
import gc
import itertools
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import PIL.Image
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest

from engine import passes, refiner
from engine.kinds import takes
from engine.previews import Previews
from engine.request import Generated, PreparedRequest, Request, RequestError, StopFn
from engine.server.a1111 import add_a1111_routes
from engine.server.access import Access, allowed_hosts
from engine.server.admission import CostMeter, check_max_size, run_steps
from engine.server.batcher import Batcher, BatchFailed, Draining, Outcome, QueueFull
from engine.server.bodies import CONTROL_FILES, RETRY_UNAVAILABLE_S, read_generate_body
from engine.server.config import ServeConfig
from engine.server.disconnect import ClientGone, unless_client_leaves
from engine.server.guard import Guard, path_label
from engine.server.image_files import ROUTE as IMAGE_ROUTE
from engine.server.image_files import ImageStore
from engine.server.metrics import Metrics
from engine.server.openapi import ROUTE_ERRORS, generate_request_body, openapi_document
from engine.server.schemas import (
    ApiError,
    ImagesAnswer,
    ImagesBody,
    decode_image,
    validation_error,
)
from engine.server.step_batcher import StepBatcher
from engine.server.stream import Stream, answer, encode, respond
from engine.server.warmup import warmup_request
from export.control import PREFIX

log = logging.getLogger("engine.serve")
PLAYGROUND = Path(__file__).with_name("playground.html")
DECODE_SLOTS = 1  # uploads decoded at once (ServerState.decode)
RETRY_NOT_READY_S = 1  # Retry-After while loading or warming up
SWEEP_EVERY_S = (0.5, 60.0)  # the periodic sweep of hosted images: every ttl/4, within these bounds
OPENAI_PARAMS = {"images": "n", "height": "size", "width": "size"}  # Request field -> body field


class ServerState:
    """One process's pipeline, batcher and metrics, and where it is in its life (loading -> ready -> draining)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics()
        self.cost = CostMeter(config.timeout_s, config.max_cost, config.cost_admission)
        self.step_progress: tuple[int, int] | None = None  # (steps done, steps) of the running batch (request batching)
        # one upload decoded at a time: base64 and PNG decoding hold the GIL for tens of ms per large image, and a
        # dozen at once starved the event loop (/healthz p90 387 ms during 12 uploads of 16 MB)
        self._decoding = asyncio.Semaphore(DECODE_SLOTS)
        self.pipeline: Any = None
        self.batcher: Batcher | StepBatcher | None = None
        self.status = "loading"  # loading | warming | ready | draining | failed
        self.error: str | None = None
        self._warmup: asyncio.Task | None = None
        self.images = ImageStore(config.image_folder, config.image_ttl_s, int(config.image_dir_mb * 2**20),
                                 self.metrics)
        self.images_error: str | None = None  # why `url` answers cannot be given (the folder is unusable)
        self._sweeper: asyncio.Task | None = None
        self._loading: asyncio.Task | None = None
        self.settled = asyncio.Event()  # set once loading ended: warming (then ready) or failed

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def begin(self) -> None:
        """Load in the background: the port already answers (/healthz 200, /readyz 503 "loading") meanwhile, so an
        orchestrator can tell a server that is starting from one that is dead."""
        self._loading = asyncio.get_running_loop().create_task(self.start(), name="load")

    async def start(self) -> None:
        """Load the engines, start the batcher, warm up in the background; a load that fails sets status "failed"
        and `error` (logged, one line)."""
        try:
            await self._load()
        finally:
            self.settled.set()

    async def _load(self) -> None:
        from engine.pipeline import Pipeline

        cfg = self.config
        try:
            self.pipeline = await asyncio.to_thread(Pipeline.load, cfg.engine_dir, cfg.model, cfg.device,
                                                    embeddings=cfg.embeddings_dir)
        except (ValueError, OSError, RuntimeError) as exc:
            self.status, self.error = "failed", f"cannot load engines from {cfg.engine_dir}: {exc}"
            log.error(self.error)
            return
        await self._open_images()
        max_batch = max(1, min(cfg.max_batch, self.pipeline.profile.hi.batch))
        if cfg.batching == "step":
            self.batcher = StepBatcher(self.pipeline, max_batch, cfg.max_queue, self.metrics)
        else:
            self.batcher = Batcher(self._run, max_batch, cfg.max_wait_ms / 1e3, cfg.max_queue, self.metrics)
        self.batcher.start()
        self.status = "warming"
        self._warmup = asyncio.get_running_loop().create_task(self._warm())

    async def _warm(self) -> None:
        if self.config.warmup:
            t0 = time.perf_counter()
            prepared = self.pipeline.prepare(warmup_request(self.pipeline))
            try:
                outcome = await self.batcher.submit(prepared, counted=False)  # no client asked for it
            except (BatchFailed, Draining) as exc:
                self.status, self.error = "failed", f"warm-up generation failed: {exc}"
                log.error(self.error)
                return
            self.cost.observe(outcome.images, outcome.batch_images)  # the first measure of this server's speed
            log.info("warm-up generation took %.0f ms", (time.perf_counter() - t0) * 1e3)
        if self.status == "warming":
            gc.freeze()  # what loading made lives as long as the server: no full collection scans it (~45-70 ms)
            self.status = "ready"
            log.info("ready: model %s on %s", self.pipeline.info.get("model"), self.pipeline.info.get("backend"))

    async def _open_images(self) -> None:
        """The hosted-image folder, created and swept, and the periodic sweep started; if the folder cannot be
        used (a read-only engine directory), `url` answers are 503 naming the cause and b64_json still works."""
        try:
            swept = await asyncio.to_thread(self.images.open)
        except OSError as exc:
            self.images_error = f"cannot write hosted images ({exc.strerror or type(exc).__name__}); start the " \
                                "server with a writable --image-dir, or ask for response_format b64_json"
            log.error("image folder %s: %s", self.images.folder, exc)
            return
        log.info("hosting url images in %s (%d left from earlier runs)", self.images.folder, swept.files)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_periodically())

    async def _sweep_periodically(self) -> None:
        """Expire hosted images while the app runs (reads refuse expired ones anyway: this frees the disk)."""
        low, high = SWEEP_EVERY_S
        every = min(high, max(low, self.config.image_ttl_s / 4))
        while True:  # until stop() cancels it
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self.images.sweep)
            except OSError as exc:
                log.warning("sweeping hosted images in %s failed (retrying in %g s): %s", self.images.folder,
                            every, exc)

    async def save_images(self, pngs: list[bytes]) -> list[str]:
        """Hosted names of `pngs`; ApiError 503 (never a path) if they cannot be written."""
        if self.images_error is not None:
            raise ApiError(503, self.images_error, "response_format", kind="unavailable")
        try:
            return await asyncio.to_thread(self.images.save, pngs)
        except OSError as exc:
            log.error("hosted images not written to %s: %s", self.images.folder, exc)
            raise ApiError(503, f"cannot store the images now ({exc.strerror or type(exc).__name__}); retry later "
                                "or ask for response_format b64_json", kind="unavailable",
                           headers={"Retry-After": str(RETRY_UNAVAILABLE_S)}) from None

    def _run(self, requests: list[PreparedRequest], batch_size: int, stop: StopFn,
             previews: Previews | None = None) -> list[Generated]:
        total = run_steps(requests[0].request)  # a batch's rows share steps and strength (its batch key)
        done = itertools.count()

        def step_then_stop() -> bool:  # asked before every step (the batch thread): count it, then ask `stop`
            self.step_progress = (next(done), total)
            return stop()

        try:
            return self.pipeline.run(requests, progress=False, batch_size=batch_size, stop=step_then_stop,
                                     preview=previews)
        finally:
            self.step_progress = None

    def drain(self) -> None:
        """Stop taking work (readyz 503, new generations 503); what was accepted still runs."""
        if self.status not in ("failed",):
            self.status = "draining"
        if self.batcher is not None:
            self.batcher.close()

    async def drain_within(self, timeout_s: float) -> None:
        """Drain; past `timeout_s`, abandon what is left (its clients get 503) and stop the running batch at its
        next step, so a shutdown never waits on a long request."""
        self.drain()
        if self.batcher is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.batcher.drained.wait()), timeout_s)
        except TimeoutError:
            n = self.batcher.abandon(f"server shut down: the drain passed --drain-timeout-s {timeout_s:g}")
            log.warning("drain passed --drain-timeout-s %g: %d request(s) answered 503, the running batch stops at "
                        "its next step", timeout_s, n)
            await self.batcher.drained.wait()

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()  # shut down while loading: the load's thread ends with the process
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.drain_within(self.config.drain_timeout_s)
        if self.pipeline is not None:
            self.pipeline.close()
        gc.unfreeze()  # what loading made can be collected again (a process that serves in turn: tests)

    # ---- one generation request ----

    async def prepare(self, request: Request, params: dict[str, str]) -> PreparedRequest:
        """The request checked against the server's limits and prepared against the loaded engines (off the event
        loop); ApiError 400 whose param is the body field (`params`: Request field -> body field, where they
        differ)."""
        if self.status in ("draining", "failed") or self.batcher is None:
            raise ApiError(503, f"server is {self.status}" + (f": {self.error}" if self.error else ""),
                           kind="unavailable", headers={"Retry-After": str(RETRY_UNAVAILABLE_S)})
        images_field = params.get("images", "images")
        if request.images > self.config.max_images:
            raise ApiError(400, f"{images_field} {request.images} is over this server's limit "
                                f"(--max-images {self.config.max_images})", images_field)
        plan = passes.of(request)
        if plan is not None and self.config.batching == "step":
            raise ApiError(400, f"{plan.FIELD} runs two passes of one request: this server runs --batching step, "
                                "which it does not take (run the server with --batching request)",
                           params.get(plan.FIELD, plan.FIELD))
        limit = self.batcher.images_limit
        if limit is not None and request.images > limit:
            raise ApiError(400, f"{images_field} {request.images} is over --max-batch {limit}: step batching runs "
                                "all images of a request in one flight", images_field)
        check_max_size(request, None, self.config.max_size, params)  # the sides asked for, before any work
        opt = self.pipeline.profile.opt
        self.cost.check(request, opt.height, opt.width, params.get("steps", "steps"))
        try:
            prepared = await asyncio.to_thread(self.pipeline.prepare, request)
        except RequestError as exc:
            raise ApiError(400, str(exc), params.get(exc.field, exc.field) if exc.field else None) from None
        except ValueError as exc:  # a check without a field (none known today): still the client's request
            raise ApiError(400, str(exc)) from None
        check_max_size(request, prepared.request, self.config.max_size, params)  # the x4 upscaler's: 4x its image
        return prepared

    async def generate(self, http: HttpRequest, request: Request | PreparedRequest, params: dict[str, str] | None = None,
                       stream: Stream | None = None) -> Outcome:
        t0 = time.perf_counter()
        prepared = request if isinstance(request, PreparedRequest) else await self.prepare(request, params or {})
        if self.status != "ready":
            raise ApiError(503, f"server is {self.status}; retry when /readyz answers 200", kind="unavailable",
                           headers={"Retry-After": str(RETRY_NOT_READY_S)})
        assert self.batcher is not None
        try:
            work = asyncio.wait_for(self.batcher.submit(prepared, stream=stream), self.config.timeout_s)
            outcome = await unless_client_leaves(http, work)
        except QueueFull as exc:
            raise self._busy(exc.retry_after_s) from None
        except Draining as exc:
            self._failed("draining")
            raise ApiError(503, str(exc), kind="unavailable",
                           headers={"Retry-After": str(RETRY_UNAVAILABLE_S)}) from None
        except TimeoutError:
            self._failed("timeout")
            raise ApiError(504, f"no answer within --timeout-s {self.config.timeout_s}", kind="timeout") from None
        except BatchFailed as exc:
            self._failed("generation")
            raise ApiError(500, f"generation failed: {exc}", kind="server_error") from None
        except ClientGone:
            self._failed("client_disconnected")
            raise
        m = self.metrics
        self.cost.observe(outcome.images, outcome.batch_images)
        m.success.inc()
        m.queue_time.observe(outcome.queue_s)
        m.compute_time.observe(outcome.compute_s)
        m.request_time.observe(time.perf_counter() - t0)
        return outcome

    async def decode(self, source: str | bytes, field: str) -> PIL.Image.Image:
        """An uploaded image decoded in a worker thread, at most DECODE_SLOTS at a time (ApiError 400 naming
        `field` when it is not an image)."""
        async with self._decoding:
            return await asyncio.to_thread(decode_image, source, field)

    def admit(self) -> None:
        """What needs no image: 503 while the server takes no work, 429 while its queue is full. Run before an upload
        is decoded, so a burst of large images costs no decoding (nor memory) while they could not be taken; the
        batcher's own bound still decides at submit."""
        if self.status != "ready" or self.batcher is None:
            raise ApiError(503, f"server is {self.status}; retry when /readyz answers 200", kind="unavailable",
                           headers={"Retry-After": str(RETRY_NOT_READY_S)})
        if self.batcher.depth >= self.config.max_queue:
            raise self._busy(self.batcher.retry_after_s())

    def _busy(self, retry_after_s: int) -> ApiError:
        self._failed("queue_full")
        depth = self.batcher.depth if self.batcher is not None else 0
        return ApiError(429, f"server busy: {depth} requests queued (--max-queue {self.config.max_queue}); retry "
                             f"after {retry_after_s} s", kind="rate_limit_exceeded",
                        headers={"Retry-After": str(retry_after_s)})

    def _failed(self, reason: str) -> None:
        self.metrics.failure.labels(reason).inc()


def _timings(outcome: Outcome, total_s: float) -> dict[str, float]:
    """queue, compute (the batch's run), total (body read to answer encoded), and the batch's stage times."""
    stages = outcome.images[0].timings_ms if outcome.images else {}
    out = {"queue": outcome.queue_s * 1e3, "compute": outcome.compute_s * 1e3, "total": total_s * 1e3}
    out.update({k: v for k, v in stages.items() if k != "total"})
    return {k: round(v, 2) for k, v in out.items()}


async def _answer(outcome: Outcome, t0: float) -> dict:
    pngs = await asyncio.to_thread(encode, outcome.images)
    return answer(outcome, pngs, _timings(outcome, time.perf_counter() - t0))


def create_app(config: ServeConfig) -> FastAPI:
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.begin()
        yield
        await state.stop()

    app = FastAPI(title="sd-engine", version="0.1.0", lifespan=lifespan,
                  description="Stable Diffusion generation: OpenAI Images API and the full Request API")
    app.state.server = state
    app.add_middleware(Guard, max_bytes=int(config.max_body_mb * 2**20), metrics=state.metrics)
    if config.cors_origins:  # off by default: no cross-site browser page may read our answers
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Access, hosts=allowed_hosts(config.host, config.allowed_hosts),
                       cors_origins=config.cors_origins, api_key=config.api_key,
                       on_refused=lambda path, status: state.metrics.http_requests.labels(
                           path_label(path), str(status)).inc())
    app.openapi = lambda: openapi_document(app)

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, err: RequestValidationError) -> JSONResponse:
        api = validation_error(list(err.errors()))
        return JSONResponse(api.body(), api.status)

    @app.exception_handler(HTTPException)
    async def _http(_: HttpRequest, err: HTTPException) -> JSONResponse:  # 404, 405 (with its Allow header), ...
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind="http_error").body(), err.status_code,
                            headers=err.headers)

    @app.exception_handler(Exception)
    async def _bug(_: HttpRequest, err: Exception) -> JSONResponse:  # logged with its traceback, never sent
        log.error("unhandled %s while answering: %s", type(err).__name__, err)  # uvicorn logs the traceback
        return JSONResponse(ApiError(500, "internal server error", kind="server_error").body(), 500)

    @app.exception_handler(ClientGone)
    async def _gone(_: HttpRequest, err: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.get("/healthz", responses=ROUTE_ERRORS["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses=ROUTE_ERRORS["ready"])
    async def readyz() -> JSONResponse:
        if not state.ready:
            body = {"status": state.status} | ({"error": state.error} if state.error else {})
            return JSONResponse(body, 503)
        return JSONResponse({"status": "ready", "model": state.pipeline.info.get("model"),
                             "backend": state.pipeline.info.get("backend")})

    @app.get("/metrics", response_class=PlainTextResponse, responses=ROUTE_ERRORS["read"])
    async def metrics() -> Response:
        """Prometheus text exposition format."""
        return PlainTextResponse(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, responses=ROUTE_ERRORS["read"])
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/v1/info", responses=ROUTE_ERRORS["info"])
    async def info() -> dict:
        from engine.sampler_registry import SAMPLERS

        p = state.pipeline
        if p is None:
            raise ApiError(503, "engines not loaded yet", kind="unavailable",
                           headers={"Retry-After": str(RETRY_NOT_READY_S)})
        d = Request()
        return {"model": p.info.get("model"), "backend": p.info.get("backend"), "family": p.family.name,
                "height": p.profile.opt.height, "width": p.profile.opt.width, "profile": p.profile.to_json(),
                "size_multiple": p.dims.size_multiple, "samplers": list(SAMPLERS),
                "max_images": config.max_images, "max_batch": state.batcher.max_batch if state.batcher else None,
                "controlnets": [n.removeprefix(PREFIX) for n in p.family.roles.conditions],
                "ip_adapter": (p.info.get("ip_adapter") or {}).get("name"),
                "embeddings": {e.name: e.count for e in p.text.embeddings.values()},  # name -> token slots
                "refiner": refiner.beside(p),  # the model refiner_switch hands over to (engine/refiner.py)
                "takes": takes(p.family, p.dims, p.has_role("latent_encoder")),  # engine/kinds.py
                "defaults": {"steps": d.steps, "guidance_scale": d.guidance_scale, "sampler": d.sampler,
                             "seed": d.seed, "negative_prompt": d.negative_prompt}}

    @app.post("/v1/generate", openapi_extra={"requestBody": generate_request_body()},
              responses=ROUTE_ERRORS["generated"])
    async def generate(http: HttpRequest) -> Response:
        """Every Request field; init_image / mask as base64 (JSON) or file parts (multipart)."""
        t0 = time.perf_counter()
        body, images = await read_generate_body(http, state.admit, state.decode)
        if body.response_format == "png" and body.images != 1:
            raise ApiError(400, f"response_format 'png' returns one image; images is {body.images} "
                                "(use 'json' for several)", "response_format")
        try:
            # off the event loop: a LoRA file new to the cache is read and parsed here
            request = await asyncio.to_thread(body.to_request, images["init_image"], images["mask"],
                                              state.config.lora_dir, images[CONTROL_FILES], images["ip_image"])
        except ValueError as exc:  # loras (engine/server/lora_dir.py): a message without a path
            raise ApiError(400, str(exc), "loras") from None
        if body.stream:  # server-sent events (engine/server/stream.py): checked first, then streamed
            return await respond(state, http, request, body.preview_every, lambda o: _answer(o, t0))
        outcome = await state.generate(http, request)
        pngs = await asyncio.to_thread(encode, outcome.images)
        timings = _timings(outcome, time.perf_counter() - t0)
        if body.response_format == "png":
            return Response(pngs[0], media_type="image/png", headers={
                "X-Seed": str(outcome.images[0].params["seed"]), "X-Timings-Ms": json.dumps(timings)})
        return JSONResponse(answer(outcome, pngs, timings))

    @app.post("/v1/images/generations", responses={200: {"model": ImagesAnswer, "description": "the images"},
                                                   **ROUTE_ERRORS["generate"]})
    async def images_generations(body: ImagesBody, http: HttpRequest) -> JSONResponse:
        """OpenAI's Images API: `url` (the default) or `b64_json`; negative_prompt, steps, guidance_scale,
        scheduler, seed as extra fields. A url is <the request's scheme and Host, or --public-url>/v1/images/files/
        <random name>, fetchable without the API key until --image-ttl-s passes."""
        if body.response_format != "b64_json" and state.images_error is not None:  # before the generation
            raise ApiError(503, state.images_error, "response_format", kind="unavailable")
        outcome = await state.generate(http, body.to_request(), OPENAI_PARAMS)
        pngs = await asyncio.to_thread(encode, outcome.images)
        if body.response_format == "b64_json":
            data = [{"b64_json": base64.b64encode(b).decode()} for b in pngs]
        else:
            base = config.public_url or str(http.base_url).rstrip("/")
            data = [{"url": f"{base}{IMAGE_ROUTE}{name}"} for name in await state.save_images(pngs)]
        return JSONResponse({"created": int(time.time()), "data": data})

    @app.get(IMAGE_ROUTE + "{name}", response_class=Response, responses=ROUTE_ERRORS["file"])
    async def image_file(name: str) -> Response:
        """A hosted image of a `url` answer (no API key: its random name is the credential); 404 once expired."""
        try:
            found = await asyncio.to_thread(state.images.read, name)
        except OSError as exc:
            log.error("hosted image not read from %s: %s", state.images.folder, exc)
            raise ApiError(503, f"cannot read the image now ({exc.strerror or type(exc).__name__})",
                           kind="unavailable", headers={"Retry-After": str(RETRY_UNAVAILABLE_S)}) from None
        if found is None:
            raise ApiError(404, "no such image: it expired (--image-ttl-s), was deleted for room (--image-dir-mb) "
                                "or never existed", kind="not_found")
        data, left_s = found
        return Response(data, media_type="image/png", headers={
            "Cache-Control": f"private, max-age={int(left_s)}", "X-Content-Type-Options": "nosniff"})

    add_a1111_routes(app, state)  # AUTOMATIC1111's /sdapi/v1 routes
    return app
