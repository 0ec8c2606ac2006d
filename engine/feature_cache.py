"""Feature caching at run time (DeepCache): which steps run the full UNet and which its shallow graph.

Engines built with `--cache-branch B` have the full UNet (it also returns the cache of branch B) and the shallow
graph `unet_shallow` (export/feature_cache.py). A request with `cache_interval` N > 1 runs the full graph on the
steps its schedule picks and the shallow one on the others, which read the cache the last full step wrote:

- "uniform" (DeepCache's default, and what its `DeepCacheSDHelper` does): a full step every N steps, the first
  step of the run first;
- "center" (DeepCache's non-uniform schedule, `sample_from_quad_center` in its pipelines): ceil(n / N) full steps
  over the n steps run, denser around the middle step (center = n // 2, power searched down from 1.4 as DeepCache
  does).

The choice is known for every step before the loop starts (`full_steps`), so the host picks which step to run (or
which captured CUDA graph to replay) with no device sync. The cache tensors are step buffers (`cache.<name>`,
[2B, C, h/s, w/s] float32): the full step writes them in place and the shallow step reads them, so both steps are
functions of one set of buffers, as graph capture wants. Rows of one batch share the choice (the interval and
schedule are part of the batch key); a step-batched flight runs its rows' full and shallow steps apart
(engine/continuous.py).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from engine.denoise import CACHE
from engine.request import Request, RequestError
from export.feature_cache import SHALLOW
from export.specs import Dims

SCHEDULES = ("uniform", "center")
CENTER_POWER = 1.4  # the power DeepCache's center schedule starts its search from


def center_steps(n: int, full: int, center: int, power: float = CENTER_POWER) -> list[int]:
    """DeepCache's non-uniform schedule: `full` step indices in [0, n), denser around `center`; ValueError when no
    power above 1 gives that many distinct steps. Its arithmetic as DeepCache's (a negative base to a fractional
    power is complex in Python, and the integer cast keeps the real part), so the steps are its steps."""
    while power > 1:
        x = np.linspace(complex(-center) ** (1 / power), (n - center) ** (1 / power), full + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            steps = [0] + [int(v) + center for v in np.unique((x ** power).real.astype(np.int32))[1:-1]]
        if len(steps) == full:
            return steps
        power -= 0.02
    raise ValueError(f"no center schedule of {full} full steps in {n}")


def full_steps(r: Request, start: int, stop: int) -> tuple[bool, ...] | None:
    """Per step index 0 .. stop - 1: whether it runs the full UNet (steps before `start` are not run); None when the
    request runs every step in full (cache_interval 1)."""
    if r.cache_interval <= 1:
        return None
    n = stop - start
    if r.cache_schedule == "uniform":
        chosen = set(range(0, n, r.cache_interval))
    else:
        chosen = set(center_steps(n, math.ceil(n / r.cache_interval), n // 2))
    return tuple(i >= start and (i - start) in chosen for i in range(stop))


def check(r: Request, runners: dict, model: str | None, start: int, stop: int) -> None:
    """RequestError naming the field, before any work: an interval on engines built without the shallow graph, or a
    center schedule that cannot place its full steps."""
    if r.cache_interval <= 1:
        return
    if SHALLOW not in runners:
        raise RequestError("cache_interval", f"cache_interval {r.cache_interval} needs engines built with a feature "
                                             f"cache: python -m engine.build --model {model or 'MODEL'} --cache-branch 0")
    try:
        full_steps(r, start, stop)
    except ValueError as e:
        raise RequestError("cache_schedule", f"cache_schedule center with cache_interval {r.cache_interval}: {e}; "
                                             "use a smaller interval or the uniform schedule") from None


def buffers(runners: dict, dims: Dims, full: tuple[bool, ...] | None, latents: torch.Tensor,
            cfg: bool) -> dict[str, torch.Tensor]:
    """Zeroed cache buffers for the denoiser rows of `latents` [B, C, h, w] (2B with guidance); none without a cache
    (`full` None)."""
    if full is None:
        return {}
    batch, height, width = latents.shape[0] * (2 if cfg else 1), latents.shape[2], latents.shape[3]
    shapes = runners[SHALLOW].spec.input_shapes(dims, batch, height * dims.vae_scale, width * dims.vae_scale)
    return {CACHE + n: torch.zeros(s, dtype=torch.float32, device=latents.device)
            for n, s in shapes.items() if n.startswith("cache_b")}


def denoiser(runners: dict, name: str, shallow: bool):
    """The runner of a step: the shallow graph, or the full denoiser `name`."""
    return runners[SHALLOW] if shallow else runners[name]
