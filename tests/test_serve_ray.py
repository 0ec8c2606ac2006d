"""The server app on Ray Serve (engine.server.ray_app): local Ray, CPU replicas of `tiny`, real HTTP on loopback.

`python -m engine.serve --ray` serves until SIGTERM and finishes what it accepted; requests spread over both
replicas (each response names its replica in X-Replica); the same seed gives the same pixels whichever replica ran
it; Ray's own router backpressure answers 429 with Retry-After; replicas run the app's lifespan (load, warm-up,
drain); the Serve config file for `serve deploy` / KubeRay names a builder that builds.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from engine.server.config import ServeConfig  # noqa: E402
from engine.server.ray_app import APP_NAME, DEPLOYMENT_NAME, app_builder, build_app, deployment_options  # noqa: E402
from tests.helpers import free_port, http, max_diff, png_pixels, running_server  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from test clusters (nor its attempt offline)

CONFIG_YAML = Path(__file__).resolve().parents[1] / "engine" / "server" / "serve_config.yaml"
BODY = {"prompt": "a lighthouse at dusk", "steps": 4, "seed": 1234, "height": 64, "width": 64}


def header(headers: dict, name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def generate(url: str, body: dict = BODY) -> tuple[int, bytes, dict]:
    return http("POST", url + "/v1/generate", json.dumps(body).encode(), 120.0)


def pixels(response_body: bytes) -> np.ndarray:
    return png_pixels(json.loads(response_body)["images"][0]["b64_png"])


# The CLI test comes first: it starts its own Ray (in the server process) before the module's Ray below exists.
def test_cli_serves_on_ray_until_sigterm_and_finishes_accepted_requests(ort_engines, tmp_path, monkeypatch):
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # the server's Ray keeps its session here, not /tmp/ray
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    try:
        _cli_until_sigterm(ort_engines, tmp_path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cli_until_sigterm(ort_engines: Path, tmp_path: Path) -> None:
    with running_server(ort_engines, tmp_path, "--ray", "--replicas", "1", "--cpus-per-replica", "1",
                        "--max-batch", "2") as server:
        status, body, headers = server.post("/v1/generate", BODY)
        assert status == 200, body[:300]
        assert header(headers, "X-Replica")
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(server.post, "/v1/generate", {**BODY, "steps": 16, "seed": i}) for i in range(4)]
            time.sleep(0.3)  # all four are in Ray's hands (proxy or replica) by now
            server.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [s for s, _, _ in answers] == [200] * 4, [b[:300] for _, b, _ in answers]
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
        assert "Traceback" not in server.output(), server.output()[-3000:]


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray (2 CPUs, no dashboard, its own temp dir) with Serve's proxy on a free loopback port."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp), log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", temp=temp)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def deploy(engine_dir: Path, **fields) -> None:
    config = ServeConfig(engine_dir=engine_dir, cpus_per_replica=1, **fields)
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")  # returns once every replica is ready


def replica_log_lines(temp: Path, text: str) -> list[str]:
    paths = {path.resolve() for path in temp.glob("session_*/logs/serve/replica_*.log")}  # session_latest: a link
    return [line for path in sorted(paths) for line in path.read_text(errors="replace").splitlines() if text in line]


def test_two_cpu_replicas_share_requests_and_agree_on_pixels(local_ray, ort_engines):
    url = local_ray.url
    # max_ongoing_requests=4: one replica holds at most 4 of the 12 concurrent requests, so both must serve
    deploy(ort_engines, replicas=2, max_ongoing_requests=4, max_batch=4, max_queue=16)
    # serve.run returned: both replicas ran the app's lifespan (engines loaded, warm-up done) before taking traffic
    assert len(replica_log_lines(local_ray.temp, "ready: model tiny")) == 2
    status, body, _ = http("GET", url + "/readyz", None, 10.0)
    assert status == 200, body
    status, body, headers = http("GET", url + "/v1/info", None, 10.0)
    assert status == 200 and json.loads(body)["max_batch"] == 4
    assert header(headers, "X-Replica")

    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda _: generate(url), range(12)))
    assert [s for s, _, _ in burst] == [200] * 12, [b[:300] for s, b, _ in burst if s != 200]
    replicas = [header(h, "X-Replica") for _, _, h in burst]
    assert None not in replicas
    assert len(set(replicas)) == 2, f"all 12 requests went to {set(replicas)}"
    # batched or alone, on either replica: the same image (batch invariance: <= 1/255)
    reference = pixels(burst[0][1])
    assert all(max_diff(pixels(b), reference) <= 1 for _, b, _ in burst)
    assert all(json.loads(b)["images"][0]["seed"] == 1234 for _, b, _ in burst)

    # one at a time (no batch-mates) until both replicas answered: the same seed gives identical pixels.
    # Bounded by count and by 25 s: Ray's router picks from its cached queue lengths, and an entry left stale by
    # the burst can steer every sequential request to one replica until it expires (10 s by default).
    alone: dict[str, np.ndarray] = {}
    deadline, sent = time.monotonic() + 25.0, 0
    while len(alone) < 2 and sent < 200 and time.monotonic() < deadline:
        status, body, headers = generate(url)
        sent += 1
        assert status == 200, body[:300]
        assert json.loads(body)["batch_images"] == 1
        alone.setdefault(header(headers, "X-Replica"), pixels(body))
    assert len(alone) == 2, f"{sent} sequential requests over 25 s all went to one replica"
    first, second = alone.values()
    assert np.array_equal(first, second)


def test_ray_router_backpressure_is_429_with_retry_after(local_ray, ort_engines):
    """One replica taking one request at a time and a router queue of 1: a burst overflows Ray's router queue (not
    the replica's, which never holds more than one request), and Ray answers those 429 with Retry-After."""
    deploy(ort_engines, replicas=1, max_ongoing_requests=1, max_queue=1, max_batch=1)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: generate(local_ray.url, {**BODY, "steps": 8}), range(8)))
    statuses = sorted(s for s, _, _ in answers)
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses, statuses
    for status, body, headers in answers:
        if status == 429:
            assert int(header(headers, "Retry-After")) >= 1
            assert b"backpressure" in body  # Ray's router said it, not the replica's batcher

    # removing the application stops the replica through the app's lifespan shutdown (drain)
    drained = len(replica_log_lines(local_ray.temp, "drained and stopped"))
    serve.delete(APP_NAME)
    assert len(replica_log_lines(local_ray.temp, "drained and stopped")) == drained + 1


def test_the_http_proxy_listens_only_where_host_says(local_ray):
    """Ray Serve's HTTP proxy, the one port that answers our API, is bound to the loopback address asked for, not
    to every interface. (Ray's own gRPC ports, GCS, raylet and actor workers, listen on all interfaces in this Ray
    whatever the node IP; measured with `ss`, they are Ray's to bind: see the README.)"""
    import psutil

    port = int(local_ray.url.rsplit(":", 1)[1])
    listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, listening


def test_serve_config_file_names_a_builder_that_builds(tmp_path):
    import yaml
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG_YAML.read_text()))
    [app] = schema.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder is app_builder
    assert len(inspect.signature(builder).parameters) == 1  # what Serve requires of an application builder
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    assert set(app.args) <= fields, set(app.args) - fields
    built = builder({**app.args, "engine_dir": str(tmp_path)})
    assert isinstance(built, Application)
    with pytest.raises(ValueError, match="no_such_field"):
        builder({"no_such_field": 1})


def test_deployment_options_follow_the_config():
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    fixed = deployment_options(ServeConfig(replicas=3, gpus_per_replica=1, max_ongoing_requests=16, max_queue=40))
    assert fixed["name"] == DEPLOYMENT_NAME
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert fixed["max_ongoing_requests"] == 16 and fixed["max_queued_requests"] == 40
    assert fixed["backpressure_config"]["status_code"] == 429
    scaled = deployment_options(ServeConfig(replicas=1, max_replicas=4))
    assert "num_replicas" not in scaled
    autoscaling = AutoscalingConfig(**scaled["autoscaling_config"])  # Ray's own validation
    assert (autoscaling.min_replicas, autoscaling.initial_replicas, autoscaling.max_replicas) == (1, 1, 4)
    assert BackpressureConfig(**fixed["backpressure_config"]).retry_after_s >= 1
    build_app(ServeConfig(replicas=1, max_replicas=4))  # Serve accepts every option (.options validates them)
    with pytest.raises(ValueError, match="max_replicas"):
        build_app(ServeConfig(replicas=3, max_replicas=2))
