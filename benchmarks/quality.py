"""Quality gate of the reduced-precision CPU paths: each one's image against its own backend's fp32 image.

For each path (openvino bf16, torch bf16, onnxruntime int8, openvino int8) the same request (prompt, seed, sampler,
steps, size) runs through the whole pipeline twice, once built at the reduced precision and once at fp32 with the
same backend, and the two uint8 images are compared: `mean_abs_px`, `max_abs_px` (0..255) and `psnr_db`
(10·log10(255² / MSE); inf when identical is written as 99 dB, the cap of identical images). A path this CPU
cannot run (no avx512_bf16 / AMX for bf16, a backend not installed) is a skipped row with the reason.

The presets (`tiny`, `sd15`, ...) have seeded random weights: an untrained UNet's output is far less smooth
than a trained one's, and every step feeds the next, so the differences measured on them are an upper bound
for (not an estimate of) what a trained checkpoint of the same architecture shows. The rows say so.

    python -m benchmarks.quality                       # tiny, 128², 10 steps
    python -m benchmarks.quality --model sd15 --size 256 [--paths openvino:int8,openvino:bf16]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.schema import Results

PATHS = (("openvino", "bf16"), ("torch", "bf16"), ("onnxruntime", "int8"),  # each against (backend, "fp32")
         ("openvino", "int8"))
REFERENCE = "fp32"
PROMPT = "a lighthouse at dusk, oil painting"
PSNR_CAP_DB = 99.0  # identical images (MSE 0)
RANDOM_WEIGHTS_NOTE = ("random weights (a preset): differences are amplified relative to a trained model, "
                       "an upper bound rather than an estimate")
RESULTS_DIR = Path(__file__).parent / "results"


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """mean and max absolute difference (uint8 pixel units) and PSNR in dB of two images of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes {a.shape} and {b.shape}")
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = float((d * d).mean())
    psnr = PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))
    return {"mean_abs_px": float(np.abs(d).mean()), "max_abs_px": float(np.abs(d).max()), "psnr_db": psnr}


def image(model: str, backend: str, precision: str, engine_dir: Path, size: int, steps: int, seed: int,
          prompt: str = PROMPT) -> np.ndarray:
    """One txt2img image ([H, W, 3] uint8) from a fresh or cached build of `model` with `backend` at `precision`.
    Builds of one engine dir share its ONNX exports; each build rewrites build.json, so load right after it."""
    from engine.build import build_all
    from engine.config import BuildConfig
    from engine.pipeline import Pipeline
    from engine.request import Request

    record = build_all(BuildConfig(model=model, backend=backend, precision=precision, engine_dir=engine_dir,
                                   height=size, width=size, device="cpu"), progress=False).record
    pipe = Pipeline.load(engine_dir, record["model_id"], device="cpu")
    try:
        req = Request(prompt=prompt, steps=steps, sampler="dpmpp_2m", seed=seed, height=size, width=size)
        return pipe.run(req, progress=False)[0].pixels
    finally:
        pipe.close()


def measure(results: Results, *, model: str = "tiny", size: int = 128, steps: int = 10, seed: int = 0,
            engine_dir: Path | None = None, paths: tuple[tuple[str, str], ...] = PATHS) -> dict:
    """Add the `quality` rows of each path to `results`; returns {(backend, precision): figures} of those run."""
    from benchmarks.pipeline import unavailable

    engine_dir = engine_dir or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    from export.presets import ALL_PRESETS

    note = {"note": RANDOM_WEIGHTS_NOTE} if model in ALL_PRESETS else {}
    refs: dict[str, np.ndarray] = {}
    out = {}
    for backend, precision in paths:
        config = {"model": model, "backend": backend, "precision": precision, "reference": f"{backend} {REFERENCE}",
                  "size": size, "steps": steps, "seed": seed, "sampler": "dpmpp_2m"}
        reason = unavailable(backend, "cpu")
        if reason:
            results.skip("quality", config, reason)
            continue
        try:
            low = image(model, backend, precision, engine_dir, size, steps, seed)
        except ValueError as e:  # a precision this CPU or backend refuses: the reason instead of a number
            results.skip("quality", config, str(e))
            continue
        if backend not in refs:
            refs[backend] = image(model, backend, REFERENCE, engine_dir, size, steps, seed)
        figures = compare(low, refs[backend])
        units = {"mean_abs_px": "px", "max_abs_px": "px", "psnr_db": "dB"}
        for metric, value in figures.items():
            results.add("quality", config, metric, value, units[metric], **note)
        out[(backend, precision)] = figures
    return out


def _paths(text: str) -> tuple[tuple[str, str], ...]:
    """`openvino:int8,torch:bf16` -> (("openvino", "int8"), ("torch", "bf16"))."""
    out = []
    for item in text.split(","):
        backend, sep, precision = item.strip().partition(":")
        if not sep or not backend or not precision:
            raise argparse.ArgumentTypeError(f"path {item!r}: expected BACKEND:PRECISION (e.g. openvino:int8)")
        out.append((backend, precision))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    from export.quiet import add_verbose_flag, quiet_cli

    quiet_cli(argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="preset or local model path")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paths", type=_paths, default=PATHS, help="comma separated BACKEND:PRECISION, each against "
                    f"the same backend's fp32 (default: {','.join(f'{b}:{p}' for b, p in PATHS)})")
    ap.add_argument("--engine-dir", type=Path, default=None, help="where the builds go; default: a temp dir")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: benchmarks/results)")
    add_verbose_flag(ap)
    a = ap.parse_args(argv)
    results = Results(device="cpu", suite="quality")
    figures = measure(results, model=a.model, size=a.size, steps=a.steps, seed=a.seed, engine_dir=a.engine_dir,
                      paths=a.paths)
    print(f"quality vs the same backend's fp32 image: {a.model} {a.size}², {a.steps} steps, seed {a.seed}, "
          f"{results.device_name}")
    from export.presets import ALL_PRESETS

    if a.model in ALL_PRESETS:
        print(f"note: {RANDOM_WEIGHTS_NOTE}")
    for (backend, precision), f in figures.items():
        print(f"  {backend:12s} {precision}: mean |Δ| {f['mean_abs_px']:.3f} px, max |Δ| {f['max_abs_px']:.0f} px, "
              f"PSNR {f['psnr_db']:.1f} dB")
    for r in results.rows:
        if r.get("skipped"):
            print(f"  {r['config']['backend']:12s} {r['config']['precision']}: skipped ({r['skipped']})")
    print(f"results: {results.write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
