"""A real `python -m engine.serve` on loopback for the server tests (the load test's launcher, shared)."""
from benchmarks.serve_process import Server, free_port, http, running_server, wait_ready

__all__ = ["Server", "free_port", "http", "running_server", "wait_ready"]
