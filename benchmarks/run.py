"""python -m benchmarks.run: the benchmark suite in one process, one results file in the common schema.

    python -m benchmarks.run [--suite smoke|quick|full] [--backends onnxruntime,torch] [--models tiny,sd15]
                             [--device cpu|cuda] [--out DIR]

`quick` (a few minutes on 2 cores): the `tiny` pipeline per backend (stages, batch 1..8, memory),
its UNet step interleaved across backends, the attention kernel (GPU; a skipped row on CPU), tiny's
export/build cost, cold start. `smoke` is every stage of `quick` with the fewest runs, 4-step requests and the
build cost of one component (the test suite's run: it checks the benchmarks work, its figures are not worth
reporting).
`full` adds more runs and the `sd15` UNet step at 256² and 512², sd15's
build cost, the server load test and request- vs step-level batching. Rows go to
<out>/<UTC time>-<suite>-<device>.json (a new file every run); `python -m benchmarks.report` renders it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks import RESULTS
from benchmarks.schema import Results

CPU_BACKENDS = ("onnxruntime", "torch", "openvino")
GPU_BACKENDS = ("torch", "onnxruntime", "tensorrt")
# the interleaved UNet step: (backend, precision), the first is the fp32 reference the others' errors are against
CPU_VARIANTS = (("onnxruntime", "fp32"), ("torch", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"),
                ("torch", "bf16"), ("onnxruntime", "int8"), ("openvino", "int8"))


@dataclass(frozen=True)
class Suite:
    """What one suite runs; the CLI's --backends/--models narrow it."""
    name: str
    models: tuple[str, ...]
    pipeline_runs: int
    batch_runs: int  # timed pipeline runs per batch size
    batch_sizes: tuple[int, ...]
    unet_sizes: dict[str, tuple[int, ...]]  # model -> sizes of the interleaved UNet step
    unet_runs: int
    build_models: tuple[str, ...]
    cold_start_runs: int
    serve_load: bool
    build_components: tuple[str, ...] | None = None  # None: each model's default components
    build_backends: int | None = None  # how many of the run's backends build cost measures; None: all (tiny)
    pipeline_steps: int = 20  # sampler steps of the pipeline benchmark's requests (PipelineBench's default)


SUITES = {
    "smoke": Suite("smoke", ("tiny",), pipeline_runs=3, batch_runs=1, batch_sizes=(1, 2, 4, 8),
                   unet_sizes={"tiny": (128,)}, unet_runs=2, build_models=("tiny",), cold_start_runs=1,
                   serve_load=False, build_components=("vae_decoder",), build_backends=1, pipeline_steps=4),
    "quick": Suite("quick", ("tiny",), pipeline_runs=10, batch_runs=3, batch_sizes=(1, 2, 4, 8),
                   unet_sizes={"tiny": (128,)}, unet_runs=5, build_models=("tiny",), cold_start_runs=3,
                   serve_load=False),
    "full": Suite("full", ("tiny", "sd15"), pipeline_runs=20, batch_runs=3, batch_sizes=(1, 2, 4, 8),
                  unet_sizes={"tiny": (128, 256), "sd15": (256, 512)}, unet_runs=5, build_models=("tiny", "sd15"),
                  cold_start_runs=5, serve_load=True),
}


def _step(label: str, fn: Callable[[], object]) -> None:
    t0 = time.perf_counter()
    print(f"== {label}", flush=True)
    fn()
    print(f"   {time.perf_counter() - t0:.1f} s", flush=True)


def run(suite: Suite, backends: tuple[str, ...], device: str, out: Path) -> Path:
    from benchmarks import (
        attention,
        build_cost,
        cold_start,
        continuous_load,
        pipeline,
        quality,
        serve_load,
        unet_step,
    )

    results = Results(device=device, suite=suite.name)
    engine_dir = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    if device.startswith("cuda"):
        variants = (("torch", "fp32"),) + tuple((b, "fp16") for b in backends)
    else:
        variants = tuple(v for v in CPU_VARIANTS if v[0] in backends)
    if "tiny" in suite.models:  # the pipeline as a user runs it: the small default model
        cfg = pipeline.PipelineBench(model="tiny", backends=backends, batch_sizes=suite.batch_sizes,
                                     runs=suite.pipeline_runs, batch_runs=suite.batch_runs, device=device,
                                     steps=suite.pipeline_steps)
        _step("pipeline tiny", lambda: pipeline.measure(results, cfg, engine_dir))
    for model in suite.models:
        sizes = suite.unet_sizes.get(model, ())
        if sizes:
            ucfg = unet_step.UnetStepBench(model=model, sizes=sizes, variants=variants, runs=suite.unet_runs,
                                           device=device, isolated=model != "tiny")
            _step(f"unet step {model} {sizes}", lambda ucfg=ucfg: unet_step.measure(results, ucfg, engine_dir))
    _step("attention", lambda: attention.measure(results, iters=50))
    for model in suite.build_models:
        if model in suite.models:
            # a full-size model's components are built with the first backend only (minutes each)
            chosen = backends[:suite.build_backends] if model == "tiny" else backends[:1]
            _step(f"build cost {model}", lambda model=model, chosen=chosen: build_cost.measure(
                results, model=model, backends=chosen, components=suite.build_components, device=device))
    # the generate processes run on tiny's default build: the pipeline bench's when it built one (cached)
    _step("cold start", lambda: cold_start.measure(results, runs=suite.cold_start_runs, engine_dir=engine_dir))
    if suite.serve_load and not device.startswith("cuda"):  # the reduced-precision CPU paths' image quality
        _step("quality tiny", lambda: quality.measure(results, model="tiny"))
    if suite.serve_load:
        _step("server load", lambda: serve_load.measure(results))
        _step("continuous batching", lambda: continuous_load.measure(results))
    return results.write(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--suite", choices=[*sorted(SUITES), "peers"], default="quick",
                   help="peers: python -m benchmarks.peers, with its own options (see its --help)")
    p.add_argument("--backends", default=None, help=f"comma separated (default on CPU: {','.join(CPU_BACKENDS)}; "
                   f"on CUDA: {','.join(GPU_BACKENDS)}); one not installed gets a skipped row")
    p.add_argument("--models", default=None, help="comma separated, among the suite's (default: all of them)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.peers import peers_argv

    rest = peers_argv(sys.argv[1:] if argv is None else argv)
    if rest is not None:  # --suite peers: other engines against ours, each in its own process (benchmarks/peers.py)
        from benchmarks import peers

        return peers.main(rest)
    from export.quiet import quiet_cli

    quiet_cli(argv)
    a = parse_args(argv)
    suite = SUITES[a.suite]
    if a.models:
        models = tuple(a.models.split(","))
        unknown = [m for m in models if m not in suite.models]
        if unknown:
            print(f"benchmarks.run: --models {','.join(unknown)} not in suite {suite.name} "
                  f"({','.join(suite.models)})", file=sys.stderr)
            return 2
        suite = replace(suite, models=models)
    if a.device not in ("cpu", "cuda"):
        print(f"benchmarks.run: --device {a.device!r}: choose cpu or cuda", file=sys.stderr)
        return 2
    backends = tuple(a.backends.split(",")) if a.backends else (GPU_BACKENDS if a.device == "cuda" else CPU_BACKENDS)
    dest = run(suite, backends, a.device, a.out)
    print(f"wrote {dest}\nrender: python -m benchmarks.report {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
