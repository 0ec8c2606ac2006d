"""Dynamic batching: a bounded FIFO of requests and one worker that runs compatible requests together.

A request is compatible with another when the pipeline can put their images in one UNet batch: the same
graph key (kind, size, steps, sampler, strength, guidance on/off). Prompts, seeds and guidance scales may
differ, since the pipeline gives each image its own generator and guidance row, so an image is the same
alone or batched. The worker takes the oldest request, waits up to `max_wait_s` from its arrival for
compatible ones (or from the end of the previous batch, if it arrived during it) until `max_batch`
images are queued, and runs the batch in a thread (the event loop stays free to answer, queue and
reject). One batch runs at a time: the engines are one device's.

Backpressure is a bound, never a wait: `submit` raises QueueFull when `max_queue` requests wait. A
request whose caller goes away (cancelled: client disconnect, timeout) leaves the queue at once; if it is
already running, its batch stops at the next step once no request in it is waited for (a batch-mate still
waited for keeps it running, and the gone rows are discarded). A failing batch fails only its own requests.
`close` stops intake; the worker finishes everything accepted, then sets `drained`. `abandon` (a drain past
its deadline) answers every accepted request `Draining` and stops the running batch at its next step.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.previews import Previews
from engine.request import Generated, PreparedRequest, StopFn, Stopped
from engine.server.metrics import Metrics

log = logging.getLogger("engine.serve")
# (requests, batch size, stop, previews) -> images in order; `stop` is asked between steps, `Stopped` raised when it
# says so; `previews` (None: no request of the batch streams) gets every step (engine/previews.py)
RunFn = Callable[[list[PreparedRequest], int, StopFn, "Previews | None"], list[Generated]]
BATCH_TIME_WEIGHT = 0.2  # weight of the newest batch in the moving average of batch time (Retry-After)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Draining(Exception):
    """The server is shutting down and takes no new work."""


class BatchFailed(Exception):
    """The batch a request ran in raised; the message names the cause."""


@dataclass
class Outcome:
    images: list[Generated]
    queue_s: float  # arrival -> batch start
    compute_s: float  # the batch's run
    batch_images: int  # images in that batch (this request's and its batch-mates')


@dataclass(eq=False)
class Job:
    prepared: PreparedRequest  # checked and resolved once (seed drawn, size filled in, images loaded)
    future: asyncio.Future = field(repr=False)
    arrived: float
    started: float | None = None
    gone: bool = False  # nobody waits for it (its caller went away, or a drain abandoned it)
    counted: bool = True  # in the metrics (the warm-up is not)
    stream: Any = None  # engine/server/stream.py's Stream of a streamed request: its progress and previews

    @property
    def images(self) -> int:
        return self.prepared.request.images

    @property
    def key(self) -> tuple:
        return self.prepared.batch_key


class Batcher:
    images_limit: int | None = None  # images one request may ask for (None: a request's images may span batches)

    def __init__(self, run: RunFn, max_batch: int, max_wait_s: float, max_queue: int, metrics: Metrics | None = None):
        self.run, self.max_batch, self.max_wait_s, self.max_queue = run, max_batch, max_wait_s, max_queue
        self.metrics = metrics
        self.accepting = True
        self.drained = asyncio.Event()
        self._queue: deque[Job] = deque()
        self._wake = asyncio.Event()
        self._batch_s = 1.0  # moving average of a batch's run time, for Retry-After
        self._task: asyncio.Task | None = None
        self._idle_since = 0.0  # perf_counter when the last batch ended
        self._jobs: set[Job] = set()  # accepted and not yet answered (queued or running)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="batcher")
        self._task.add_done_callback(_log_crash)

    def close(self) -> None:
        """Stop intake; what is queued still runs, then `drained` is set."""
        self.accepting = False
        self._wake.set()

    def abandon(self, reason: str) -> int:
        """Answer every accepted request `Draining(reason)` now: the queue empties and the running batch stops
        at its next step. The number of requests abandoned."""
        self.accepting = False
        jobs = list(self._jobs)
        for job in jobs:
            job.gone = True
            if not job.future.done():
                job.future.set_exception(Draining(reason))
        self._queue.clear()
        self._set_depth()
        self._wake.set()
        return len(jobs)

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._batch_s * (1 + len(self._queue) / self.max_batch)))

    async def submit(self, prepared: PreparedRequest, counted: bool = True, stream: Any = None) -> Outcome:
        """The request's images once its batch ran. QueueFull / Draining at once; BatchFailed if its batch raised.
        `counted=False` (the warm-up) keeps its batch out of the metrics; `stream` gets its progress."""
        if not self.accepting:
            raise Draining("the server is draining")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(self.retry_after_s())
        job = Job(prepared, asyncio.get_running_loop().create_future(), time.perf_counter(), counted=counted,
                  stream=stream)
        self._queue.append(job)
        self._jobs.add(job)
        self._set_depth()
        self._wake.set()
        try:
            return await job.future
        finally:
            self._jobs.discard(job)
            if job.future.cancelled():  # its caller went away: its batch may stop (read by the run's thread)
                job.gone = True
            if job.started is None and job in self._queue:  # cancelled while waiting: leave the queue
                self._queue.remove(job)
                self._set_depth()

    # ---- the worker ----

    async def _worker(self) -> None:
        while True:
            if not self._queue:
                if not self.accepting:
                    self.drained.set()
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs = await self._collect()
            if jobs:
                await self._execute(jobs)

    def _compatible(self, head: Job) -> list[Job]:
        """The head and, in arrival order, every queued job with its key that still fits in max_batch images."""
        jobs, n = [head], head.images
        for job in self._queue:
            if job is not head and job.key == head.key and n + job.images <= self.max_batch:
                jobs.append(job)
                n += job.images
        return jobs

    async def _collect(self) -> list[Job]:
        head = self._queue[0]
        # from the head's arrival, or from when the last batch ended if it arrived while that one ran: clients
        # whose answers just went out get max_wait_s to come back and join (else batches split and stay split)
        deadline = max(head.arrived, self._idle_since) + self.max_wait_s
        while True:
            jobs = self._compatible(head)
            wait = deadline - time.perf_counter()
            if sum(j.images for j in jobs) >= self.max_batch or wait <= 0 or not self.accepting:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            if head not in self._queue:  # its caller went away: start over from the new head
                return []
        now = time.perf_counter()
        for job in jobs:
            self._queue.remove(job)
            job.started = now
        self._set_depth()
        return jobs

    async def _execute(self, jobs: list[Job]) -> None:
        requests = [j.prepared for j in jobs]
        n = sum(j.images for j in jobs)
        metrics = self.metrics if any(j.counted for j in jobs) else None
        t0 = time.perf_counter()

        def nobody_waits() -> bool:  # asked from the run's thread between steps: reads only plain flags
            return all(j.gone for j in jobs)

        streams = [j.stream for j in jobs]
        previews = None
        if any(streams):  # every step reaches the streamed requests; pixels as often as the most eager asks
            from engine.server.stream import route

            every = math.gcd(*(s.preview_every for s in streams if s is not None))  # 0 when none asks for pixels
            previews = Previews(every, route(jobs, streams))
        try:
            images = await asyncio.to_thread(self.run, requests, min(n, self.max_batch), nobody_waits, previews)
        except Stopped as exc:
            self._idle_since = time.perf_counter()
            log.info("batch of %d request(s) %s", len(jobs), exc)
            if metrics is not None:
                metrics.executions.inc()
                metrics.stopped.inc()
            return
        except Exception as exc:
            self._idle_since = time.perf_counter()  # the batch's requests fail; the server keeps serving
            log.error("batch of %d request(s) failed: %s: %s", len(jobs), type(exc).__name__, exc)
            if metrics is not None:
                metrics.executions.inc()
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(BatchFailed(f"{type(exc).__name__}: {exc}"))
            return
        self._idle_since = time.perf_counter()
        compute = self._idle_since - t0
        self._batch_s += BATCH_TIME_WEIGHT * (compute - self._batch_s)
        if metrics is not None and images:
            metrics.observe_batch(n, images[0].timings_ms)
        start = 0
        for job in jobs:
            mine = images[start:start + job.images]
            start += job.images
            if not job.future.done():  # a cancelled job's rows are discarded
                job.future.set_result(Outcome(mine, (job.started or t0) - job.arrived, compute, n))

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.pending.set(len(self._queue))


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("batch worker stopped: %r", task.exception())
