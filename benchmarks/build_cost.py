"""Export and build cost per component: wall time and peak RSS, each component in a fresh process.

One child process per (backend, component) builds that component alone into an empty engine dir (the
seeded preset is materialised before, outside the timing), so its peak RSS (VmHWM) is that build's alone:
python, torch, the traced graph, the weights in flight and the backend's compiler. Rows:

    export_s      torch.onnx export + weights written (export/lean.py), from the ONNX artifact's manifest
    build_s       the backend's part (session/engine build), build wall minus export
    peak_rss_gib  the child's peak resident set
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.schema import Results, peak_rss_bytes


def child(model: str, backend: str, component: str, device: str) -> dict:
    """Build one component into a fresh engine dir; its times and this process's peak RSS."""
    from engine import cache
    from engine.build import build_all
    from engine.config import BuildConfig

    with tempfile.TemporaryDirectory(prefix="build-cost-") as tmp:
        t0 = time.perf_counter()
        result = build_all(BuildConfig(model=model, backend=backend, engine_dir=Path(tmp), components=(component,),
                                       device=device, force_rebuild=True),  # a real export, not the store's copy
                           progress=False)
        wall = time.perf_counter() - t0
        model_dir = Path(tmp) / result.record["model_id"]
        export_s = 0.0
        for manifest in model_dir.glob(f"onnx/{component}-*/{cache.MANIFEST}"):
            export_s = cache.read_json(manifest)["export"]["total_seconds"]
        return {"wall_s": wall, "export_s": export_s, "build_s": max(0.0, wall - export_s),
                "peak_rss_gib": peak_rss_bytes() / 2**30}


def measure(results: Results, *, model: str = "tiny", backends: tuple[str, ...] = ("onnxruntime", "torch"),
            components: tuple[str, ...] | None = None, device: str = "cpu") -> None:
    from export.families import detect_family
    from export.models import folder_dims, resolve_model

    folder, _ = resolve_model(model)  # materialise the preset once, before any timing
    family = detect_family(folder)
    names = components or family.default_components(folder_dims(folder))
    for backend in backends:
        for name in names:
            config = {"model": model, "backend": backend, "component": name}
            r = subprocess.run([sys.executable, "-m", "benchmarks.build_cost", model, backend, name, device],
                               capture_output=True, text=True, check=False, timeout=3600)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                results.skip("build", config, f"build failed (rc {r.returncode}): {r.stderr.strip()[-300:]}")
                continue
            doc = json.loads(line[-1][7:])
            if backend != "torch":  # a torch build loads the module: no ONNX export
                results.add("build", config, "export_s", doc["export_s"], "s")
            results.add("build", config, "build_s", doc["build_s"], "s")
            results.add("build", config, "peak_rss_gib", doc["peak_rss_gib"], "GiB")


if __name__ == "__main__":  # child: python -m benchmarks.build_cost MODEL BACKEND COMPONENT DEVICE
    from export.quiet import quiet

    quiet(False)
    print("RESULT " + json.dumps(child(*sys.argv[1:5])))
