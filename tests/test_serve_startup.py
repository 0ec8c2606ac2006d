"""How `python -m engine.serve` starts (issues 31 item 9 and 32 item 4): the port is bound before the engines load, so
/healthz answers and /readyz says "loading" meanwhile; what stops a start is one line on stderr and exit 2 (as
engine.generate), never a traceback: no engines, several models, a busy port (told before anything loads) and an
engine that does not load."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import free_port, http, running_server

START_TIMEOUT_S = 120


def serve(*args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.serve", "--host", "127.0.0.1", *args],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_exit_2(done: subprocess.CompletedProcess, *words: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_no_engines_is_one_line_and_exit_2(tmp_path):
    assert_one_line_exit_2(serve("--engine-dir", str(tmp_path / "none"), "--port", str(free_port())),
                           "no engines in", "python -m engine.build")


def test_several_models_is_one_line_naming_them(tmp_path):
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "build.json").write_text("{}")
    assert_one_line_exit_2(serve("--engine-dir", str(tmp_path), "--port", str(free_port())),
                           "several models", "alpha", "beta", "--model")


def test_a_busy_port_is_told_before_the_engines_load(ort_engines):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = serve("--engine-dir", str(ort_engines), "--port", str(port))
    assert_one_line_exit_2(done, f"cannot listen on 127.0.0.1:{port}")
    assert "cannot load" not in done.stderr and "loading" not in done.stderr  # nothing was loaded


def test_an_engine_that_does_not_load_is_one_line_and_exit_2(ort_engines, tmp_path):
    engine_dir = tmp_path / "engines"
    shutil.copytree(ort_engines, engine_dir)
    graphs = sorted((engine_dir / "tiny").rglob("*.onnx"))
    assert graphs, "no ONNX graph in the tiny engine dir"
    for graph in graphs:
        graph.write_bytes(b"not an onnx graph")
    assert_one_line_exit_2(serve("--engine-dir", str(engine_dir), "--port", str(free_port())),
                           "cannot load engines from")


def test_the_port_answers_while_loading_and_readyz_says_so_and_the_warm_up_is_not_counted(ort_engines, tmp_path):
    """Polled from before the process starts: the first answers come while the engines load (/readyz 503
    "loading", /healthz 200), then "ready". Before the fix the port refused connections until the load was done."""
    port = free_port()
    seen: list[tuple[str, int, str]] = []  # (route, status, readyz status)
    stop = threading.Event()

    def poll() -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                status, body, _ = http("GET", f"http://127.0.0.1:{port}/readyz", None, 2.0)
                seen.append(("readyz", status, json.loads(body).get("status", "")))
                if status == 200:
                    return
                health, _, _ = http("GET", f"http://127.0.0.1:{port}/healthz", None, 2.0)
                seen.append(("healthz", health, ""))
            except OSError:
                time.sleep(0.005)  # not listening yet

    poller = threading.Thread(target=poll)
    poller.start()
    cmd = [sys.executable, "-m", "engine.serve", "--engine-dir", str(ort_engines), "--host", "127.0.0.1",
           "--port", str(port)]
    log = Path(tmp_path) / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        poller.join(timeout=START_TIMEOUT_S)
        _, text, _ = http("GET", f"http://127.0.0.1:{port}/metrics", None, 10.0)
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=60)
    # ready means the warm-up generation ran; no client asked for it, so no metric counts it (they did)
    counts = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if line.startswith("sd_inference_"))
    for name in ("sd_inference_count_total", "sd_inference_exec_count_total", "sd_inference_batch_size_count"):
        assert float(counts[name]) == 0, (name, counts[name])
    readyz = [s for route, _, s in seen if route == "readyz"]
    assert readyz and readyz[0] == "loading", (readyz[:5], log.read_text()[-2000:])
    assert readyz[-1] == "ready", readyz[-5:]
    assert all(status == 200 for route, status, _ in seen if route == "healthz"), seen
    assert all(status == 503 for route, status, s in seen if route == "readyz" and s != "ready"), seen


def test_generation_while_loading_is_503_with_retry_after(ort_engines, tmp_path):
    with running_server(ort_engines, tmp_path, ready=False) as server:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                status, body, headers = server.post("/v1/generate", {"prompt": "x", "steps": 2})
                break
            except OSError:
                time.sleep(0.005)
        else:
            raise AssertionError("the port never answered")
        assert status == 503 and headers.get("retry-after"), (status, body)
        assert json.loads(body)["error"]["type"] == "unavailable"
