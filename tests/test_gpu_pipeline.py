"""GPU-only checks of the torch fast path and step-graph reuse (skipped with a reason without CUDA).

The fast path is fp16 + our attention kernel + torch.compile of the UNet (`engine.build --compile`, channels_last
on CUDA) + the whole-step CUDA graph; the compiled UNet's parity with eager is also tested on the CPU
(tests/test_torch_compile.py), so what only runs here is the kernel inside the compiled graph and the capture."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.request import Request
from tests.helpers import Wrapped, max_diff

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


@pytest.fixture(scope="module")
def compiled_pipe(tmp_path_factory, tiny_folder):
    from engine.build import build_all
    from engine.config import BuildConfig
    from engine.pipeline import Pipeline

    d = tmp_path_factory.mktemp("cuda_compiled_engines")
    build_all(BuildConfig(model="tiny", backend="torch", device="cuda", precision="fp16", engine_dir=d,
                          batch_size=2, compile=True), progress=False)
    return Pipeline.load(d)


def two(prompts=("a cat", "a dog"), **kw) -> list[Request]:
    return [Request(prompt=p, seed=3, **kw) for p in prompts]


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_cuda_graph_replay_equals_eager(cuda_pipe, scheduler):
    reqs = two(steps=10, sampler=scheduler)
    eager = cuda_pipe.run(reqs, progress=False, cuda_graph=False)
    graphed = cuda_pipe.run(reqs, progress=False, cuda_graph=True)
    assert graphed[0].params["cuda_graph"] and not eager[0].params["cuda_graph"]
    for e, g in zip(eager, graphed, strict=True):
        assert max_diff(e.pixels, g.pixels) <= 1


def test_step_graph_is_captured_once_and_replayed(cuda_pipe):
    unet = cuda_pipe.runners["unet"]
    cuda_pipe.runners["unet"] = spy = Wrapped(unet)
    calls = spy.calls
    try:
        reqs = two(steps=6, sampler="euler_a", height=64, width=64)
        first = cuda_pipe.run(reqs, progress=False)
        n_first, n_graphs = len(calls), len(cuda_pipe._graphs)
        second = cuda_pipe.run([dataclasses.replace(r, seed=9, guidance_scale=5.0) for r in reqs], progress=False)
    finally:
        cuda_pipe.runners["unet"] = unet
    assert n_first == 2  # one warm-up step + the capture, then replays only
    assert len(calls) == n_first and len(cuda_pipe._graphs) == n_graphs  # second call: replay, no warm-up
    assert second[0].params["cuda_graph"]
    assert max_diff(first[0].pixels, second[0].pixels) > 10  # new inputs were used


def test_fp16_cuda_matches_cpu_fp32(cuda_pipe, ort_engines):
    from engine.pipeline import Pipeline

    cpu = Pipeline.load(ort_engines)
    reqs = two(("a lighthouse", "a boat"), steps=8, sampler="ddim", height=128, width=128)
    for a, b in zip(cuda_pipe.run(reqs, progress=False), cpu.run(reqs, progress=False), strict=True):
        d = np.abs(a.pixels.astype(int) - b.pixels.astype(int))
        assert d.mean() < 2 and d.max() <= 16  # fp16 vs fp32 over 8 steps


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_compiled_fast_path_matches_eager(cuda_pipe, compiled_pipe, scheduler):
    """Compiled UNet inside the captured step graph against the eager fp16 pipeline (same kernel, same weights)."""
    reqs = two(steps=8, sampler=scheduler)
    eager = cuda_pipe.run(reqs, progress=False, cuda_graph=False)
    fast = compiled_pipe.run(reqs, progress=False, cuda_graph=True)
    assert compiled_pipe.runners["unet"].compiled and fast[0].params["cuda_graph"]
    for e, f in zip(eager, fast, strict=True):
        d = np.abs(e.pixels.astype(int) - f.pixels.astype(int))
        assert d.mean() < 1 and d.max() <= 8  # fp16: inductor's fusions round differently from eager
