"""GPU-only checks of the torch fast path (skipped with a reason on machines without CUDA)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


@pytest.fixture(scope="module")
def cuda_pipe(tmp_path_factory, tiny_folder):
    from engine.build import build_all
    from engine.config import BuildConfig
    from engine.pipeline import Pipeline

    d = tmp_path_factory.mktemp("cuda_engines")
    build_all(BuildConfig(model="tiny", backend="torch", device="cuda", precision="fp16", engine_dir=d,
                          batch_size=2), progress=False)
    return Pipeline.from_engines(d, "tiny")


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_cuda_graph_replay_equals_eager(cuda_pipe, scheduler):
    args = (["a cat", "a dog"], "", 10, 7.5, scheduler, 3)
    eager = cuda_pipe(*args, progress=False, cuda_graph=False)
    graphed = cuda_pipe(*args, progress=False, cuda_graph=True)
    assert graphed.params["cuda_graph"] and not eager.params["cuda_graph"]
    assert np.abs(eager.images.astype(int) - graphed.images.astype(int)).max() <= 1


def test_fp16_cuda_matches_cpu_fp32(cuda_pipe, ort_engines):
    from engine.pipeline import Pipeline

    cpu = Pipeline.from_engines(ort_engines, "tiny")
    args = (["a lighthouse", "a boat"], "", 8, 7.5, "ddim", 11, 128, 128)
    a = cuda_pipe(*args, progress=False).images.astype(int)
    b = cpu(*args, progress=False).images.astype(int)
    assert np.abs(a - b).mean() < 2 and np.abs(a - b).max() <= 16  # fp16 vs fp32 over 8 steps
