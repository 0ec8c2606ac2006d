"""engine.graphs.StepGraphCache on CPU: bounded, least recently used first, failed captures cached as None.

Capture itself needs CUDA (tests/test_continuous_graphs.py and tests/test_gpu_pipeline.py capture real
steps); here try_capture is the real one on CPU buffers (None, the step never runs) or a counting fake."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from engine import graphs


def _buffers() -> graphs.Buffers:
    return {"idx": torch.zeros((), dtype=torch.int64), "latents": torch.zeros(1, 4, 8, 8),
            "state": torch.zeros(1, 4, 8, 8)}


def _never(b: graphs.Buffers) -> tuple[torch.Tensor, torch.Tensor]:
    raise AssertionError("the step must not run while a cache looks a key up")


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """try_capture replaced by a fake that records each key's capture and returns a stand-in graph."""
    calls: list[object] = []

    def fake(step: graphs.StepFn, buffers: graphs.Buffers) -> object:
        calls.append(buffers["key"])
        return SimpleNamespace(key=buffers["key"])

    monkeypatch.setattr(graphs, "try_capture", fake)
    return calls


def _get(cache: graphs.StepGraphCache, key: str) -> object:
    return cache.get_or_capture(key, _never, {"key": key})  # type: ignore[dict-item]  # the fake reads the key


def test_cpu_buffers_cache_none_without_running_or_warning():
    cache = graphs.StepGraphCache(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get_or_capture(("a", 1), _never, _buffers()) is None
        assert cache.get_or_capture(("a", 1), _never, _buffers()) is None
    assert len(cache) == 1 and ("a", 1) in cache and cache.values() == [None]


def test_one_capture_per_key_then_hits(captured: list[object]):
    cache = graphs.StepGraphCache(4)
    first = _get(cache, "a")
    assert _get(cache, "a") is first and _get(cache, "b") is not first
    assert captured == ["a", "b"] and len(cache) == 2


def test_least_recently_used_goes_first(captured: list[object]):
    cache = graphs.StepGraphCache(2)
    _get(cache, "a")
    _get(cache, "b")
    _get(cache, "a")  # a is now the most recent
    _get(cache, "c")  # full: b goes
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    _get(cache, "b")  # captured again after its eviction
    assert captured == ["a", "b", "c", "b"] and "a" not in cache


def test_clear_drops_every_graph(captured: list[object]):
    cache = graphs.StepGraphCache(3)
    for key in "ab":
        _get(cache, key)
    cache.clear()
    assert len(cache) == 0 and not cache and cache.values() == []
    _get(cache, "a")
    assert captured == ["a", "b", "a"]


def test_failed_capture_warns_once_per_key(monkeypatch: pytest.MonkeyPatch):
    """A capture that fails (the real try_capture, its StepGraph refusing) is cached as None: warned once."""
    tries: list[int] = []

    def refuse(step: graphs.StepFn, buffers: graphs.Buffers) -> graphs.StepGraph:
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "StepGraph", refuse)
    on_gpu = {"latents": SimpleNamespace(is_cuda=True)}  # what try_capture checks before capturing
    cache = graphs.StepGraphCache(2)
    with pytest.warns(UserWarning, match="capture of the denoise step failed") as seen:
        for key in ("a", "a", "b", "a", "b"):
            assert cache.get_or_capture(key, _never, on_gpu) is None  # type: ignore[arg-type]
    assert len(seen) == 2 and len(tries) == 2 and cache.values() == [None, None]


def test_max_graphs_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        graphs.StepGraphCache(0)
