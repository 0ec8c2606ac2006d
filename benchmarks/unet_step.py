"""UNet step, backends and precisions interleaved in one process, with each one's error against fp32.

For each size, every variant (backend, precision) builds the UNet alone (through the cache), then the timed
calls alternate between variants (call i of every variant before call i+1 of any), so drift of the machine
(other load, clocks) hits them alike. Inputs are one classifier-free-guidance step of one image: batch 2.
Rows per (variant, size): `unet_call_ms_p50/p90/p99/mean`, `max_abs_err` and `ref_abs_max` against the
first variant (the fp32 reference), and `time_vs_ref` (p50 over the reference's p50, same run).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.schema import Results, percentiles


@dataclass(frozen=True)
class UnetStepBench:
    model: str = "tiny"
    sizes: tuple[int, ...] = (128,)
    variants: tuple[tuple[str, str], ...] = (("onnxruntime", "fp32"), ("torch", "fp32"))  # first = reference
    runs: int = 5
    device: str = "cpu"


def load_unet(model: str, backend: str, precision: str, engine_dir: Path, device: str):
    """The UNet runner of a fresh or cached build of `model` with `backend` at `precision`."""
    from engine import cache
    from engine.backends.base import get_backend
    from engine.build import build_all
    from engine.config import BuildConfig
    from export.families import get_family

    record = build_all(BuildConfig(model=model, backend=backend, precision=precision, engine_dir=engine_dir,
                                   components=("unet",), device=device), progress=False).record
    art = engine_dir / record["model_id"] / record["components"]["unet"]["dir"]
    spec = get_family(record["family"]).spec("unet")
    return get_backend(backend).load(spec, art, cache.verify(art), device), record


def measure(results: Results, cfg: UnetStepBench, engine_dir: Path | None = None) -> None:
    import torch

    from benchmarks.pipeline import unavailable
    from export.models import folder_dims, resolve_model
    from export.onnx_export import example_inputs
    from export.specs import Shape

    engine_dir = engine_dir or Path(tempfile.mkdtemp(prefix="bench-unet-"))
    folder, _ = resolve_model(cfg.model)
    dims = folder_dims(folder)
    runners = {}
    for backend, precision in cfg.variants:
        reason = unavailable(backend, cfg.device)
        if reason:
            results.skip("unet_step", {"model": cfg.model, "backend": backend, "precision": precision}, reason)
            continue
        try:
            runners[(backend, precision)] = load_unet(cfg.model, backend, precision, engine_dir, cfg.device)[0]
        except ValueError as e:  # a precision this backend or CPU refuses: say so instead of a number
            results.skip("unet_step", {"model": cfg.model, "backend": backend, "precision": precision}, str(e))
    if not runners:
        return
    ref_key = next(iter(runners))
    for size in cfg.sizes:
        spec = runners[ref_key].spec
        base = example_inputs(spec, dims, Shape(1, size, size), "fp32", seed=0)  # [2, C, H/8, W/8] with CFG
        outs, samples = {}, {k: [] for k in runners}
        for i in range(cfg.runs + 1):  # call 0 of each variant is its warm-up
            for key, runner in runners.items():
                inputs = {n: v.to(runner.device) for n, v in base.items()}
                t0 = time.perf_counter()
                out = next(iter(runner(**inputs).values()))
                if out.is_cuda:
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) * 1e3
                if i == 0:
                    outs[key] = out.float().cpu()
                else:
                    samples[key].append(ms)
        ref = outs[ref_key]
        ref_p50 = percentiles(samples[ref_key])["p50"]
        for key in runners:
            config = {"model": cfg.model, "backend": key[0], "precision": key[1], "size": size, "batch": 2,
                      "reference": f"{ref_key[0]} {ref_key[1]}"}
            results.add_samples("unet_step", config, "unet_call_ms", samples[key], "ms")
            results.add("unet_step", config, "max_abs_err", float((outs[key] - ref).abs().max()), "abs")
            results.add("unet_step", config, "ref_abs_max", float(ref.abs().max()), "abs")
            results.add("unet_step", config, "time_vs_ref", percentiles(samples[key])["p50"] / ref_p50, "ratio")
    for runner in runners.values():
        runner.close()
