"""A real `python -m engine.serve` on loopback for the server tests: started, waited for, stopped."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes, dict]:
        return http("GET", self.url + path, None, timeout)

    def post(self, path: str, body: dict | bytes, timeout: float = 120.0,
             content_type: str = "application/json") -> tuple[int, bytes, dict]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return http("POST", self.url + path, data, timeout, content_type)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def http(method: str, url: str, data: bytes | None, timeout: float,
         content_type: str = "application/json") -> tuple[int, bytes, dict]:
    """(status, body, headers with lower-case names) of one request; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, err.read(), {k.lower(): v for k, v in err.headers.items()}


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            status, _, _ = http("GET", url + "/readyz", None, 2.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not ready after {timeout} s:\n{log.read_text(errors='replace')}")


@contextlib.contextmanager
def running_server(engine_dir: Path, log_dir: Path, *flags: str, ready: bool = True):
    """`python -m engine.serve --engine-dir ENGINE_DIR FLAGS` on a free loopback port, stopped with SIGTERM."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "engine.serve", "--engine-dir", str(engine_dir), "--host", "127.0.0.1",
           "--port", str(port), *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        if ready:
            wait_ready(server.url, proc, log)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
