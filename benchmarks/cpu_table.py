"""python -m benchmarks.cpu_table [--check]: the committed CPU results -> engine/backends/cpu_table.json.

The table `--backend auto` reads on a CPU (engine/backends/cpu_choice.py). From the committed results
(benchmarks/results/*.json, benchmarks.run's schema) it takes, for the CPU device with the newest `sd15`
UNet-step rows:

    time_vs_fp32   each (backend, precision)'s `unet_step` time_vs_ref (reference: onnxruntime fp32, in the
                   same run) for `sd15`, the geometric mean over the sizes measured; the newest row per size
    psnr_db        the lowest `quality` psnr_db of that path on that device (any model; newest per config);
                   none for fp32, the reference

`--check` exits 1 when the committed table differs from what the results give (CI keeps them in step).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from benchmarks import RESULTS
from benchmarks.schema import load
from engine.backends.cpu_choice import TABLE

MODEL = "sd15"  # the workload the table ranks by: a real UNet, not the tiny test model
REFERENCE = "onnxruntime fp32"


def _docs(results_dir: Path) -> list[tuple[str, dict]]:
    out = []
    for p in sorted(results_dir.glob("*.json")):
        try:
            out.append((p.name, load(p)))
        except ValueError:
            continue  # an older, per-script JSON shape
    return out


def _cpu(doc: dict) -> bool:
    return not doc["run"]["env"].get("gpu")


def _newest(rows: list[tuple[str, dict]], key) -> dict[tuple, tuple[str, dict]]:
    best: dict[tuple, tuple[str, dict]] = {}
    for name, r in rows:
        k = key(r)
        if k not in best or r["ts"] > best[k][1]["ts"]:
            best[k] = (name, r)
    return best


def build_table(results_dir: Path = RESULTS) -> dict:
    docs = [(n, d) for n, d in _docs(results_dir) if _cpu(d)]
    steps = [(n, r) for n, d in docs for r in d["rows"] if r["bench"] == "unet_step" and r["metric"] == "time_vs_ref"
             and r.get("value") is not None and r["config"].get("model") == MODEL
             and r["config"].get("reference") == REFERENCE]
    if not steps:
        raise ValueError(f"{results_dir}: no CPU unet_step rows for {MODEL} against {REFERENCE}")
    device = max(steps, key=lambda nr: nr[1]["ts"])[1]["device"]
    newest = _newest([(n, r) for n, r in steps if r["device"] == device],
                     lambda r: (r["config"]["backend"], r["config"]["precision"], r["config"]["size"]))
    quality = _newest([(n, r) for n, d in docs for r in d["rows"] if r["bench"] == "quality"
                       and r["metric"] == "psnr_db" and r.get("value") is not None and r["device"] == device],
                      lambda r: tuple(sorted((k, str(v)) for k, v in r["config"].items())))
    paths: dict[tuple[str, str], list[float]] = {}
    sizes: set[int] = set()
    for (backend, precision, size), (_, r) in sorted(newest.items()):
        paths.setdefault((backend, precision), []).append(r["value"])
        sizes.add(size)
    table_rows = []
    for (backend, precision), ratios in paths.items():
        psnr = [r["value"] for _, r in quality.values()
                if (r["config"]["backend"], r["config"]["precision"]) == (backend, precision)]
        table_rows.append({"backend": backend, "precision": precision,
                           "time_vs_fp32": round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3),
                           "psnr_db": round(min(psnr), 1) if psnr and precision != "fp32" else None})
    table_rows.sort(key=lambda r: (r["time_vs_fp32"], r["backend"], r["precision"]))
    sources = sorted({n for n, _ in newest.values()} | {n for n, _ in quality.values()})
    env = max(steps, key=lambda nr: nr[1]["ts"])[1]["env"]
    return {
        "generated_by": "python -m benchmarks.cpu_table",
        "device": device,
        "cpu_flags": env.get("cpu_flags", []),
        "workload": f"{MODEL} UNet step, batch 2, {' and '.join(f'{s}²' for s in sorted(sizes))}",
        "sources": sources,
        "rows": table_rows,
    }


def render(doc: dict) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_table", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the committed table differs from the results")
    args = p.parse_args(argv)
    text = render(build_table())
    if args.check:
        if TABLE.read_text() != text:
            print(f"{TABLE} differs from the committed results: run python -m benchmarks.cpu_table", file=sys.stderr)
            return 1
        print(f"{TABLE}: matches the committed results")
        return 0
    tmp = TABLE.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(TABLE)
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
