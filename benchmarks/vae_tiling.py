"""Tiled VAE decoding (engine/tiling.py) against whole-image decoding: wall time and peak memory of one decode of a
seeded random latent, our ONNX Runtime fp32 `vae_decoder` (sd15 architecture, seeded random weights) on this CPU.

    python -m benchmarks.vae_tiling [--model sd15] [--sizes 1024 2048] [--tile 512]
    python -m benchmarks.vae_tiling --model sd-x4-upscaler --sizes 4096   # the x4 upscaler's VAE: 4 px per latent

Each (size, variant) runs in its own process (peak memory is a process's), which loads the engine, notes its RSS,
decodes once while a thread samples RSS every 5 ms, and reports seconds and the peak RSS above what it held before.
A whole-image decode that engine/memory.py's estimate says would not fit in the RAM available now is not run: its
row reports the estimate instead (the engine refuses that request the same way; `--vae-tiling auto` tiles it).
Writes benchmarks/results/<stamp>-vae-tiling-<cpu>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.schema import Results

RESULTS = Path(__file__).parent / "results"
GIB = 2**30


def build(model: str, engine_dir: Path) -> Path:
    """The model's vae_decoder built for ONNX Runtime fp32 in `engine_dir`; its artifact folder."""
    from engine.build import build_all
    from engine.config import BuildConfig

    result = build_all(BuildConfig(model=model, backend="onnxruntime", precision="fp32", engine_dir=engine_dir,
                                   components=("vae_decoder",)), progress=False)
    return engine_dir / result.record["model_id"] / result.record["components"]["vae_decoder"]["dir"]


def child(art: Path, size: int, tile: int | None, scale: int) -> dict:
    """One decode in this process: seconds and peak RSS growth (GiB)."""
    import psutil
    import torch

    from engine import cache
    from engine.backends.base import get_backend
    from engine.tiling import OVERLAP, Tiling
    from export.families import SD

    runner = get_backend("onnxruntime").load(SD.spec("vae_decoder"), art, cache.verify(art), "cpu")
    latents = torch.randn(1, 4, size // scale, size // scale, generator=torch.Generator().manual_seed(0))
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if tile is None:
        pixels = runner(latent=latents)["images"]
    else:
        pixels = Tiling(tile, OVERLAP, scale).decode(lambda t: runner(latent=t)["images"].clone(), latents)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    assert pixels.shape == (1, 3, size, size), pixels.shape
    return {"seconds": seconds, "peak_gib": (peak - base) / GIB}


def estimate_gib(model_folder: Path, size: int, scale: int) -> float:
    """engine/memory.py's estimate of a whole-image decode's largest activations (GiB)."""
    from engine import memory
    from export.footprint import folder_footprint

    fp = folder_footprint(model_folder)
    return memory.estimate(fp, size, size, 1, False, "fp32", "decomposed", scale).decoder_bytes / GIB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--child", nargs=4, metavar=("ART", "SIZE", "TILE", "SCALE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        art, size, tile, scale = a.child
        print(json.dumps(child(Path(art), int(size), int(tile) or None, int(scale))))
        return 0
    import psutil

    from export.models import folder_dims, materialize_preset
    from export.presets import ALL_PRESETS

    results = Results(suite="vae-tiling")
    folder = materialize_preset(ALL_PRESETS[a.model])
    scale = folder_dims(folder).vae_scale  # pixels per latent: 8 for SD, 4 for the x4 upscaler
    with tempfile.TemporaryDirectory() as tmp:
        art = build(a.model, Path(tmp))
        for size in a.sizes:
            for tile in (None, a.tile):
                config = {"model": a.model, "size": size, "backend": "onnxruntime", "precision": "fp32",
                          "variant": "whole" if tile is None else f"tiles of {tile}"}
                need = estimate_gib(folder, size, scale)
                if tile is None and need * GIB > psutil.virtual_memory().available:
                    results.add("vae_decode", config, "estimate_gib", need, "GiB")
                    print(f"{size}² whole: not run, the estimate needs {need:.1f} GiB "
                          f"({psutil.virtual_memory().available / GIB:.1f} GiB available)")
                    continue
                out = subprocess.run([sys.executable, "-m", "benchmarks.vae_tiling", "--child", str(art), str(size),
                                      str(tile or 0), str(scale)], capture_output=True, text=True, check=True)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                results.add("vae_decode", config, "seconds", got["seconds"], "s")
                results.add("vae_decode", config, "peak_rss_gib", got["peak_gib"], "GiB")
                print(f"{size}² {config['variant']:14s} {got['seconds']:7.1f} s  peak +{got['peak_gib']:.2f} GiB")
    print(f"wrote {results.write(RESULTS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
