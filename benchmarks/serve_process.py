"""`python -m engine.serve` as a subprocess on a free loopback port: started, waited for, stopped with SIGTERM.

Shared by the load test (benchmarks/serve_load.py) and the server tests (through tests/helpers.py).
"""
from __future__ import annotations

import contextlib
import http.client as http_client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, data: bytes | None, timeout: float,
         content_type: str = "application/json") -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers with lower-case names) of one request; HTTP error statuses are answers."""
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, err.read(), {k.lower(): v for k, v in err.headers.items()}


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path
    flags: tuple[str, ...] = ()
    exit_code: int | None = None  # once stopped
    info: dict = field(default_factory=dict)  # /readyz's answer

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes, dict[str, str]]:
        return http("GET", self.url + path, None, timeout)

    def post(self, path: str, body: dict | bytes, timeout: float = 120.0,
             content_type: str = "application/json") -> tuple[int, bytes, dict[str, str]]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return http("POST", self.url + path, data, timeout, content_type)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.output()}")
        with contextlib.suppress(OSError, http_client.HTTPException):
            status, payload, _ = server.get("/readyz", 2.0)
            if status == 200:
                server.info = json.loads(payload)
                return
        time.sleep(0.1)
    raise TimeoutError(f"server not ready after {timeout} s:\n{server.output()}")


@contextlib.contextmanager
def running_server(engine_dir: Path, log_dir: Path, *flags: str, ready: bool = True,
                   ready_timeout: float = READY_TIMEOUT_S) -> Iterator[Server]:
    """`python -m engine.serve --engine-dir ENGINE_DIR FLAGS` on a free loopback port; SIGTERM at the end
    (then the drain; a server that hangs past STOP_TIMEOUT_S is killed, and its exit code says so)."""
    port = free_port()
    log = Path(log_dir) / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "engine.serve", "--engine-dir", str(engine_dir), "--host", "127.0.0.1",
           "--port", str(port), *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(proc, f"http://127.0.0.1:{port}", log, tuple(flags))
    try:
        if ready:
            wait_ready(server, ready_timeout)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.exit_code = proc.returncode
