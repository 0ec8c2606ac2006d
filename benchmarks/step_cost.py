"""What the step-cost benchmarks share (benchmarks/controlnet_step.py, benchmarks/ip_adapter_step.py): timing
variants of one denoise step interleaved in one process, and their report against the first (plain) variant."""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.schema import Results, percentiles

RESULTS = Path(__file__).parent / "results"
Measure = Callable[[str, int, int, Path], dict[str, list[float]]]  # (model, size, runs, engine root) -> samples


def interleave(calls: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Milliseconds of `runs` calls of each variant, call i of every variant before call i+1 of any; call 0 of each
    is its warm-up, not kept."""
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(runs + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if i:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def main(suite: str, metric: str, measure: Measure, argv: list[str] | None, description: str) -> int:
    """Parse --model/--size/--runs, measure, print and write benchmarks/results/<stamp>-<suite>-<cpu>.json: per variant
    `step_ms` samples and `time_vs_plain` (its p50 over the first variant's p50), and `plain_spread` (the first
    variant's p90 over its p50: the run's noise)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="tiny")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--runs", type=int, default=10)
    a = p.parse_args(argv)
    results = Results(suite=suite)
    with tempfile.TemporaryDirectory() as tmp:
        samples = measure(a.model, a.size, a.runs, Path(tmp))
    plain = next(iter(samples.values()))
    plain_p50 = percentiles(plain)["p50"]
    for name, values in samples.items():
        config = {"model": a.model, "size": a.size, "batch": 2, "backend": "onnxruntime", "precision": "fp32",
                  "variant": name}
        results.add_samples(metric, config, "step_ms", values, "ms")
        results.add(metric, config, "time_vs_plain", percentiles(values)["p50"] / plain_p50, "ratio")
        print(f"{name:28s} p50 {percentiles(values)['p50']:8.1f} ms  x{percentiles(values)['p50'] / plain_p50:.3f}")
    spread = percentiles(plain)["p90"] / plain_p50
    results.add(metric, {"model": a.model, "size": a.size}, "plain_spread", spread, "ratio")
    print(f"plain UNet p90/p50: {spread:.3f} (the run's noise)")
    print(f"wrote {results.write(RESULTS)}")
    return 0
