"""Backends side by side in one process: build each, run the same txt2img, report stage times and ratios.

    python -m benchmarks.backends [--model tiny] [--size 256] [--steps 20] [--backends onnxruntime,torch]

Each backend gets one warm-up run, then `--repeats` timed runs (median). Writes
benchmarks/results/backends-<model>-<device>-<date>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import device_name, save_result


def run(args: argparse.Namespace) -> dict:
    from engine.build import build_all
    from engine.config import BuildConfig
    from engine.pipeline import Pipeline
    from engine.request import Request

    rows = []
    engine_dir = Path(args.engine_dir or tempfile.mkdtemp(prefix="bench-engines-"))
    for backend in args.backends.split(","):
        cfg = BuildConfig(model=args.model, backend=backend, engine_dir=engine_dir, height=args.size,
                          width=args.size, device=args.device)
        t0 = time.perf_counter()
        record = build_all(cfg, progress=False).record
        build_s = time.perf_counter() - t0
        pipe = Pipeline.load(engine_dir, record["model_id"], device=args.device)
        req = Request(prompt="a lighthouse at dusk", steps=args.steps, sampler=args.scheduler, seed=0,
                      height=args.size, width=args.size)
        pipe.run(req, progress=False)  # warm-up
        runs = [pipe.run(req, progress=False)[0].timings_ms for _ in range(args.repeats)]
        med = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
        rows.append({"backend": backend, "precision": record["precision"], "build_seconds": round(build_s, 1),
                     "timings_ms": med})
    base = rows[0]["timings_ms"]["total"]
    for r in rows:
        r["total_vs_first"] = round(r["timings_ms"]["total"] / base, 3)
    return {"model": args.model, "size": args.size, "steps": args.steps, "scheduler": args.scheduler,
            "device": device_name(args.device), "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
            "torch": __import__("torch").__version__, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="dpmpp_2m")
    p.add_argument("--backends", default="onnxruntime,torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine-dir", default=None)
    report = run(p.parse_args(argv))
    print(f"| backend | precision | clip ms | unet ms | ms/step | vae ms | total ms | vs {report['rows'][0]['backend']} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        t = r["timings_ms"]
        print(f"| {r['backend']} | {r['precision']} | {t['clip']} | {t['unet']} | {t['unet_per_step']} | {t['vae']} "
              f"| {t['total']} | {r['total_vs_first']} |")
    dest = save_result(f"backends-{report['model']}-{report['device']}", report)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
