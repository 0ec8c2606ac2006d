"""Request-level vs step-level batching under open-loop Poisson load with mixed step counts, one run.

    python -m benchmarks.continuous_load [--requests 120] [--loads 0.3,0.6,0.9] [--steps 10,20,30] [--quick]
                                         [--device cuda --model sd15 --size 512]

Two servers on the same engines, `--batching request` and `--batching step`: on the CPU `tiny` ONNX Runtime
fp32 engines (64², max batch 8); with `--device cuda` the torch backend in fp16, whose UNet is graph-safe, so
step batching pads each step to a batch-size bucket and replays one CUDA graph per bucket. Capacity is measured first, on the request-level server, closed loop with 8 clients
sending the same mix of step counts: its img/s is 100% load. Then, for each load level, both servers get
the same arrival times (Poisson at level × capacity, seeded) and the same requests (step counts cycling
through --steps, so the total work is equal), alternating server per level. Rows per (mode, load): latency
mean/p50/p99, img/s, lost; plus step/request ratios of mean and p99 latency and of img/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks import RESULTS
from benchmarks.schema import Results, percentiles
from benchmarks.serve_load import Sample, generate
from benchmarks.serve_process import running_server

MODES = ("request", "step")


@dataclass(frozen=True)
class ContinuousLoad:
    requests: int = 120  # per (mode, load level)
    loads: tuple[float, ...] = (0.3, 0.6, 0.9)
    steps: tuple[int, ...] = (10, 20, 30)
    max_batch: int = 8
    capacity_clients: int = 8
    capacity_requests: int = 48
    timeout_s: float = 300.0
    seed: int = 7
    device: str = "cpu"  # cpu: ONNX Runtime fp32; cuda: the torch backend in fp16 (CUDA graphs per bucket)
    model: str = "tiny"
    size: int = 64


QUICK = ContinuousLoad(requests=8, loads=(0.6,), steps=(2, 4, 6), capacity_requests=8)


def body(i: int, cfg: ContinuousLoad) -> dict:
    return {"prompt": f"continuous {i}: a harbour at dawn", "seed": cfg.seed * 1000 + i,
            "steps": cfg.steps[i % len(cfg.steps)], "images": 1, "height": cfg.size, "width": cfg.size,
            "response_format": "json"}


def build(cfg: ContinuousLoad, dest: Path) -> Path:
    """The engines both servers load: ONNX Runtime fp32 on the CPU; the torch backend in fp16 on a GPU."""
    from engine.build import build_all
    from engine.config import BuildConfig

    gpu = cfg.device.startswith("cuda")
    build_all(BuildConfig(model=cfg.model, backend="torch" if gpu else "onnxruntime",
                          precision="fp16" if gpu else "fp32", device=cfg.device, height=cfg.size, width=cfg.size,
                          max_batch=cfg.max_batch, engine_dir=dest), progress=False)
    return dest


def capacity(url: str, cfg: ContinuousLoad) -> float:
    """img/s of a closed loop of `capacity_clients` clients over `capacity_requests` requests of the mix."""
    ids = iter(range(cfg.capacity_requests))
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=cfg.capacity_clients) as pool:
        samples = list(pool.map(lambda i: generate(url, body(i, cfg), cfg.timeout_s), ids))
    ok = sum(s.images for s in samples if s.status == 200)
    return ok / (time.monotonic() - start)


def poisson(url: str, cfg: ContinuousLoad, arrivals: list[float]) -> tuple[list[Sample], float]:
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(len(arrivals), 128)) as pool:
        futures = []
        for i, t in enumerate(arrivals):
            time.sleep(max(0.0, start + t - time.monotonic()))
            futures.append(pool.submit(generate, url, body(i, cfg), cfg.timeout_s))
        samples = [f.result() for f in futures]
    return samples, time.monotonic() - start


def measure(results: Results, cfg: ContinuousLoad = ContinuousLoad(), engine_dir: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="continuous-") as tmp:
        engine_dir = engine_dir or build(cfg, Path(tmp) / "engines")
        flags = ("--max-batch", str(cfg.max_batch), "--max-queue", str(cfg.requests + 8), "--device", cfg.device)
        with running_server(engine_dir, Path(tmp), *flags, "--batching", "request") as req_srv, \
                running_server(engine_dir, Path(tmp), *flags, "--batching", "step") as step_srv:
            urls = {"request": req_srv.url, "step": step_srv.url}
            for url in urls.values():  # warm both: first batches of each size are slower
                capacity(url, dataclasses.replace(cfg, capacity_requests=cfg.max_batch, steps=cfg.steps[:1]))
            cap = capacity(urls["request"], cfg)
            base = {"model": cfg.model, "size": cfg.size, "steps_mix": "/".join(map(str, cfg.steps)),
                    "max_batch": cfg.max_batch, "requests": cfg.requests}
            results.add("continuous_batching", base, "capacity_img_s", cap, "img/s",
                        note="request-level batching, closed loop of 8 clients")
            rng = random.Random(cfg.seed)
            for load in cfg.loads:
                rate = load * cap
                arrivals = list(itertools.accumulate(rng.expovariate(rate) for _ in range(cfg.requests)))
                figures = {}
                for mode in MODES:
                    samples, wall = poisson(urls[mode], cfg, arrivals)
                    ok = [s.latency_ms for s in samples if s.status == 200 and s.latency_ms is not None]
                    config = {**base, "mode": mode, "load": load, "arrival_rate_req_s": round(rate, 3)}
                    if not ok:
                        results.skip("continuous_batching", config, "no request answered")
                        continue
                    stats = percentiles(ok)
                    figures[mode] = {"mean": stats["mean"], "p99": stats["p99"], "ips": len(ok) / wall}
                    for q in ("mean", "p50", "p99"):
                        results.add("continuous_batching", config, f"latency_ms_{q}", stats[q], "ms", n=len(ok))
                    results.add("continuous_batching", config, "images_per_s", len(ok) / wall, "img/s")
                    results.add("continuous_batching", config, "lost", len(samples) - len(ok), "requests")
                if len(figures) == 2:
                    c = {**base, "load": load}
                    s, r = figures["step"], figures["request"]
                    results.add("continuous_batching", c, "step_over_request_latency_mean", s["mean"] / r["mean"],
                                "ratio")
                    results.add("continuous_batching", c, "step_over_request_latency_p99", s["p99"] / r["p99"], "ratio")
                    results.add("continuous_batching", c, "step_over_request_img_s", s["ips"] / r["ips"], "ratio")


def main(argv: list[str] | None = None) -> int:
    d = ContinuousLoad()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--loads", default=",".join(map(str, d.loads)))
    p.add_argument("--steps", default=",".join(map(str, d.steps)))
    p.add_argument("--device", default=d.device, help="cpu (ONNX Runtime fp32) or cuda (torch fp16, CUDA graphs)")
    p.add_argument("--model", default=d.model, help="preset or local model path")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    p.add_argument("--quick", action="store_true", help="tiny counts (the test's run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    where = {"device": a.device, "model": a.model, "size": a.size}
    cfg = dataclasses.replace(QUICK, **where) if a.quick else ContinuousLoad(
        requests=a.requests, loads=tuple(float(x) for x in a.loads.split(",")),
        steps=tuple(int(x) for x in a.steps.split(",")), **where)
    results = Results(device=a.device, suite="continuous-batching")
    measure(results, cfg)
    for r in results.rows:
        if r["value"] is not None:
            print(f"{r['config'].get('mode', '-'):8} load {r['config'].get('load', '-')}: {r['metric']} "
                  f"{r['value']:.3f} {r['unit']}")
    print(f"wrote {results.write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
