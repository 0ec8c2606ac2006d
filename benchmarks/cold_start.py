"""Cold start: the whole `python -m engine.generate` process on cached `tiny` engines, start to exit.

    python -m benchmarks.cold_start [--runs 5] [--engine-dir DIR]

Each run is a fresh interpreter (imports, engine load, tables, tokenizer, 25 steps at 128², PNG written,
process exit), timed from spawn to exit by the parent. Before the timed runs: one `engine.build` (which
builds `tiny` into DIR, or finds it cached) and one untimed `generate`, so bytecode caches and the page
cache are warm: "cold" is the process, not the disk. Rows (bench "cold_start"):

    wall_s_p50 / _p90 / _p99 / _mean   the process wall time
    cpu_s_*                            its user + system CPU time (the other cores' load shows in wall, not here)
    generate_ms_*                      the generation itself, as the process reports it ("total")
    startup_s_*                        the rest: wall minus the generation (imports, load, save, exit)

Writes benchmarks/results/<time>-cold-start-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.schema import Results

BENCH = "cold_start"
SUITE = "cold-start"
REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny"


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _check(r: subprocess.CompletedProcess, what: str) -> None:
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (rc {r.returncode}): {r.stderr.strip()[-500:]}")


def _generate_once(engine_dir: Path, output: Path) -> tuple[float, float, float]:
    """(wall s, user + sys CPU s, the generation's own total ms) of one `python -m engine.generate` process."""
    before = os.times()
    t0 = time.perf_counter()
    r = _run(["engine.generate", "--engine-dir", str(engine_dir), "--output", str(output)])
    wall = time.perf_counter() - t0
    after = os.times()
    _check(r, "engine.generate")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    m = re.search(r"total ([0-9.]+)", r.stdout)
    return wall, cpu, float(m.group(1)) if m else float("nan")


def measure(results: Results, *, runs: int = 5, engine_dir: Path | None = None) -> None:
    """`runs` timed `python -m engine.generate` processes on cached tiny engines (built into `engine_dir`, or a
    temporary folder, first; plus one untimed warm-up run)."""
    if runs < 1:
        raise ValueError(f"runs {runs} must be >= 1")
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        engines = Path(engine_dir) if engine_dir is not None else Path(tmp) / "engines"
        _check(_run(["engine.build", "--model", MODEL, "--engine-dir", str(engines)], timeout=3600), "engine.build")
        record = json.loads((engines / MODEL / "build.json").read_text())
        output = Path(tmp) / "out.png"
        _generate_once(engines, output)  # warm-up: bytecode and page caches
        samples = [_generate_once(engines, output) for _ in range(runs)]
    config = {"model": MODEL, "backend": record.get("backend"), "device": record.get("device"),
              "precision": record.get("precision"), "command": "python -m engine.generate", "steps": 25,
              "runs": runs}
    results.add_samples(BENCH, config, "wall_s", [s[0] for s in samples], "s")
    results.add_samples(BENCH, config, "cpu_s", [s[1] for s in samples], "s")
    measured = [s for s in samples if s[2] == s[2]]  # runs whose output named the generation's time
    if measured:
        results.add_samples(BENCH, config, "generate_ms", [s[2] for s in measured], "ms")
        results.add_samples(BENCH, config, "startup_s", [s[0] - s[2] / 1e3 for s in measured], "s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="timed generate processes (median reported)")
    p.add_argument("--engine-dir", type=Path, default=None,
                   help="engine dir to build tiny into (or find it cached); default: a temporary folder")
    args = p.parse_args(argv)
    results = Results(device="cpu", suite=SUITE)
    measure(results, runs=args.runs, engine_dir=args.engine_dir)
    for row in results.rows:
        if row["metric"].endswith(("_p50", "_mean")):
            print(f"{row['metric']}: {row['value']:.3f} {row['unit']}")
    print(f"wrote {results.write(Path('benchmarks/results'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
