"""Cost of switching LoRA adapters on built engines vs rebuilding them, on this machine.

    python -m benchmarks.lora_switch [--model tiny|sd15] [--backends onnxruntime,torch] [--repeats 3]

For each backend: build the model's engines (timed: the rebuild an adapter would otherwise cost, export
included, `--force-rebuild`), then time `Pipeline.use_adapters` for: none -> one adapter, one -> two stacked,
two -> none (back to the built weights), each `--repeats` times (median). Adapters are seeded random PEFT-format
LoRAs (rank 8) on every attention projection of the UNet (to_q, to_k, to_v, to_out.0) and the text encoder
(q/k/v/out_proj), shaped from the model's config. Writes rows of the common schema (benchmarks/schema.py) to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import RESULTS
from benchmarks.schema import Results

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def random_lora(folder: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT-format LoRA (`unet.<module>.lora_A.weight`, ...) for every targeted Linear of the model's UNet and
    text encoder, shapes from a meta-device build of the configs (no weights loaded)."""
    import torch
    from safetensors.torch import save_file

    from export.models import meta_submodel

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for sub, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        for name, module in meta_submodel(folder, sub).named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets):
                sd[f"{sub}.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / rank
                sd[f"{sub}.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    path = out / f"lora_{seed}.safetensors"
    save_file(sd, str(path))
    return path


def measure(model: str, backend: str, repeats: int, work: Path) -> dict:
    from engine.build import build_all
    from engine.config import BuildConfig
    from engine.lora import Adapter
    from engine.pipeline import Pipeline
    from export.models import resolve_model

    folder, _ = resolve_model(model)
    engine_dir = work / backend
    cfg = BuildConfig(model=model, backend=backend, precision="fp32", engine_dir=engine_dir)
    build_all(cfg, progress=False)  # warm caches of everything but this backend's artifacts
    t0 = time.perf_counter()
    build_all(replace(cfg, force_rebuild=True), progress=False)
    rebuild_s = time.perf_counter() - t0
    a, b = (Adapter(random_lora(folder, work, seed), scale) for seed, scale in ((1, 0.8), (2, 0.5)))
    pipe = Pipeline.load(engine_dir)
    times: dict[str, list[float]] = {"none_to_one": [], "one_to_two": [], "two_to_none": []}
    try:
        pipe.use_adapters((a,))  # loads and caches both files once: switching is what is timed
        pipe.use_adapters((a, b))
        pipe.use_adapters(())
        for _ in range(repeats):
            for key, adapters in (("none_to_one", (a,)), ("one_to_two", (a, b)), ("two_to_none", ())):
                t0 = time.perf_counter()
                pipe.use_adapters(adapters)
                times[key].append(time.perf_counter() - t0)
    finally:
        pipe.close()
    medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
    return {"backend": backend, "rebuild_seconds": round(rebuild_s, 1), "switch_seconds_median": medians,
            "switch_seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
            # a torch "build" only copies the weights: no rebuild to compare with, the goal there is <= 1 s
            "worst_switch_over_rebuild": round(max(medians.values()) / rebuild_s, 4) if rebuild_s >= 1 else None}


def add_rows(results: Results, model: str, run: dict) -> None:
    """One `measure` result as rows: the rebuild, and each switch's median over the repeats."""
    config = {"model": model, "backend": run["backend"]}
    results.add("lora_switch", config, "rebuild_s", run["rebuild_seconds"], "s")
    for key, v in run["switch_seconds_median"].items():
        results.add("lora_switch", {**config, "switch": key}, "switch_s_p50", v, "s",
                    n=len(run["switch_seconds_all"][key]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--backends", default="onnxruntime,torch")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    results = Results(suite="lora-switch")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in a.backends.split(","):
            run = measure(a.model, backend, a.repeats, Path(tmp))
            add_rows(results, a.model, run)
            print(json.dumps(run, indent=1), flush=True)
    print(f"wrote {results.write(RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
