"""CUDA graphs, one mechanism (torch.cuda.CUDAGraph) for the two things the engine captures:

- `StepGraph` / `try_capture`: the whole denoise step (UNet + CFG + sampler update), replayed per step.
  Possible because the step is graph-safe: the step index, guidance and every per-step coefficient
  live in device tensors, so one captured graph serves every step of a run. Shapes and addresses are
  frozen in the graph, so the graph owns static buffers for everything the step reads; a later run with
  the same key (shape, sampler, steps, guidance on/off, ...) copies its inputs into those buffers and
  replays, with no new capture and no warm-up step. Capture needs every runner to be graph-safe (no host
  sync, stream-ordered work on torch's current stream); when capture fails we fall back to eager steps
  and say so once.
- `StepGraphCache`: the bounded cache of step graphs per key that the static batch (pipeline) and the
  continuous flight share: a miss captures (`try_capture`), a failed capture is cached as None (eager,
  warned once for that key), the least recently used key goes first when full.
- `GraphCache`: one runner's own graphs of an enqueue function per key (the TensorRT UNet per input
  shape, on the runner's stream): first call eager, second captured, later ones replayed.
"""
from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

Buffers = dict[str, torch.Tensor]  # "idx", "latents", "state" + whatever else the step reads
StepFn = Callable[[Buffers], tuple[torch.Tensor, torch.Tensor]]  # buffers -> (new latents, new state)


class StepGraph:
    """Replays `step(buffers) -> (latents, state)` in place on static buffers.

    Each replay reads the buffers, writes the new latents/state into the same buffers and advances
    buffers["idx"], all on the device: the host only launches the graph. Several step functions (a full and a
    shallow UNet step: engine/feature_cache.py) are captured as one graph each over the same static buffers, and
    `replay(k)` runs the k-th."""

    def __init__(self, step: StepFn | Sequence[StepFn], buffers: Buffers, warmup: int = 1):
        steps = [step] if callable(step) else list(step)
        self.buffers = {k: v.clone() for k, v in buffers.items()}  # static: owned by the graphs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: lazy inits, allocator pools
            for fn in steps:
                for _ in range(warmup):
                    self._advance(fn)
        torch.cuda.current_stream().wait_stream(side)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        for fn in steps:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._advance(fn)
            self.graphs.append(graph)

    def _advance(self, step: StepFn) -> None:
        lat, st = step(self.buffers)
        self.buffers["latents"].copy_(lat)
        self.buffers["state"].copy_(st)
        self.buffers["idx"].add_(1)

    def load(self, values: Buffers) -> None:
        """Copy a run's inputs into the static buffers (same shapes and dtypes as at capture)."""
        for k, v in values.items():
            self.buffers[k].copy_(v)

    def replay(self, k: int = 0) -> None:
        self.graphs[k].replay()


def try_capture(step: StepFn | Sequence[StepFn], buffers: Buffers) -> StepGraph | None:
    """A captured step graph, or None (with one warning) when capture is not possible here."""
    if not buffers["latents"].is_cuda:
        return None
    try:
        return StepGraph(step, buffers)
    except RuntimeError as e:  # capture refused (a host sync or an uncapturable call inside the step)
        warnings.warn(f"CUDA graph capture of the denoise step failed, running eagerly: {e}", stacklevel=2)
        return None


class StepGraphCache:
    """At most `max_graphs` step graphs (each owns its static buffers), by key: the shapes, sampler, steps,
    guidance on/off ... of what the step reads. Least recently used goes first. A key whose capture failed
    (or that cannot be captured here: CPU) holds None, so it runs eagerly without trying (and warning) again.
    `clear()` when the captured steps would read stale memory (the UNet's weights moved)."""

    def __init__(self, max_graphs: int):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, StepGraph | None] = OrderedDict()  # oldest use first

    def get_or_capture(self, key: Hashable, step: StepFn | Sequence[StepFn], buffers: Buffers) -> StepGraph | None:
        """The graph of `key` (captured from `step` on `buffers` on a miss), or None: run `step` eagerly."""
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        graph = self._graphs[key] = try_capture(step, buffers)
        return graph

    def clear(self) -> None:
        self._graphs.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: object) -> bool:
        return key in self._graphs

    def values(self) -> list[StepGraph | None]:
        """The cached entries, least recently used first (None: a key that runs eagerly)."""
        return list(self._graphs.values())


# ---- a runner's own graphs, per key ---------------------------------------------------------------------


def capture(stream: torch.cuda.Stream | None, enqueue: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph | None, str]:
    """Capture the work `enqueue()` puts on `stream` into a graph: (graph, "") or (None, reason).

    Capture runs in thread-local mode, so unrelated CUDA calls on other threads do not invalidate it.
    `enqueue` returning False (TensorRT's execute_async_v3 failure) or raising also aborts it; the
    capture is always ended, so the stream stays usable for eager work."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            if enqueue() is False:
                raise RuntimeError("the enqueue call returned False during capture")
    except Exception as e:  # noqa: BLE001 - reported as the reason, the caller falls back to eager
        return None, f"{type(e).__name__}: {e}"
    return graph, ""


class GraphCache:
    """CUDA graphs of one enqueue function per key (e.g. the input shapes), on one stream.

    `run(key, enqueue)`: the first call for a key runs eagerly (warm-up: lazy initialisation happens
    outside capture), the second captures and replays, later ones replay. A key whose capture fails
    stays eager; the first failure is logged once. `clear()` drops every graph (memory moved)."""

    def __init__(self, stream: torch.cuda.Stream | None, label: str, enabled: bool = True):
        self.stream, self.label, self.enabled = stream, label, enabled
        self._graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        self._warm: set[Any] = set()
        self._failed: set[Any] = set()
        self._told = False

    def is_warm(self, key: Any) -> bool:
        return key in self._warm

    @property
    def keys(self) -> list[Any]:
        return list(self._graphs)

    def run(self, key: Any, enqueue: Callable[[], object]) -> None:
        graph = self._graphs.get(key)
        if graph is None and self.enabled and key in self._warm and key not in self._failed:
            graph = self._capture(key, enqueue)
        if graph is not None:
            with torch.cuda.stream(self.stream):  # replay() launches on the current stream
                graph.replay()
            return
        enqueue()
        self._warm.add(key)

    def _capture(self, key: Any, enqueue: Callable[[], object]) -> torch.cuda.CUDAGraph | None:
        graph, reason = capture(self.stream, enqueue)
        if graph is None:
            self._failed.add(key)
            if not self._told:
                log.warning("%s: CUDA graph capture failed (%s); running eagerly", self.label, reason)
                self._told = True
            return None
        self._graphs[key] = graph
        return graph

    def clear(self) -> None:
        for graph in self._graphs.values():
            graph.reset()
        self._graphs.clear()
