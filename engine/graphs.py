"""CUDA-graph capture of the whole denoise step (UNet + CFG + sampler update), replayed per step.

Possible because the step is graph-safe: the step index, guidance and every per-step coefficient
live in device tensors, so one captured graph serves every step of a run. Shapes and addresses are
frozen in the graph, so a new batch/size/sampler captures a new one. Capture needs every runner to be
graph-safe (no host sync, stream-ordered work on torch's current stream); when capture fails we fall
back to eager steps and say so once.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StepGraph:
    """Replays `step(idx, latents, state) -> (latents, state)` in place on static buffers.

    Each replay reads idx/latents/state, writes the new latents/state into the same buffers and
    advances idx, all on the device: the host only launches the graph."""

    def __init__(self, step: StepFn, idx: torch.Tensor, latents: torch.Tensor, state: torch.Tensor, warmup: int = 1):
        self.idx, self.latents, self.state = idx, latents, state
        saved = (idx.clone(), latents.clone(), state.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: lazy inits, allocator pools
            for _ in range(warmup):
                self._advance(step)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._advance(step)
        for buf, value in zip((idx, latents, state), saved):  # capture ran nothing; warm-up did
            buf.copy_(value)

    def _advance(self, step: StepFn) -> None:
        lat, st = step(self.idx, self.latents, self.state)
        self.latents.copy_(lat)
        self.state.copy_(st)
        self.idx.add_(1)

    def replay(self) -> None:
        self.graph.replay()


def try_capture(step: StepFn, idx: torch.Tensor, latents: torch.Tensor, state: torch.Tensor) -> StepGraph | None:
    """A captured step graph, or None (with one warning) when capture is not possible here."""
    if not latents.is_cuda:
        return None
    try:
        return StepGraph(step, idx, latents, state)
    except RuntimeError as e:  # capture refused (a host sync or an uncapturable call inside the step)
        warnings.warn(f"CUDA graph capture of the denoise step failed, running eagerly: {e}", stacklevel=2)
        return None
