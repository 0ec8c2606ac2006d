"""Feature caching (DeepCache, engine/feature_cache.py) against full compute: images/s and the difference to the
full-compute image of the same seed, on one engine set built with `--cache-branch 0` (sd15 architecture, seeded
random weights), this machine's CPU.

    python -m benchmarks.feature_cache [--model sd15] [--sizes 256 512] [--intervals 1 2 3 5] [--steps 20]
                                       [--backend openvino] [--precision bf16] [--rounds 2]

The engines are built first (cached), then every size is measured in its own process (a process that has just
exported with torch runs slower): per round, one image of each interval in turn (interleaved), the best round kept.
Rows per (size, interval): `seconds_per_image`, `images_per_s`, `denoise_ms_per_step` and, against interval 1's
image of the same seed, `psnr_db`, `max_abs_px`, `mean_abs_px`; `speedup` = images/s over interval 1's, same run.
One image (batch 1), classifier-free guidance 7.5, Euler, seed 0. Writes
benchmarks/results/<stamp>-feature-cache-<cpu>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.schema import Results

RESULTS = Path(__file__).parent / "results"
PROMPT = "a photograph of an astronaut riding a horse"


def build(model: str, backend: str, precision: str, engine_dir: Path) -> None:
    from engine.build import build_all
    from engine.config import BuildConfig

    build_all(BuildConfig(model=model, backend=backend, precision=precision, engine_dir=engine_dir, cache_branch=0),
              progress=True)


def child(engine_dir: Path, size: int, intervals: list[int], steps: int, rounds: int) -> dict:
    """Every interval's best seconds per image and denoise ms per step, and its image's difference to interval 1's."""
    import numpy as np

    from engine.pipeline import Pipeline
    from engine.request import TIMING_STEP, TIMING_TOTAL, Request

    pipe = Pipeline.load(engine_dir)
    best: dict[int, tuple[float, float]] = {}
    images: dict[int, np.ndarray] = {}
    pipe.run(Request(prompt=PROMPT, steps=2, height=size, width=size, sampler="euler"), progress=False)  # warm-up
    for _ in range(rounds):
        for n in intervals:
            (g,) = pipe.run(Request(prompt=PROMPT, steps=steps, seed=0, guidance_scale=7.5, sampler="euler",
                                    height=size, width=size, cache_interval=n), progress=False)
            total, step = g.timings_ms[TIMING_TOTAL] / 1e3, g.timings_ms[TIMING_STEP]
            if n not in best or total < best[n][0]:
                best[n] = (total, step)
            images[n] = g.pixels
    pipe.close()
    full = images[1].astype(np.float64)
    out = {}
    for n in intervals:
        diff = np.abs(images[n].astype(np.float64) - full)
        mse = float((diff ** 2).mean())
        out[str(n)] = {"seconds": best[n][0], "step_ms": best[n][1], "max_abs_px": float(diff.max()),
                       "mean_abs_px": float(diff.mean()),
                       "psnr_db": math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--backend", default="openvino")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--engine-dir", type=Path, default=None, help="keep the engines here (default: a temporary dir)")
    p.add_argument("--child", nargs=2, metavar=("ENGINE_DIR", "SIZE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    intervals = sorted(set(a.intervals) | {1})
    if a.child:
        print(json.dumps(child(Path(a.child[0]), int(a.child[1]), intervals, a.steps, a.rounds)))
        return 0
    import torch

    results = Results(device="cuda" if torch.cuda.is_available() else "cpu", suite="feature-cache")
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = a.engine_dir or Path(tmp)
        build(a.model, a.backend, a.precision, engine_dir)
        for size in a.sizes:
            cmd = [sys.executable, "-m", "benchmarks.feature_cache", "--child", str(engine_dir), str(size),
                   "--steps", str(a.steps), "--rounds", str(a.rounds), "--intervals", *map(str, intervals)]
            got = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            base = got["1"]["seconds"]
            for n in intervals:
                row = got[str(n)]
                config = {"model": a.model, "backend": a.backend, "precision": a.precision, "size": size,
                          "steps": a.steps, "sampler": "euler", "guidance": 7.5, "cache_interval": n,
                          "cache_branch": 0}
                results.add("feature_cache", config, "seconds_per_image", row["seconds"], "s")
                results.add("feature_cache", config, "images_per_s", 1 / row["seconds"], "img/s")
                results.add("feature_cache", config, "denoise_ms_per_step", row["step_ms"], "ms")
                results.add("feature_cache", config, "speedup", base / row["seconds"], "x")
                if n != 1:
                    for metric, unit in (("psnr_db", "dB"), ("max_abs_px", "px"), ("mean_abs_px", "px")):
                        results.add("feature_cache", config, metric, row[metric], unit)
                print(f"{size}² interval {n}: {row['seconds']:7.2f} s/image ({base / row['seconds']:.2f}x), "
                      f"{row['step_ms']:7.1f} ms/step, PSNR {row['psnr_db']:.1f} dB, max {row['max_abs_px']:.0f} px")
    print(f"wrote {results.write(RESULTS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
