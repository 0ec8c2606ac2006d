"""Test helper: wrap a real runner to count its calls or change its outputs, forwarding everything else."""
from __future__ import annotations

from typing import Callable


class Wrapped:
    """Behaves as `runner` (attributes, graph_safe, close) but calls `call(runner, **inputs)` instead."""

    def __init__(self, runner, call: Callable | None = None, graph_safe: bool | None = None):
        self.runner, self.calls = runner, []
        self._call = call or (lambda r, **inputs: r(**inputs))
        self._graph_safe = graph_safe

    @property
    def graph_safe(self) -> bool:
        return self.runner.graph_safe if self._graph_safe is None else self._graph_safe

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, **inputs):
        self.calls.append({k: tuple(v.shape) for k, v in inputs.items()})
        return self._call(self.runner, **inputs)
