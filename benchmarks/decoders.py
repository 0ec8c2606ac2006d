"""The tiny decoder (AutoencoderTiny with TAESD's architecture, seeded random weights: the same work as TAESD's) against
the model's VAE decoder: one decode of one seeded random latent, on one engine set built with `--tiny-vae` (sd15
architecture, seeded random weights), this machine.

    python -m benchmarks.decoders [--model sd15] [--sizes 256 512] [--backend openvino] [--precision bf16] [--runs 5]

The engines are built first (cached), then measured in a child process (a process that has just exported with torch
runs slower): per size, the two decoders called in turn `runs` times after one warm-up call each. Rows per (size,
decoder): `decode_ms_p50/p90/p99/mean`, and `speedup` = the VAE's p50 over the tiny decoder's, same run. Writes
benchmarks/results/<stamp>-decoders-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.schema import Results

RESULTS = Path(__file__).parent / "results"
DECODERS = {"vae": "latent_decoder", "tiny": "preview_decoder"}  # row label -> the family role that decodes


def child(engine_dir: Path, sizes: list[int], runs: int) -> dict:
    import torch

    from engine.pipeline import Pipeline

    pipe = Pipeline.load(engine_dir)
    out: dict = {}
    for size in sizes:
        latent = torch.randn(1, pipe.dims.latent_channels, size // pipe.dims.vae_scale, size // pipe.dims.vae_scale,
                             generator=torch.Generator().manual_seed(0)).to(pipe.device)
        runners = {label: pipe.role(role) for label, role in DECODERS.items()}
        samples: dict[str, list[float]] = {label: [] for label in runners}
        for runner in runners.values():  # warm-up: first-call allocations and compilation
            runner(latent=latent)
        for _ in range(runs):
            for label, runner in runners.items():
                t0 = time.perf_counter()
                runner(latent=latent)["images"].float().cpu()
                samples[label].append((time.perf_counter() - t0) * 1e3)
        out[str(size)] = samples
    pipe.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--backend", default="openvino")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--engine-dir", type=Path, default=None, help="keep the engines here (default: a temporary dir)")
    p.add_argument("--child", metavar="ENGINE_DIR", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(Path(a.child), a.sizes, a.runs)))
        return 0
    import torch

    from engine.build import build_all
    from engine.config import BuildConfig
    from export.store import cache_root
    from export.tiny_vae import random_tiny_vae

    results = Results(device="cuda" if torch.cuda.is_available() else "cpu", suite="decoders")
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = a.engine_dir or Path(tmp)
        taesd = random_tiny_vae(cache_root() / "taesd-random", seed=0)
        build_all(BuildConfig(model=a.model, backend=a.backend, precision=a.precision, engine_dir=engine_dir,
                              components=("clip", "unet", "vae_decoder"), tiny_vae=str(taesd)), progress=True)
        cmd = [sys.executable, "-m", "benchmarks.decoders", "--child", str(engine_dir), "--runs", str(a.runs),
               "--sizes", *map(str, a.sizes)]
        got = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    for size in a.sizes:
        samples = got[str(size)]
        for label, values in samples.items():
            config = {"model": a.model, "backend": a.backend, "precision": a.precision, "size": size, "decoder": label}
            results.add_samples("decode", config, "decode_ms", values, "ms")
        vae, tiny = (sorted(samples[k])[len(samples[k]) // 2] for k in ("vae", "tiny"))
        results.add("decode", {"model": a.model, "backend": a.backend, "precision": a.precision, "size": size},
                    "speedup", vae / tiny, "x")
        print(f"{size}²: VAE {vae:8.1f} ms, tiny {tiny:7.1f} ms p50 ({vae / tiny:.1f}x)")
    print(f"wrote {results.write(RESULTS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
