"""Step-level (continuous) batching for the server: requests join and leave the running batch at every step.

Same contract as `Batcher` (submit / close / drained / depth / retry_after_s), other scheduling. One worker
drives an `engine.continuous.Flight`; at each step boundary, in a worker thread:
1. the slots of cancelled requests leave (their caller went away: disconnect, timeout);
2. waiting requests join, oldest first, while the flight accepts them: the same flex key (adapters, kind,
   size, sampler, guidance on/off; steps and strength may differ) and room for all their images (at most
   `max_batch` rows). Admission is strict FIFO: a request never overtakes an older one, so when the oldest
   waiting request has another key (or does not fit), nothing more joins, the flight drains, and that
   request starts the next flight. This bounds every request's wait by the flight in front of it, and a
   long-step request is never starved by a stream of short compatible ones;
3. one UNet call runs every row in flight, each at its own step;
4. rows that ran their last step leave and are decoded together; a request is answered when all its
   images are done. A row whose latents are not finite fails only its request.
Backpressure, drain and cancellation are those of `Batcher`: `submit` raises QueueFull past `max_queue`
waiting requests, `close` stops intake and everything accepted still runs, then `drained` is set; `abandon`
answers every accepted request `Draining` and their rows leave at the next step boundary.

The step loop runs in its own thread and goes from one step to the next without returning to the event
loop: handing each step to the loop (`await to_thread(step)`) made the next step wait for whatever HTTP
work the loop was doing (parsing, validating, answering), idling the compute between steps, and under
load step batching then served less than request batching. The loop and the thread share the queue
under a lock; results go back with `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from engine.continuous import Finished, Flight
from engine.request import Generated, PreparedRequest, Request
from engine.server.batcher import BatchFailed, Draining, Outcome, QueueFull
from engine.server.metrics import Metrics

log = logging.getLogger("engine.serve")
STEP_TIME_WEIGHT = 0.1  # weight of the newest step in the moving average of step time (Retry-After)


@dataclass(eq=False)
class StepJob:
    prepared: PreparedRequest  # checked and resolved once
    future: asyncio.Future = field(repr=False)
    arrived: float
    started: float | None = None
    images: dict[int, Generated] = field(default_factory=dict)
    peak_batch: int = 0  # most rows in flight during its life
    cancelled: bool = False
    counted: bool = True  # in the metrics (the warm-up is not)

    @property
    def request(self) -> Request:
        return self.prepared.request


class StepBatcher:
    def __init__(self, pipeline: Any, max_batch: int, max_queue: int, metrics: Metrics | None = None):
        self.flight = Flight(pipeline, max_batch)
        self.pipeline, self.max_batch, self.max_queue, self.metrics = pipeline, max_batch, max_queue, metrics
        self.accepting = True
        self.drained = asyncio.Event()
        self._queue: deque[StepJob] = deque()  # guarded by _cond
        self._running: list[StepJob] = []  # the step thread's own
        self._cond = threading.Condition()
        self._step_s = 0.1  # moving average of one step's time, for Retry-After
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._jobs: set[StepJob] = set()  # accepted and not yet answered (the event loop's own)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="step-batcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self.accepting = False
            self._cond.notify()

    def abandon(self, reason: str) -> int:
        """Answer every accepted request `Draining(reason)` now; their rows leave the flight at the next step
        boundary. The number of requests abandoned."""
        jobs = list(self._jobs)
        with self._cond:
            self.accepting = False
            for job in jobs:
                job.cancelled = True
            self._queue.clear()
            self._cond.notify()
        for job in jobs:
            _set(job.future, None, Draining(reason))
        self._set_depth()
        return len(jobs)

    def retry_after_s(self) -> int:
        with self._cond:
            waiting = list(self._queue)
        steps = sum(j.request.steps for j in waiting) / max(1, len(waiting))
        return max(1, math.ceil(self._step_s * steps * (1 + len(waiting) / self.max_batch)))

    @property
    def images_limit(self) -> int:
        """Images one request may ask for: its rows run in one flight (the app answers 400 above it)."""
        return self.max_batch

    async def submit(self, prepared: PreparedRequest, counted: bool = True, stream: object = None) -> Outcome:
        """The request's images once its last row finished; `counted=False` (the warm-up) stays out of the
        metrics. `stream` must be None: a flight streams nothing (engine/server/stream.py refuses it first)."""
        if stream is not None:
            raise ValueError("step batching streams no progress: the stream was to be refused before submit")
        request = prepared.request
        if not self.accepting:
            raise Draining("the server is draining")
        if request.images > self.max_batch:
            raise BatchFailed(f"{request.images} images is over --max-batch {self.max_batch} (step batching runs "
                              "all images of a request together)")
        job = StepJob(prepared, asyncio.get_running_loop().create_future(), time.perf_counter(), counted=counted)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                full = True
            else:
                full = False
                self._queue.append(job)
                self._cond.notify()
        if full:
            raise QueueFull(self.retry_after_s())
        self._jobs.add(job)
        self._set_depth()
        try:
            return await job.future
        finally:
            self._jobs.discard(job)
            # cancelled (timeout, disconnect): asyncio has cancelled job.future too by now, so "not done" alone
            # would miss it. Leave the queue now, or the flight at the next step boundary.
            if job.future.cancelled() or not job.future.done():
                with self._cond:
                    job.cancelled = True
                    if job in self._queue:
                        self._queue.remove(job)
                self._set_depth()

    # ---- the step thread ----

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self.flight.slots and self.accepting:
                        self._cond.wait()
                    if not self._queue and not self.flight.slots:  # closed and nothing left
                        break
                    joining = self._admissible()
                    for job in joining:
                        self._queue.remove(job)
                        job.started = time.perf_counter()
                if joining:
                    self._call(self._set_depth)
                t0 = time.perf_counter()
                try:
                    finished = self._boundary(joining)
                except Exception as exc:  # the flight's requests fail; the server keeps serving
                    log.error("step batch of %d request(s) failed: %s: %s", len(self._running), type(exc).__name__,
                              exc)
                    self._fail_all(f"{type(exc).__name__}: {exc}")
                    continue
                self._step_s += STEP_TIME_WEIGHT * (time.perf_counter() - t0 - self._step_s)
                self._deliver(finished)
        except BaseException as exc:  # a bug here would hang every client: log it loudly, then fail them
            log.error("step batcher stopped: %r", exc)
            self._fail_all(f"step batcher stopped: {exc!r}")
            raise
        finally:
            self._call(self.drained.set)

    def _admissible(self) -> list[StepJob]:
        """Waiting jobs that join now: oldest first, while each fits the flight (strict FIFO, no overtaking)."""
        out, free, key = [], self.flight.free, self.flight.key
        for job in self._queue:
            if job.cancelled:
                continue
            rows_key = job.prepared.flex_key
            if (key is not None and rows_key != key) or job.request.images > free:
                break
            out.append(job)
            free -= job.request.images
            key = rows_key
        return out

    def _boundary(self, joining: list[StepJob]) -> list[Finished]:
        """Cancelled rows leave, `joining` rows join, one step, done rows decode."""
        for job in [j for j in self._running if j.cancelled]:
            self.flight.drop(job)
            self._running.remove(job)
        for job in joining:
            if job.cancelled:
                continue
            try:
                rows = job.prepared.rows()
                self.flight.admit(rows, [job] * len(rows))
            except (ValueError, OSError, RuntimeError) as exc:  # this request alone fails
                self._resolve(job, exc=BatchFailed(f"{type(exc).__name__}: {exc}"))
                continue
            self._running.append(job)
        n = len(self.flight.slots)
        for job in self._running:
            job.peak_batch = max(job.peak_batch, n)
        self.flight.step()
        if self.metrics is not None and n and any(job.counted for job in self._running):
            self.metrics.executions.inc()
            self.metrics.batch_size.observe(n)
        return self.flight.finish()

    def _deliver(self, finished: list[Finished]) -> None:
        for f in finished:
            job: StepJob = f.owner
            if f.image is None:
                self.flight.drop(job)  # its other rows have no use now
                self._forget(job)
                self._resolve(job, exc=BatchFailed(f.error or "generation failed"))
                continue
            job.images[f.row.k] = f.image
            if self.metrics is not None and job.counted:
                self.metrics.images.inc()
            if len(job.images) == job.request.images:
                self._forget(job)
                now = time.perf_counter()
                images = [job.images[k] for k in range(job.request.images)]
                self._resolve(job, Outcome(images, (job.started or now) - job.arrived, now - (job.started or now),
                                           job.peak_batch))

    def _forget(self, job: StepJob) -> None:
        if job in self._running:
            self._running.remove(job)

    def _fail_all(self, message: str) -> None:
        for job in list(self._running):
            self.flight.drop(job)
            self._resolve(job, exc=BatchFailed(message))
        self._running.clear()

    def _resolve(self, job: StepJob, outcome: Outcome | None = None, exc: Exception | None = None) -> None:
        self._call(_set, job.future, outcome, exc)

    def _call(self, fn, *args) -> None:
        """Run fn(*args) on the event loop (from the step thread); a closed loop means nobody is waiting."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop is closed
                pass

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.pending.set(len(self._queue))


def _set(fut: asyncio.Future, result: Any, exc: Exception | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
