"""Export the full-size SD 1.5 UNet (random weights, real architecture) in fp32 and fp16 on this machine.

    python -m benchmarks.export_sd15 [--out DIR] [--precisions fp32,fp16]

Each precision runs in its own process so peak memory is measured per export. Reports export time,
file sizes, peak RSS and ONNX Runtime vs torch parity (fp32 torch as the reference) at 512x512, batch 1
with CFG (2 rows). Writes benchmarks/results/export-sd15-<date>.json. Not part of CI (minutes, ~16 GB).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import device_name, save_result


def export_one(precision: str, out: Path) -> dict:
    import numpy as np
    import torch

    from export.models import component_module, load_model
    from export.onnx_export import ExportOptions, example_inputs, export_component, run_onnx
    from export.specs import Shape, get_spec

    dtype = torch.float16 if precision == "fp16" else torch.float32
    t0 = time.perf_counter()
    model = load_model("sd15", dtype=dtype)
    load_s = time.perf_counter() - t0
    path = out / precision / "unet.onnx"
    info = export_component(model, "unet", path, ExportOptions(precision=precision, shape=Shape(1, 512, 512)))
    rss_export = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    spec = get_spec("unet")
    inputs = example_inputs(spec, model.dims, Shape(1, 512, 512), precision, seed=1)
    t0 = time.perf_counter()
    got = run_onnx(path, inputs)["latent"].astype(np.float32)
    ort_s = time.perf_counter() - t0
    del model
    ref_model = load_model("sd15", dtype=torch.float32)
    with torch.no_grad():
        ref = component_module(ref_model, "unet")(**{k: v.float() if v.is_floating_point() else v
                                                    for k, v in inputs.items()}).numpy()
    return {
        "precision": precision,
        "load_seconds": round(load_s, 1),
        "export_seconds": info["export_seconds"],
        "export_optimize_check_seconds": info["total_seconds"],
        "files_mb": {k: round(v / 1e6, 1) for k, v in info["files"].items()},
        "peak_rss_gib_export": round(rss_export, 2),
        "peak_rss_gib_total": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "ort_cpu_seconds_one_call": round(ort_s, 1),
        "max_abs_err_ort_vs_torch_fp32": float(np.abs(got - ref).max()),
        "ref_abs_max": float(np.abs(ref).max()),
        "finite": bool(np.isfinite(got).all()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/sd15_export"))
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: export this precision, print JSON
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(export_one(a.one, a.out)))
        return 0
    from export.models import materialize_preset
    from export.presets import PRESETS

    t0 = time.perf_counter()
    materialize_preset(PRESETS["sd15"])
    rows = {"materialize_seconds": round(time.perf_counter() - t0, 1), "runs": []}
    for precision in a.precisions.split(","):
        r = subprocess.run([sys.executable, "-m", "benchmarks.export_sd15", "--out", str(a.out), "--one", precision],
                           capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        rows["runs"].append(json.loads(line[-1][7:]) if line else {"precision": precision, "error": r.stderr[-2000:]})
        print(json.dumps(rows["runs"][-1], indent=1))
    import torch

    rows.update(device=device_name(), torch=torch.__version__)
    print(f"wrote {save_result('export-sd15', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
