"""Peak memory and time of the UNet export (memory-lean: export/lean.py), full-size presets, this machine.

    python -m benchmarks.export_memory [--model sd15|sdxl|FOLDER] [--precisions fp32,fp16] [--check-size 256]

Each export runs in a fresh process, whose peak RSS (VmHWM, the figure GNU `time -v` prints as "Maximum
resident set size") is the export's alone: python, torch, the traced graph and the weights in flight.
It is reported against the exported weight bytes (the goal: <= 1.5x). A second process checks the exported
graph: ONNX Runtime vs the torch module in fp32 at --check-size (batch 1 with CFG: 2 rows), whose memory is
not the export's. Writes rows of the common schema (benchmarks/schema.py) to benchmarks/results/. Not part of
CI (minutes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import RESULTS
from benchmarks.schema import Results, peak_rss_bytes

GIB = 1024**3


def export_one(model: str, precision: str, out: Path) -> dict:
    from export.models import resolve_model
    from export.onnx_export import ExportOptions, export_component

    folder, _ = resolve_model(model)
    before = peak_rss_bytes()
    info = export_component(folder, "unet", out / precision / "unet.onnx", ExportOptions(precision=precision))
    peak = peak_rss_bytes()
    return {
        "precision": precision,
        "trace_seconds": info["trace_seconds"],
        "export_seconds": info["export_seconds"],
        "export_check_seconds": info["total_seconds"],
        "weight_bytes": info["weight_bytes"],
        "files_mb": {k: round(v / 1e6, 1) for k, v in info["files"].items()},
        "peak_rss_gib": round(peak / GIB, 3),
        "rss_before_export_gib": round(before / GIB, 3),
        "peak_rss_over_weights": round(peak / info["weight_bytes"], 3),
    }


def check_one(model: str, precision: str, out: Path, size: int) -> dict:
    """ONNX Runtime on the exported graph vs the fp32 torch UNet, at size x size."""
    import numpy as np
    import torch

    from export.families import detect_family
    from export.models import folder_dims, load_component, resolve_model
    from export.onnx_export import example_inputs, run_onnx
    from export.specs import Shape

    folder, _ = resolve_model(model)
    spec, dims = detect_family(folder).spec("unet"), folder_dims(folder)
    inputs = example_inputs(spec, dims, Shape(1, size, size), precision, seed=1)
    t0 = time.perf_counter()
    got = next(iter(run_onnx(out / precision / "unet.onnx", inputs).values())).astype(np.float32)
    ort_s = time.perf_counter() - t0
    module = load_component(folder, "unet")
    with torch.no_grad():
        ref = module(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}).numpy()
    return {"check_size": size, "ort_cpu_seconds_one_call": round(ort_s, 1),
            "max_abs_err_ort_vs_torch_fp32": float(np.abs(got - ref).max()), "ref_abs_max": float(np.abs(ref).max()),
            "finite": bool(np.isfinite(got).all())}


def _child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "benchmarks.export_memory", *args], capture_output=True, text=True,
                       check=False)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[-1][7:]) if line else {"error": r.stderr[-3000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--out", type=Path, default=None, help="where the graphs go (default /tmp/export_memory/<model>)")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--check-size", type=int, default=256, help="image size of the ORT vs torch check (0: skip)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child: export this precision, print JSON
    p.add_argument("--check", help=argparse.SUPPRESS)  # child: check this precision's graph, print JSON
    a = p.parse_args(argv)
    out = a.out or Path("/tmp/export_memory") / Path(a.model).name
    if a.one or a.check:
        result = export_one(a.model, a.one, out) if a.one else check_one(a.model, a.check, out, a.check_size)
        print("RESULT " + json.dumps(result))
        return 0
    from export.models import resolve_model

    t0 = time.perf_counter()
    resolve_model(a.model)  # a preset is materialised (random weights, safetensors) once, before any timing
    results = Results(suite="export-memory")
    results.add("export_memory", {"model": a.model}, "materialize_s", time.perf_counter() - t0, "s")
    for precision in a.precisions.split(","):
        row = {"precision": precision, **_child(["--model", a.model, "--out", str(out), "--one", precision])}
        if a.check_size and "error" not in row:
            row.update(_child(["--model", a.model, "--out", str(out), "--check", precision,
                               "--check-size", str(a.check_size)]))
        print(json.dumps(row, indent=1), flush=True)
        config = {"model": a.model, "component": "unet", "precision": precision}
        if "error" in row:
            results.skip("export_memory", config, f"export failed: {row['error'][-300:]}")
            continue
        for metric, unit in (("peak_rss_gib", "GiB"), ("peak_rss_over_weights", "ratio"), ("trace_seconds", "s"),
                             ("export_seconds", "s"), ("weight_bytes", "B"), ("max_abs_err_ort_vs_torch_fp32", "abs"),
                             ("ref_abs_max", "abs")):
            if metric in row:
                results.add("export_memory", {**config, "check_size": row.get("check_size")}
                            if metric.endswith(("err_ort_vs_torch_fp32", "abs_max")) else config, metric, row[metric],
                            unit)
    print(f"wrote {results.write(RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
