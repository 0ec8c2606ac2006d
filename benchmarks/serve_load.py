"""Load test of `python -m engine.serve` on loopback: closed-loop concurrency levels, batch-1 baseline, overload.

    python -m benchmarks.serve_load [--engine-dir DIR] [--steps 8] [--levels 1,2,4,8,16]
        [--requests-per-level 96] [--duration-cap-s 40] [--out results/serve_load_<model>_<device>.json] [--quick]

Starts each server itself (a subprocess on a free 127.0.0.1 port, stopped with SIGTERM, exit code checked):
  1. --max-batch 8: closed loop at each concurrency level (N workers, each sends its next request when the
     previous one is answered);
  2. --max-batch 1: the same closed loop at concurrency 8, the batch-1 baseline (batching ratio = img/s of 1 / 2);
  3. --max-batch 8 --max-queue 8: open-loop Poisson arrivals at 2x the best closed-loop img/s, so the queue
     fills and the server must answer 429 quickly.
Every phase is bounded in requests and seconds; every request has its own seed and prompt. Without
--engine-dir it builds `tiny` ONNX Runtime fp32 64x64 engines in a temporary directory. Everything in the
JSON is measured; it is written atomically and a table is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

from benchmarks import RESULTS
from benchmarks.serve_process import Server, running_server
from benchmarks.serve_process import http as http_call

REPO = Path(__file__).resolve().parents[1]
REJECTION_GOAL_MS = 50.0
METRIC_PREFIXES = ("sd_inference_request_", "sd_inference_count", "sd_inference_exec_count", "sd_inference_batch_size",
                   "sd_inference_queue_duration", "sd_inference_compute_duration", "sd_http_requests")


@dataclass
class LoadConfig:
    """Every default of the load test, in one place (the CLI flags override these)."""
    engine_dir: Path | None = None  # None: build tiny ORT fp32 64x64 engines in a temporary directory
    model: str | None = None  # passed to the server as --model when given; the build uses "tiny" when None
    steps: int = 8
    levels: tuple[int, ...] = (1, 2, 4, 8, 16)
    requests_per_level: int = 96
    duration_cap_s: float = 40.0  # per phase: no new request is sent after it
    max_batch: int = 8
    baseline_concurrency: int = 8  # where batched and batch-1 serving are compared
    overload_factor: float = 2.0  # open-loop arrival rate = factor x the best closed-loop img/s
    overload_requests: int = 320
    overload_max_queue: int = 8
    request_timeout_s: float = 60.0  # no answer by then: the request is counted lost
    ready_timeout_s: float = 180.0
    seed: int = 1000
    out: Path | None = None  # None: results/serve_load_<model>_<device>.json


QUICK = dict(steps=2, levels=(1, 8), requests_per_level=8, duration_cap_s=15.0, overload_requests=24)


@dataclass
class Sample:
    """One request as the client saw it; status None = never answered (lost)."""
    sent_at: float
    latency_ms: float | None
    status: int | None
    batch_images: int | None = None
    compute_ms: float | None = None  # the server's timings_ms.compute: its whole batch's run
    images: int = 0
    retry_after: str | None = None
    error: str | None = None
    send_lag_ms: float = 0.0  # open loop: how late after its scheduled arrival it was sent


def request_body(i: int, cfg: LoadConfig) -> dict:
    """Request i: its own seed and prompt, the same graph key as every other (so they can share a batch)."""
    return {"prompt": f"load test request {i}: a lighthouse at dusk, {i % 7} boats", "seed": cfg.seed + i,
            "steps": cfg.steps, "images": 1, "response_format": "json"}


def generate(url: str, body: dict, timeout: float) -> Sample:
    t0 = time.monotonic()
    try:
        status, payload, headers = http_call("POST", url + "/v1/generate", json.dumps(body).encode(), timeout)
    except (OSError, http.client.HTTPException) as err:  # timeouts and resets: no answer
        return Sample(t0, None, None, error=type(err).__name__)
    sample = Sample(t0, (time.monotonic() - t0) * 1000, status, retry_after=headers.get("retry-after"))
    if status == 200:
        try:
            doc = json.loads(payload)
            sample.batch_images, sample.images = doc.get("batch_images"), len(doc["images"])
            sample.compute_ms = doc.get("timings_ms", {}).get("compute")
        except (ValueError, KeyError, TypeError) as err:
            sample.error = f"bad 200 body: {type(err).__name__}"
    return sample


def model_flags(cfg: LoadConfig) -> tuple[str, ...]:
    return ("--model", cfg.model) if cfg.model else ()


def metrics(url: str) -> dict[str, float]:
    """The counters and histogram sums/counts of /metrics that the report keeps ({} if unreadable)."""
    status, payload, out = 0, b"", {}
    with contextlib.suppress(OSError, http.client.HTTPException):
        status, payload, _ = http_call("GET", url + "/metrics", None, 10.0)
    for line in payload.decode(errors="replace").splitlines() if status == 200 else ():
        name, _, value = line.rpartition(" ")
        if line.startswith("#") or not name.startswith(METRIC_PREFIXES) or "_bucket" in name or "_created" in name:
            continue
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 6) for k, v in after.items() if v != before.get(k, 0.0)}


def closed_loop(url: str, cfg: LoadConfig, concurrency: int, ids: Iterator[int]) -> tuple[list[Sample], int, float]:
    """N workers, each sending its next request when the previous one is answered; (samples, sent, wall s)."""
    lock, samples, sent = threading.Lock(), [], [0]
    start = time.monotonic()
    deadline = start + cfg.duration_cap_s

    def worker() -> None:
        while True:
            with lock:
                if sent[0] >= cfg.requests_per_level or time.monotonic() >= deadline:
                    return
                sent[0] += 1
                i = next(ids)
            sample = generate(url, request_body(i, cfg), cfg.request_timeout_s)
            with lock:
                samples.append(sample)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()  # a worker's bug is raised here, not lost
    return samples, sent[0], time.monotonic() - start


def open_loop(url: str, cfg: LoadConfig, rate: float, ids: Iterator[int]) -> tuple[list[Sample], int, float]:
    """Poisson arrivals at `rate` req/s, at most overload_requests within duration_cap_s; (samples, sent, wall s)."""
    rng = random.Random(cfg.seed)
    gaps = (rng.expovariate(rate) for _ in range(cfg.overload_requests))
    arrivals = list(itertools.takewhile(lambda t: t < cfg.duration_cap_s, itertools.accumulate(gaps)))

    def send(i: int, scheduled: float) -> Sample:
        sample = generate(url, request_body(i, cfg), cfg.request_timeout_s)
        sample.send_lag_ms = (sample.sent_at - scheduled) * 1000
        return sample

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(len(arrivals), 128) or 1) as pool:
        futures = []
        for t in arrivals:
            time.sleep(max(0.0, start + t - time.monotonic()))
            futures.append(pool.submit(send, next(ids), start + t))
        samples = [f.result() for f in futures]
    return samples, len(arrivals), time.monotonic() - start


def warm_up(url: str, cfg: LoadConfig, n: int, ids: Iterator[int]) -> None:
    """n concurrent requests, not counted: the server's first batches of each size are slower."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        bodies = [request_body(next(ids), cfg) for _ in range(n)]
        list(pool.map(lambda body: generate(url, body, cfg.request_timeout_s), bodies))


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s, k = sorted(values), (len(values) - 1) * p / 100  # linear interpolation between closest ranks
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 2)


def latency_stats(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": round(max(values), 2) if values else None}


def compute_by_batch(ok: list[Sample]) -> dict:
    """Median server compute per batch size, and per image: does a larger batch cost less per image?"""
    sizes: dict[int, list[float]] = {}
    for s in ok:
        if s.batch_images and s.compute_ms is not None:
            sizes.setdefault(s.batch_images, []).append(s.compute_ms)
    return {str(n): {"batch_ms_p50": percentile(v, 50), "per_image_ms_p50": round(percentile(v, 50) / n, 2),
                     "requests": len(v)} for n, v in sorted(sizes.items())}


def summarize(name: str, samples: list[Sample], sent: int, wall_s: float, **extra) -> dict:
    """One phase's figures; answered + lost == sent when every sent request left a sample."""
    ok = [s for s in samples if s.status == 200 and s.error is None]
    rejected = [s for s in samples if s.status == 429]
    answered = [s for s in samples if s.status is not None]
    rejection_ms = [s.latency_ms for s in rejected]
    images = sum(s.images for s in ok)
    return {
        "phase": name, **extra, "sent": sent, "answered": len(answered), "lost": sent - len(answered),
        "lost_reasons": dict(Counter(s.error for s in samples if s.status is None)),
        "ok": len(ok), "images": images, "rejected_429": len(rejected),
        "errors_5xx": sum(1 for s in answered if s.status >= 500),
        "errors_other": sum(1 for s in answered if s not in ok and s.status != 429 and s.status < 500),
        "statuses": {str(k): v for k, v in sorted(Counter(s.status for s in answered).items())},
        "wall_s": round(wall_s, 3), "throughput_img_s": round(images / wall_s, 3) if wall_s > 0 else None,
        "latency_ms": latency_stats([s.latency_ms for s in ok]),
        "batch_images_hist": {str(k): v for k, v in sorted(Counter(s.batch_images for s in ok).items(),
                                                          key=lambda kv: (kv[0] is None, kv[0] or 0))},
        "compute_ms_by_batch": compute_by_batch(ok), "rejection_ms": latency_stats(rejection_ms),
        "rejections_over_goal": sum(1 for v in rejection_ms if v > REJECTION_GOAL_MS),
        "rejections_without_retry_after": sum(1 for s in rejected if not s.retry_after),
    }


def run_phase(server: Server, name: str, samples_fn, **extra) -> dict:
    before = metrics(server.url)
    samples, sent, wall_s = samples_fn()
    phase = summarize(name, samples, sent, wall_s, server_flags=list(server.flags), **extra)
    if any(s.send_lag_ms for s in samples):
        phase["send_lag_ms"] = latency_stats([s.send_lag_ms for s in samples])
    phase["metrics_delta"] = metrics_delta(before, metrics(server.url))
    return phase


def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "load_avg_after_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    for pkg in ("torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "fastapi", "uvicorn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[pkg] = metadata.version(pkg)
    import torch

    info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def build_engines(dest: Path) -> Path:
    from engine.build import build_all
    from engine.config import BuildConfig

    build_all(BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", height=64, width=64, engine_dir=dest),
              progress=False)
    return dest


def serve_phases(cfg: LoadConfig, engine_dir: Path, log_dir: Path, report: dict, flags: tuple[str, ...],
                 warm_n: int, phases: list[tuple[str, Callable, dict]]) -> None:
    """One server: warm it up (uncounted), run each (name, fn(url) -> samples, extra), record its exit code."""
    with running_server(engine_dir, log_dir, *model_flags(cfg), *flags, ready_timeout=cfg.ready_timeout_s) as srv:
        report.setdefault("server_info", srv.info)
        warm_up(srv.url, cfg, warm_n, report["ids"])
        for name, fn, extra in phases:
            report["phases"].append(run_phase(srv, name, lambda fn=fn: fn(srv.url), **extra))
    report["servers"].append({"flags": list(flags), "exit_code": srv.exit_code})


def run_servers(cfg: LoadConfig, engine_dir: Path, log_dir: Path) -> dict:
    ids = itertools.count()
    report: dict = {"phases": [], "servers": [], "ids": ids}
    batched, c = ("--max-batch", str(cfg.max_batch)), cfg.baseline_concurrency
    closed = [(f"closed_c{n}", lambda url, n=n: closed_loop(url, cfg, n, ids), {"mode": "closed", "concurrency": n})
              for n in sorted({*cfg.levels, c})]
    serve_phases(cfg, engine_dir, log_dir, report, batched, cfg.max_batch, closed)
    serve_phases(cfg, engine_dir, log_dir, report, ("--max-batch", "1"), 2,
                 [(f"batch1_c{c}", lambda url: closed_loop(url, cfg, c, ids), {"mode": "closed", "concurrency": c})])
    capacity = max(p["throughput_img_s"] or 0.0 for p in report["phases"])
    rate = cfg.overload_factor * capacity
    serve_phases(cfg, engine_dir, log_dir, report, (*batched, "--max-queue", str(cfg.overload_max_queue)),
                 min(cfg.max_batch, cfg.overload_max_queue),
                 [("overload_poisson", lambda url: open_loop(url, cfg, rate, ids),
                   {"mode": "open", "capacity_img_s": capacity, "arrival_rate_req_s": round(rate, 3)})])
    del report["ids"]
    return report


def headline(report: dict, cfg: LoadConfig) -> dict:
    by_name = {p["phase"]: p for p in report["phases"]}
    c = cfg.baseline_concurrency
    batched, single = by_name[f"closed_c{c}"]["throughput_img_s"], by_name[f"batch1_c{c}"]["throughput_img_s"]
    over = by_name["overload_poisson"]
    return {"batching_ratio_c8": round(batched / single, 3) if batched and single else None,
            "batched_img_s_c8": batched, "batch1_img_s_c8": single, "capacity_img_s": over["capacity_img_s"],
            "overload_arrival_rate_req_s": over["arrival_rate_req_s"],
            "overload_served_img_s": over["throughput_img_s"],
            "overload_429": over["rejected_429"], "overload_5xx": over["errors_5xx"], "overload_lost": over["lost"],
            "overload_worst_429_ms": over["rejection_ms"]["max"],
            "overload_429_over_50ms": over["rejections_over_goal"],
            "closed_loop_lost": sum(p["lost"] for p in report["phases"] if p["mode"] == "closed"),
            "closed_loop_5xx": sum(p["errors_5xx"] for p in report["phases"] if p["mode"] == "closed"),
            "servers_exit_codes": [s["exit_code"] for s in report["servers"]]}


def run(cfg: LoadConfig) -> dict:
    """Machine load before and after is recorded: other processes on the cores skew every figure."""
    t0, load_before = time.monotonic(), [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        engine_dir = cfg.engine_dir or build_engines(Path(tmp) / "engines")
        report = run_servers(cfg, engine_dir, Path(tmp))
    cfg_doc = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    machine = {**machine_info(), "load_avg_before_1_5_15": load_before}
    return {"benchmark": "serve_load", "config": cfg_doc, "machine": machine,
            "summary": headline(report, cfg), **report, "total_s": round(time.monotonic() - t0, 1)}


def measure(results, cfg: LoadConfig | None = None) -> None:
    """The load test (quick counts unless `cfg` says otherwise) as rows of the common schema: per phase
    img/s and latency percentiles, plus the headline figures (batching ratio, overload behaviour)."""
    cfg = cfg or replace(LoadConfig(), **QUICK)
    doc = run(cfg)
    base = {"model": doc.get("server_info", {}).get("model") or cfg.model or "tiny", "steps": cfg.steps,
            "max_batch": cfg.max_batch}
    for p in doc["phases"]:
        config = {**base, "phase": p["phase"]}
        if p["throughput_img_s"] is not None:
            results.add("serve_load", config, "images_per_s", p["throughput_img_s"], "img/s", sent=p["sent"])
        for q in ("p50", "p90", "p99"):
            if p["latency_ms"][q] is not None:
                results.add("serve_load", config, f"latency_ms_{q}", p["latency_ms"][q], "ms", sent=p["sent"])
        results.add("serve_load", config, "lost", p["lost"], "requests")
    for k, v in doc["summary"].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            results.add("serve_load", base, k, v, "")


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def table(doc: dict) -> str:
    rows = ["| phase | sent | ok | img/s | p50 ms | p90 ms | p99 ms | batch sizes | 429 | 5xx | lost | worst 429 ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["phases"]:
        lat, hist = p["latency_ms"], " ".join(f"{k}:{v}" for k, v in p["batch_images_hist"].items())
        rows.append(f"| {p['phase']} | {p['sent']} | {p['ok']} | {p['throughput_img_s']} | {lat['p50']} | "
                    f"{lat['p90']} | {lat['p99']} | {hist} | {p['rejected_429']} | {p['errors_5xx']} | {p['lost']} | "
                    f"{p['rejection_ms']['max']} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> LoadConfig:
    d = LoadConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-dir", type=Path, default=d.engine_dir)
    p.add_argument("--model", default=d.model)
    p.add_argument("--levels", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                   help=f"closed-loop concurrency levels, comma separated (default {','.join(map(str, d.levels))})")
    for name, kind in (("steps", int), ("requests_per_level", int), ("duration_cap_s", float),
                       ("overload_requests", int)):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"default {getattr(d, name)}")
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--quick", action="store_true", help="tiny counts (the test suite's run)")
    a = p.parse_args(argv)
    cfg = replace(d, **QUICK) if a.quick else d
    given = {k: getattr(a, k) for k in ("steps", "levels", "requests_per_level", "duration_cap_s", "overload_requests")}
    return replace(cfg, engine_dir=a.engine_dir, model=a.model, out=a.out,
                   **{k: v for k, v in given.items() if v is not None})


def default_out(doc: dict) -> Path:
    device = "gpu" if doc["machine"]["cuda"] else "cpu"
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", doc.get("server_info", {}).get("model") or "model")
    return RESULTS / f"serve_load_{model}_{device}.json"


def out_path(out: Path | None, doc: dict) -> Path:
    """Where the report goes: --out as a file, or the default name inside --out when it is a folder."""
    if out is None:
        return default_out(doc)
    if out.is_dir():
        return out / default_out(doc).name
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    doc = run(cfg)
    write_json(out := out_path(cfg.out, doc), doc)
    print(f"{table(doc)}\n{json.dumps(doc['summary'], indent=2)}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
