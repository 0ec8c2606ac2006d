"""UNet step, backends and precisions interleaved in one process, with each one's error against fp32.

For each size, every variant (backend, precision) builds the UNet alone (through the cache), then the timed
calls alternate between variants (call i of every variant before call i+1 of any), so drift of the machine
(other load, clocks) hits them alike. Inputs are one classifier-free-guidance step of one image: batch 2.
Rows per (variant, size): `unet_call_ms_p50/p90/p99/mean`, `max_abs_err` and `ref_abs_max` against the
first variant (the fp32 reference), and `time_vs_ref` (p50 over the reference's p50, same run). With
`isolated`, each variant runs in its own process instead, one after the other (not interleaved), and its
peak RSS is recorded: for models whose variants do not all fit in memory together (sd15 on 23 GiB).

`python -m benchmarks.run` runs it in its suites; alone, for a few variants of one model:

    python -m benchmarks.unet_step --model sd15 --sizes 256 \
        --variants openvino:fp32,openvino:bf16,openvino:int8 [--runs 5] [--isolated] [--engine-dir DIR]

writes <out>/<UTC time>-unet-step-<device>.json (the first variant is the reference of the others).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.schema import Results, peak_rss_bytes, percentiles


@dataclass(frozen=True)
class UnetStepBench:
    model: str = "tiny"
    sizes: tuple[int, ...] = (128,)
    variants: tuple[tuple[str, str], ...] = (("onnxruntime", "fp32"), ("torch", "fp32"))  # first = reference
    runs: int = 5
    device: str = "cpu"
    isolated: bool = False  # one process per variant, run one after the other (models too big to hold them all)


def load_unet(model: str, backend: str, precision: str, engine_dir: Path, device: str):
    """The UNet runner of a fresh or cached build of `model` with `backend` at `precision`."""
    from engine import cache
    from engine.backends.base import get_backend
    from engine.build import build_all
    from engine.config import BuildConfig
    from export.families import get_family

    record = build_all(BuildConfig(model=model, backend=backend, precision=precision, engine_dir=engine_dir,
                                   components=("unet",), device=device), progress=False).record
    art = engine_dir / record["model_id"] / record["components"]["unet"]["dir"]
    spec = get_family(record["family"]).spec("unet")
    return get_backend(backend).load(spec, art, cache.verify(art), device), record


def _calls(runner, inputs: dict, runs: int) -> tuple[list[float], Any]:
    """One warm-up call (its output kept, as float32 on the CPU), then `runs` timed calls."""
    out0 = next(iter(runner(**inputs).values())).float().cpu()
    return [_timed_call(runner, inputs) for _ in range(runs)], out0


def _timed_call(runner, inputs: dict) -> float:
    import torch

    t0 = time.perf_counter()
    out = next(iter(runner(**inputs).values()))
    if out.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _inputs(cfg: UnetStepBench, spec, size: int) -> dict:
    from export.models import folder_dims, resolve_model
    from export.onnx_export import example_inputs
    from export.specs import Shape

    dims = folder_dims(resolve_model(cfg.model)[0])
    return example_inputs(spec, dims, Shape(1, size, size), "fp32", seed=0)  # [2, C, H/8, W/8] with CFG


def _report(results: Results, cfg: UnetStepBench, size: int, samples: dict, outs: dict, extra: dict) -> None:
    ref_key = next(iter(samples))
    ref, ref_p50 = outs[ref_key], percentiles(samples[ref_key])["p50"]
    for key in samples:
        config = {"model": cfg.model, "backend": key[0], "precision": key[1], "size": size, "batch": 2,
                  "reference": f"{ref_key[0]} {ref_key[1]}", "isolated": cfg.isolated}
        results.add_samples("unet_step", config, "unet_call_ms", samples[key], "ms")
        results.add("unet_step", config, "max_abs_err", float((outs[key] - ref).abs().max()), "abs")
        results.add("unet_step", config, "ref_abs_max", float(ref.abs().max()), "abs")
        results.add("unet_step", config, "time_vs_ref", percentiles(samples[key])["p50"] / ref_p50, "ratio")
        if key in extra:
            results.add("unet_step", config, "peak_rss_gib", extra[key], "GiB")


def measure(results: Results, cfg: UnetStepBench, engine_dir: Path | None = None) -> None:
    """Interleaved in this process, or (cfg.isolated) one process per variant, run one after the other: the way
    to compare large models whose variants do not all fit in memory at once (peak RSS per variant is recorded)."""
    from benchmarks.pipeline import unavailable

    engine_dir = engine_dir or Path(tempfile.mkdtemp(prefix="bench-unet-"))
    ready = []
    for backend, precision in cfg.variants:
        reason = unavailable(backend, cfg.device)
        if reason:
            results.skip("unet_step", {"model": cfg.model, "backend": backend, "precision": precision}, reason)
        else:
            ready.append((backend, precision))
    if cfg.isolated:
        _measure_isolated(results, cfg, ready, engine_dir)
        return
    runners = {}
    for backend, precision in ready:
        try:
            runners[(backend, precision)] = load_unet(cfg.model, backend, precision, engine_dir, cfg.device)[0]
        except (ImportError, ValueError, RuntimeError, OSError) as e:  # a precision this backend or CPU refuses
            results.skip("unet_step", {"model": cfg.model, "backend": backend, "precision": precision},
                         f"{type(e).__name__}: {e}")
    if not runners:
        return
    for size in cfg.sizes:
        base = _inputs(cfg, next(iter(runners.values())).spec, size)
        outs, samples = {}, {k: [] for k in runners}
        for i in range(cfg.runs + 1):  # call 0 of each variant is its warm-up; calls alternate between variants
            for key, runner in runners.items():
                inputs = {n: v.to(runner.device) for n, v in base.items()}
                if i == 0:
                    outs[key] = next(iter(runner(**inputs).values())).float().cpu()
                else:
                    samples[key].append(_timed_call(runner, inputs))
        _report(results, cfg, size, samples, outs, {})
    for runner in runners.values():
        runner.close()


def _measure_isolated(results: Results, cfg: UnetStepBench, variants: list, engine_dir: Path) -> None:
    import json
    import subprocess

    from safetensors.torch import load_file

    samples: dict = {size: {} for size in cfg.sizes}
    outs: dict = {size: {} for size in cfg.sizes}
    rss = {}
    for backend, precision in variants:
        out_dir = Path(tempfile.mkdtemp(prefix="unet-step-out-"))
        job = {"cfg": {**asdict(cfg), "variants": [[backend, precision]]}, "engine_dir": str(engine_dir),
               "out": str(out_dir)}
        r = subprocess.run([sys.executable, "-m", "benchmarks.unet_step", CHILD, json.dumps(job)],
                           capture_output=True, text=True, check=False, timeout=7200)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            results.skip("unet_step", {"model": cfg.model, "backend": backend, "precision": precision},
                         f"variant failed (rc {r.returncode}): {r.stderr.strip()[-300:]}")
            continue
        doc = json.loads(line[-1][7:])
        rss[(backend, precision)] = doc["peak_rss_gib"]
        for size in cfg.sizes:
            samples[size][(backend, precision)] = doc["samples"][str(size)]
            outs[size][(backend, precision)] = load_file(str(out_dir / f"{size}.safetensors"))["out"]
    for size in cfg.sizes:
        if samples[size]:
            _report(results, cfg, size, samples[size], outs[size], rss)


def _child(job: dict) -> dict:
    """One variant in this fresh process: build/load, each size's calls, outputs saved for the parent."""
    from safetensors.torch import save_file

    cfg = UnetStepBench(**{**job["cfg"], "sizes": tuple(job["cfg"]["sizes"]),
                           "variants": tuple(tuple(v) for v in job["cfg"]["variants"])})
    backend, precision = cfg.variants[0]
    runner = load_unet(cfg.model, backend, precision, Path(job["engine_dir"]), cfg.device)[0]
    out = {}
    for size in cfg.sizes:
        inputs = {n: v.to(runner.device) for n, v in _inputs(cfg, runner.spec, size).items()}
        out[str(size)], first = _calls(runner, inputs, cfg.runs)
        save_file({"out": first.contiguous()}, str(Path(job["out"]) / f"{size}.safetensors"))
    return {"samples": out, "peak_rss_gib": peak_rss_bytes() / 2**30}


def _variants(text: str) -> tuple[tuple[str, str], ...]:
    """`onnxruntime:fp32,openvino:int8` -> (("onnxruntime", "fp32"), ("openvino", "int8")); a precision is required."""
    out = []
    for item in text.split(","):
        backend, sep, precision = item.strip().partition(":")
        if not sep or not backend or not precision:
            raise argparse.ArgumentTypeError(f"variant {item!r}: expected BACKEND:PRECISION (e.g. openvino:int8)")
        out.append((backend, precision))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    from benchmarks import RESULTS
    from export.quiet import add_verbose_flag, quiet_cli

    quiet_cli(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.unet_step", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="tiny", help="preset or local model path")
    p.add_argument("--sizes", default="128", help="comma separated image sides in pixels")
    p.add_argument("--variants", type=_variants, default=UnetStepBench.variants,
                   help="comma separated BACKEND:PRECISION, the first the reference (default: onnxruntime:fp32,"
                        "torch:fp32)")
    p.add_argument("--runs", type=int, default=5, help="timed calls per variant and size (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--isolated", action="store_true", help="one process per variant, one after the other")
    p.add_argument("--engine-dir", type=Path, default=None, help="where the builds go (cached); default: a temp dir")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    add_verbose_flag(p)
    a = p.parse_args(argv)
    cfg = UnetStepBench(model=a.model, sizes=tuple(int(s) for s in a.sizes.split(",")), variants=a.variants,
                        runs=a.runs, device=a.device, isolated=a.isolated)
    results = Results(device=a.device, suite="unet-step")
    measure(results, cfg, a.engine_dir)
    for r in results.rows:
        c = r["config"]
        if r.get("skipped"):
            print(f"{c['backend']:12s} {c['precision']}: skipped ({r['skipped']})")
        elif r["metric"] in ("unet_call_ms_p50", "time_vs_ref", "max_abs_err"):
            print(f"{c['backend']:12s} {c['precision']:5s} {c['size']}²  {r['metric']:18s} {r['value']:.4g} {r['unit']}")
    print(f"wrote {results.write(a.out)}")
    return 0


CHILD = "--child"  # python -m benchmarks.unet_step --child JOB_JSON: one variant of an isolated run

if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        import json

        from export.quiet import quiet

        quiet(False)
        print("RESULT " + json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
