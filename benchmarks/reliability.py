"""Reliability of `python -m engine.serve` under hostile use, measured on loopback (issue 31's figures), one JSON:

    python -m benchmarks.reliability [--engine-dir DIR] [--soak-requests 2000] [--idle-sockets 20000] [--out PATH]

  1. schema: schemathesis over every operation of /openapi.json, bodies included (`st run`, all checks,
     deterministic; the server-error and conformance checks): server errors and responses that break the schema;
  2. soak: requests with random strengths, sizes, step counts and a share of bad images (undecodable,
     truncated), a few at a time: the server's RSS after the first tenth and at the end, and every status seen;
  3. idle_sockets: that many TCP connections opened and left silent (the slow-loris shape), /healthz timed
     meanwhile, and again after --header-timeout-s closed them;
  4. decode_burst: large PNG uploads in flight, /healthz timed meanwhile.
/healthz is timed from a process of its own (an orchestrator's probe), sequentially. On a 2-core machine the
uploading client, the server and the probe share the cores: the figures include that contention.
  5. overload_10x: benchmarks.serve_load's closed loop at concurrency 8 measures capacity, then Poisson arrivals
     at 10x that rate: 5xx, lost requests (sent, never answered) and how fast each 429 came.
Each server is a
subprocess on a free 127.0.0.1 port, stopped with SIGTERM. Every loop is bounded in count and in seconds.
"""
from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks import RESULTS
from benchmarks.serve_load import LoadConfig, closed_loop, latency_stats, machine_info, open_loop, summarize, write_json
from benchmarks.serve_process import Server, running_server
from benchmarks.serve_process import http as http_call

REPO = Path(__file__).resolve().parents[1]
# issue 31: "0 server errors and 0 responses that break the schema"
SCHEMA_CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
                 "response_schema_conformance")


@dataclass
class ReliabilityConfig:
    engine_dir: Path | None = None  # None: tiny ONNX Runtime fp32 engines (with vae_encoder) built in a temp folder
    schema_examples: int = 25  # schemathesis examples per operation
    soak_requests: int = 2000
    soak_concurrency: int = 4
    soak_cap_s: float = 900.0  # no new soak request after this
    bad_image_share: float = 0.1
    idle_sockets: int = 20000  # capped by this process's open-file limit (raised to its hard limit first)
    health_samples: int = 20
    burst_uploads: int = 12
    burst_side: int = 2048  # noise PNG, about 12 MB: under the server's default --max-body-mb 20
    burst_probe_samples: int = 100  # /healthz during the burst (~2 s here), every burst_probe_interval_s
    burst_probe_interval_s: float = 0.02
    phases: tuple[str, ...] = ("schema", "soak", "idle_sockets", "decode_burst", "overload_10x")  # what runs
    out: Path | None = None


def health_ms(url: str, samples: int, interval_s: float = 0.0) -> dict:
    """/healthz latencies (ms) and statuses, one request at a time, `interval_s` apart, from this process."""
    times, statuses = [], Counter()
    for i in range(samples):
        time.sleep(interval_s if i else 0.0)
        t0 = time.perf_counter()
        try:
            status, _, _ = http_call("GET", url + "/healthz", None, 10.0)
        except OSError as exc:
            status = type(exc).__name__
        times.append((time.perf_counter() - t0) * 1e3)
        statuses[str(status)] += 1
    return {"latency_ms": latency_stats(times), "statuses": dict(statuses)}


def probe_health(url: str, samples: int, interval_s: float = 0.0) -> dict:
    """`health_ms` from a process of its own, as an orchestrator's probe: the load's client threads in this process
    would otherwise share its interpreter lock and delay the probe itself."""
    code = ("import json; from benchmarks.reliability import health_ms; "
            f"print(json.dumps(health_ms({url!r}, {samples}, {interval_s})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}


def png_b64(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


# ---- 1. schema ----

def schema_phase(server: Server, cfg: ReliabilityConfig, work: Path) -> dict:
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    if not Path(st).exists():
        return {"skipped": "schemathesis is not installed (pip install schemathesis)"}
    report = work / "schemathesis.json"
    cmd = [st, "run", server.url + "/openapi.json", "--checks", SCHEMA_CHECKS, "-n", str(cfg.schema_examples),
           "--generation-deterministic", "--report", "json", "--report-json-path", str(report), "-w", "1"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=work)  # its .schemathesis/ there
    summary = {"command": " ".join(["st", *cmd[1:3], "..."]), "exit_code": done.returncode,
               "wall_s": round(time.perf_counter() - t0, 1), "output_tail": done.stdout[-3000:]}
    if report.exists():
        summary["report"] = json.loads(report.read_text())
    return summary


# ---- 2. soak ----

def soak_body(rng: random.Random, init: str, cfg: ReliabilityConfig) -> dict:
    side = rng.choice((48, 64, 80, 96, 112, 128))
    body = {"prompt": f"soak {rng.random():.6f}", "steps": rng.randint(1, 3), "seed": rng.randrange(2**32),
            "height": side, "width": rng.choice((48, 64, 80, 96, 112, 128))}
    roll = rng.random()
    if roll < cfg.bad_image_share:
        body["init_image"] = rng.choice(("not base64!", init[: len(init) // 3], "data:image/png;base64,AAAA"))
    elif roll < 0.5:  # img2img: at least one step runs at any strength drawn (steps x strength >= 1)
        body |= {"init_image": init, "strength": rng.uniform(0.3, 1.0), "resize": True, "steps": rng.randint(4, 6)}
    return body


def soak_phase(server: Server, cfg: ReliabilityConfig) -> dict:
    rng = random.Random(31)
    init = png_b64(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    bodies = [soak_body(rng, init, cfg) for _ in range(cfg.soak_requests)]
    pid = server.proc.pid
    statuses: Counter = Counter()
    marks: dict[str, float] = {"start": rss_mb(pid)}
    deadline = time.monotonic() + cfg.soak_cap_s
    sent = 0
    lock = threading.Lock()

    def send(body: dict) -> None:
        nonlocal sent
        if time.monotonic() > deadline:
            return
        try:
            status, _, _ = http_call("POST", server.url + "/v1/generate", json.dumps(body).encode(), 120.0)
        except OSError as exc:
            status = type(exc).__name__
        with lock:
            statuses[str(status)] += 1
            sent += 1
            if sent == cfg.soak_requests // 10:
                marks["after_first_tenth"] = rss_mb(pid)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(cfg.soak_concurrency) as pool:
        list(pool.map(send, bodies))
    marks["end"] = rss_mb(pid)
    base = marks.get("after_first_tenth", marks["start"])
    return {"sent": sent, "statuses": dict(statuses), "wall_s": round(time.perf_counter() - t0, 1),
            "rss_mb": {k: round(v, 1) for k, v in marks.items()},
            "rss_growth_after_first_tenth_pct": round(100 * (marks["end"] - base) / base, 2),
            "errors_5xx": sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500)}


# ---- 3. idle sockets ----

def raise_open_files(want: int) -> int:
    """This process's soft open-file limit raised towards `want` (up to the hard limit); the sockets it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, want + 256) if hard != resource.RLIM_INFINITY else want + 256
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return min(want, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 256)


def idle_sockets_phase(server: Server, cfg: ReliabilityConfig, header_timeout_s: float) -> dict:
    port = int(server.url.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    failed = Counter()
    t0 = time.perf_counter()
    for _ in range(cfg.idle_sockets):
        s = socket.socket()
        s.settimeout(2.0)
        try:
            s.connect(("127.0.0.1", port))
            held.append(s)
        except OSError as exc:
            s.close()
            failed[type(exc).__name__] += 1
            if sum(failed.values()) > 50:
                break
    opened_s = time.perf_counter() - t0
    during = probe_health(server.url, cfg.health_samples)
    time.sleep(header_timeout_s + 2.0)  # the server closes every silent connection by its head deadline
    closed = sum(1 for s in held if _closed_by_peer(s))
    after = probe_health(server.url, cfg.health_samples)
    for s in held:
        s.close()
    return {"asked": cfg.idle_sockets, "opened": len(held), "open_failures": dict(failed),
            "open_s": round(opened_s, 1), "healthz_while_open": during, "closed_by_server": closed,
            "healthz_after_head_deadline": after}


def _closed_by_peer(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


# ---- 4. decode burst ----

def decode_burst_phase(server: Server, cfg: ReliabilityConfig) -> dict:
    big = png_b64(np.random.default_rng(1).integers(0, 256, (cfg.burst_side, cfg.burst_side, 3), dtype=np.uint8))
    body = json.dumps({"prompt": "big upload", "steps": 2, "strength": 1.0, "init_image": big, "resize": True,
                       "height": 64, "width": 64}).encode()
    statuses: Counter = Counter()
    results: dict = {}
    lock = threading.Lock()

    def upload(_: int) -> None:
        try:
            status, _, _ = http_call("POST", server.url + "/v1/generate", body, 300.0)
        except OSError as exc:
            status = type(exc).__name__
        with lock:
            statuses[str(status)] += 1

    code = ("import json, sys; from benchmarks.reliability import health_ms; print('ready', flush=True); "
            f"sys.stdin.readline(); print(json.dumps(health_ms({server.url!r}, {cfg.burst_probe_samples}, "
            f"{cfg.burst_probe_interval_s})))")
    probe = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=REPO)  # a process of its own, started first: it probes from the burst's start
    assert probe.stdin is not None and probe.stdout is not None
    probe.stdout.readline()
    with ThreadPoolExecutor(cfg.burst_uploads) as pool:
        t0 = time.perf_counter()
        probe.stdin.write("go\n")
        probe.stdin.flush()
        futures = [pool.submit(upload, i) for i in range(cfg.burst_uploads)]
        for f in futures:
            f.result(timeout=600)
        results["burst_s"] = round(time.perf_counter() - t0, 2)
    out, _ = probe.communicate(timeout=300)
    results["probe_s"] = round(time.perf_counter() - t0, 2)
    results["healthz_during"] = json.loads(out) if probe.returncode == 0 else {"error": f"probe exit {probe.returncode}"}
    return {"uploads": cfg.burst_uploads, "upload_mb": round(len(body) / 2**20, 1), "statuses": dict(statuses),
            **results}


# ---- 5. overload ----

def overload_phase(server: Server, factor: float) -> dict:
    load = LoadConfig(requests_per_level=48, duration_cap_s=30.0, overload_requests=400)
    ids = itertools.count()
    samples, sent, wall_s = closed_loop(server.url, load, 8, ids)
    capacity = summarize("capacity_c8", samples, sent, wall_s)
    rate = factor * sent / wall_s  # requests per second at 10x what the closed loop got through
    samples, sent, wall_s = open_loop(server.url, load, rate, ids)
    return {"capacity_req_s": round(capacity["sent"] / capacity["wall_s"], 2), "factor": factor,
            "arrival_rate_req_s": round(rate, 1), **summarize("overload", samples, sent, wall_s)}


# ---- the run ----

def build_engines(dest: Path) -> Path:
    from engine.build import build_all
    from engine.config import BuildConfig

    build_all(BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", height=64, width=64, engine_dir=dest,
                          components=("clip", "unet", "vae_decoder", "vae_encoder")), progress=False)
    return dest


def run(cfg: ReliabilityConfig) -> dict:
    sockets = raise_open_files(cfg.idle_sockets)  # before the servers start: they inherit the limit
    cfg = replace(cfg, idle_sockets=sockets)
    doc: dict = {"benchmark": "reliability", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                 "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        work = Path(tmp)
        engine_dir = cfg.engine_dir or build_engines(work / "engines")
        header_timeout_s = 5.0
        phases = {  # name: (the server's extra flags, the phase)
            "schema": (("--max-images", "2"), lambda server: schema_phase(server, cfg, work)),
            "soak": ((), lambda server: soak_phase(server, cfg)),
            "idle_sockets": (("--limit-concurrency", str(sockets + 512), "--header-timeout-s", str(header_timeout_s)),
                             lambda server: idle_sockets_phase(server, cfg, header_timeout_s)),
            "decode_burst": ((), lambda server: decode_burst_phase(server, cfg)),
            "overload_10x": (("--max-batch", "8", "--max-queue", "8"), lambda server: overload_phase(server, 10.0)),
        }
        for name in cfg.phases:
            flags, phase = phases[name]
            with running_server(engine_dir, work, *flags) as server:
                doc[name] = phase(server)
    return doc


def parse_args(argv: list[str] | None) -> ReliabilityConfig:
    d = ReliabilityConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-dir", type=Path, default=d.engine_dir)
    for name in ("schema_examples", "soak_requests", "soak_concurrency", "idle_sockets", "health_samples",
                 "burst_uploads", "burst_side", "burst_probe_samples"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--soak-cap-s", type=float, default=d.soak_cap_s)
    p.add_argument("--phases", nargs="+", choices=d.phases, default=d.phases, help="the phases to run, in order")
    p.add_argument("--out", type=Path, default=d.out)
    a = p.parse_args(argv)
    return ReliabilityConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in ((k, getattr(a, k)) for k in asdict(d) if hasattr(a, k))})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    doc = run(cfg)
    out = cfg.out or RESULTS / f"reliability-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    if out.is_dir():
        out = out / f"reliability-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    write_json(out, doc)
    brief = {k: doc[k] for k in ("soak", "idle_sockets", "decode_burst", "overload_10x") if k in doc}
    print(json.dumps({"schema_exit_code": doc.get("schema", {}).get("exit_code"), **brief}, indent=2)[:6000])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
