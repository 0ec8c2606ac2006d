"""Pipeline benchmark: per-stage latency, UNet it/s, images/s per batch size and peak memory, per backend.

Each backend is built (through the cache) and loaded in this process, run once to warm up, then `runs`
times; every stage's p50/p90/p99 goes into rows of the common schema (benchmarks/schema.py):

    tokenize_ms   the tokenizer(s) alone, on the same prompts
    clip_ms       text encoding, tokenizing included (as the pipeline times it)
    unet_step_ms  one denoising step: UNet (twice the batch with guidance) + CFG + sampler update
    vae_ms        VAE decode
    png_ms        PNG encode with the parameters chunk (in memory)
    e2e_ms        request in, pixels out (pipeline total; PNG not included)
    unet_its      steps per second (1000 / unet_step_ms p50)
    images_per_s  at each batch size, images / wall time of one run (p50 over runs)
    peak_rss_gib  CPU: the process's peak RSS over this backend's runs (VmHWM, reset before)
    peak_gpu_gib  GPU: torch.cuda.max_memory_allocated over the runs (TensorRT's own allocations not included)
    gpu_used_gib  GPU: the device's used memory as NVML reports it (nvidia-smi) after the runs, all allocations
A backend that is not installed, or cannot run on this device, gets a skipped row with the reason. A backend
may name its precision (`openvino:bf16`); without one, the backend's default.

    python -m benchmarks.pipeline [--model sd15 --size 256 --steps 10] [--backends onnxruntime,openvino:bf16]
                                  [--runs 3] [--batch-sizes 1] [--device cpu] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import RESULTS
from benchmarks.schema import Results, peak_rss_bytes, reset_peak_rss

PROMPT = "a lighthouse at dusk, oil painting"


@dataclass(frozen=True)
class PipelineBench:
    model: str = "tiny"
    size: int = 128
    steps: int = 20
    sampler: str = "dpmpp_2m"
    backends: tuple[str, ...] = ("onnxruntime", "torch")
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    runs: int = 10  # timed runs per backend after one warm-up (batch 1)
    batch_runs: int = 3  # timed runs per batch size
    device: str = "cpu"


def nvml_used_gib() -> float | None:
    """Used memory of GPU 0 from NVML through nvidia-smi (every allocation, TensorRT's included); None without it."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return float(out.stdout.strip().splitlines()[0]) / 1024  # MiB
    except (ValueError, IndexError):
        return None


def unavailable(backend: str, device: str) -> str | None:
    """Why `backend` cannot run here, or None."""
    import importlib.util

    from engine.backends.base import BACKEND_MODULES

    if backend not in BACKEND_MODULES:
        return f"no {backend} backend in this version of the engine (have: {', '.join(BACKEND_MODULES)})"
    if backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed (it cannot be installed where this engine is developed)"
        if not device.startswith("cuda"):
            return "TensorRT needs a CUDA GPU"
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (pip install openvino)"
    if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        return "ONNX Runtime is not installed"
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`backend` or `backend:precision` -> (backend, precision or None for the backend's default)."""
    backend, _, precision = spec.partition(":")
    return backend, precision or None


def bench_backend(results: Results, cfg: PipelineBench, spec: str, engine_dir: Path) -> None:
    from engine.build import build_all
    from engine.config import BuildConfig
    from engine.pipeline import Pipeline
    from engine.png import png_bytes
    from engine.request import Request

    backend, precision = parse_spec(spec)
    base = {"model": cfg.model, "backend": backend, "size": cfg.size, "steps": cfg.steps, "sampler": cfg.sampler}
    if precision:
        base["precision"] = precision
    reason = unavailable(backend, cfg.device)
    if reason:
        results.skip("pipeline", base, reason)
        return
    try:
        record = build_all(BuildConfig(model=cfg.model, backend=backend, precision=precision, engine_dir=engine_dir,
                                       height=cfg.size, width=cfg.size, device=cfg.device), progress=False).record
    except (ImportError, ValueError, RuntimeError, OSError) as e:  # e.g. an exporter library missing on a GPU box
        results.skip("pipeline", base, f"build failed: {type(e).__name__}: {e}")
        return
    base["precision"] = record["precision"]
    pipe = Pipeline.load(engine_dir, record["model_id"], device=cfg.device)
    try:
        req = Request(prompt=PROMPT, steps=cfg.steps, sampler=cfg.sampler, seed=0, height=cfg.size, width=cfg.size)
        cuda = cfg.device.startswith("cuda")
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        rss_ok = not cuda and reset_peak_rss()
        first = pipe.run(req, progress=False, batch_size=1)[0]  # warm-up (and graph capture on GPU)
        stages: dict[str, list[float]] = {k: [] for k in ("clip_ms", "unet_step_ms", "vae_ms", "e2e_ms", "png_ms",
                                                          "tokenize_ms")}
        for _ in range(cfg.runs):
            g = pipe.run(req, progress=False, batch_size=1)[0]
            t = g.timings_ms
            for key, name in (("clip_ms", "clip"), ("unet_step_ms", "unet_per_step"), ("vae_ms", "vae"),
                              ("e2e_ms", "total")):
                stages[key].append(t[name])
            stages["png_ms"].append(_timed(lambda g=g: png_bytes(g.pixels, g.params), "cpu"))
            stages["tokenize_ms"].append(_timed(lambda: [tok([PROMPT, ""], padding="max_length", truncation=True,
                                                             max_length=tok.model_max_length)
                                                         for tok in pipe.tokenizers], "cpu"))
        for metric, samples in stages.items():
            results.add_samples("pipeline", {**base, "batch": 1}, metric, samples, "ms",
                                keep_samples=metric == "e2e_ms")
        its = 1e3 / sorted(stages["unet_step_ms"])[len(stages["unet_step_ms"]) // 2]
        results.add("pipeline", {**base, "batch": 1}, "unet_its", its, "it/s")
        for b in cfg.batch_sizes:
            reqs = Request(**{**asdict(req), "images": b})
            pipe.run(reqs, progress=False, batch_size=b)  # warm-up at this batch
            walls = [_timed(lambda reqs=reqs, b=b: pipe.run(reqs, progress=False, batch_size=b), cfg.device)
                     for _ in range(cfg.batch_runs)]
            results.add("pipeline", {**base, "batch": b}, "images_per_s", b * 1e3 / sorted(walls)[len(walls) // 2],
                        "img/s", n=len(walls))
        if cuda:
            import torch

            results.add("pipeline", base, "peak_gpu_gib", torch.cuda.max_memory_allocated() / 2**30, "GiB")
            used = nvml_used_gib()
            if used is not None:
                results.add("pipeline", base, "gpu_used_gib", used, "GiB")
        elif rss_ok:
            results.add("pipeline", base, "peak_rss_gib", peak_rss_bytes() / 2**30, "GiB")
        del first
    finally:
        pipe.close()


def measure(results: Results, cfg: PipelineBench, engine_dir: Path) -> None:
    """Every backend of `cfg` side by side, same model, size, sampler and prompt."""
    for backend in cfg.backends:
        bench_backend(results, cfg, backend, engine_dir)


def main(argv: list[str] | None = None) -> int:
    d = PipelineBench()
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default=d.model)
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--sampler", default=d.sampler)
    p.add_argument("--backends", default=",".join(d.backends), help="comma separated, each backend[:precision]")
    p.add_argument("--runs", type=int, default=d.runs)
    p.add_argument("--batch-sizes", default=",".join(map(str, d.batch_sizes)))
    p.add_argument("--device", default=d.device)
    p.add_argument("--engine-dir", type=Path, default=None, help="build into (or reuse) this dir; default: a temp dir")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    cfg = PipelineBench(model=a.model, size=a.size, steps=a.steps, sampler=a.sampler,
                        backends=tuple(a.backends.split(",")), runs=a.runs,
                        batch_sizes=tuple(int(x) for x in a.batch_sizes.split(",")), device=a.device)
    results = Results(device=a.device, suite="pipeline")
    with tempfile.TemporaryDirectory(prefix="pipeline-") as tmp:
        measure(results, cfg, a.engine_dir or Path(tmp))
    for r in results.rows:
        c = r["config"]
        where = f"{c['backend']} {c.get('precision', '-')} batch {c.get('batch', '-')}"
        if r["value"] is None:
            print(f"{where}: skipped, {r.get('skipped')}")
        elif r["metric"] in ("e2e_ms_p50", "unet_step_ms_p50", "images_per_s"):
            print(f"{where}: {r['metric']} {r['value']:.2f} {r['unit']}")
    print(f"wrote {results.write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
