"""CUDA-graph capture of the whole denoise step (UNet + CFG + sampler update), replayed per step.

Possible because the step is graph-safe: the step index, guidance and every per-step coefficient
live in device tensors, so one captured graph serves every step of a run. Shapes and addresses are
frozen in the graph, so the graph owns static buffers for everything the step reads; a later run with
the same key (shape, sampler, steps, guidance on/off, ...) copies its inputs into those buffers and
replays, with no new capture and no warm-up step. Capture needs every runner to be graph-safe (no host
sync, stream-ordered work on torch's current stream); when capture fails we fall back to eager steps
and say so once.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

Buffers = dict[str, torch.Tensor]  # "idx", "latents", "state" + whatever else the step reads
StepFn = Callable[[Buffers], tuple[torch.Tensor, torch.Tensor]]  # buffers -> (new latents, new state)


class StepGraph:
    """Replays `step(buffers) -> (latents, state)` in place on static buffers.

    Each replay reads the buffers, writes the new latents/state into the same buffers and advances
    buffers["idx"], all on the device: the host only launches the graph."""

    def __init__(self, step: StepFn, buffers: Buffers, warmup: int = 1):
        self.buffers = {k: v.clone() for k, v in buffers.items()}  # static: owned by the graph
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: lazy inits, allocator pools
            for _ in range(warmup):
                self._advance(step)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._advance(step)

    def _advance(self, step: StepFn) -> None:
        lat, st = step(self.buffers)
        self.buffers["latents"].copy_(lat)
        self.buffers["state"].copy_(st)
        self.buffers["idx"].add_(1)

    def load(self, values: Buffers) -> None:
        """Copy a run's inputs into the static buffers (same shapes and dtypes as at capture)."""
        for k, v in values.items():
            self.buffers[k].copy_(v)

    def replay(self) -> None:
        self.graph.replay()


def try_capture(step: StepFn, buffers: Buffers) -> StepGraph | None:
    """A captured step graph, or None (with one warning) when capture is not possible here."""
    if not buffers["latents"].is_cuda:
        return None
    try:
        return StepGraph(step, buffers)
    except RuntimeError as e:  # capture refused (a host sync or an uncapturable call inside the step)
        warnings.warn(f"CUDA graph capture of the denoise step failed, running eagerly: {e}", stacklevel=2)
        return None
