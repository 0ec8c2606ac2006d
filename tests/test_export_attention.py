"""export/attention.py: the emission mode and the eager implementation belong to one module's attention
processors, never to the process (a server warming one model up while serving another must be safe).
ONNX output of each mode: tests/test_export.py."""
from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import Attention

from export import attention


class _Model(torch.nn.Module):
    """A wrapper around two diffusers attention blocks, as the exporter's component wrappers hold a UNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn: list[Any] = [Attention(32, heads=2, dim_head=16) for _ in range(2)]  # diffusers' own types
        self.blocks = torch.nn.ModuleList(self.attn)
        for block in self.attn:
            block.set_processor(attention.EngineAttnProcessor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.attn:
            x = block(x)
        return x


def _processors(model: _Model) -> list[attention.EngineAttnProcessor]:
    return [block.processor for block in model.attn]


def test_emission_switches_one_module_and_puts_it_back():
    exporting, serving = _Model(), _Model()
    before = _processors(exporting)
    with attention.emission(exporting, "onnx") as module:
        assert module is exporting
        assert [p.mode for p in _processors(exporting)] == ["onnx", "onnx"]
        assert [p.mode for p in _processors(serving)] == [None, None]  # the other module stays eager
    assert _processors(exporting) == before and all(a is b for a, b in zip(_processors(exporting), before, strict=True))


def test_serving_while_another_module_exports_runs_eagerly():
    """A module in `emission` on one thread does not change what another module computes on another thread."""
    exporting, serving = _Model(), _Model()
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = serving(x)
    inside, leave = threading.Event(), threading.Event()

    def export_side() -> None:
        with attention.emission(exporting, "decomposed"):
            inside.set()
            leave.wait(timeout=30)

    worker = threading.Thread(target=export_side)
    worker.start()
    try:
        assert inside.wait(timeout=30)
        with torch.no_grad():
            got = serving(x)
        assert [p.mode for p in _processors(serving)] == [None, None]
    finally:
        leave.set()
        worker.join()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_set_eager_is_per_module_and_checked():
    a, b = _Model(), _Model()
    attention.set_eager(a, "kernel")
    assert [p.eager for p in _processors(a)] == ["kernel", "kernel"]
    assert [p.eager for p in _processors(b)] == ["sdpa", "sdpa"]
    with pytest.raises(ValueError, match="unknown eager attention 'flash'"):
        attention.set_eager(a, "flash")
    with pytest.raises(ValueError, match="unknown attention mode 'trt'"):
        with attention.emission(a, "trt"):
            pass
    with pytest.raises(ValueError, match="unknown attention mode"):
        attention.EngineAttnProcessor(mode="fused")


def test_kernel_choice_on_cpu_runs_sdpa():
    """eager="kernel" serves CUDA fp16/bf16 calls only; elsewhere the same numbers as SDPA."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 9, 64, generator=g) for _ in range(3))
    want = attention.attention(q, k, v, 4)
    torch.testing.assert_close(attention.attention(q, k, v, 4, eager="kernel"), want, rtol=0, atol=0)
    torch.testing.assert_close(attention.attention(q, k, v, 4, mode="decomposed"), want, rtol=1e-5, atol=1e-6)


def test_no_process_global_mode():
    assert not {"_mode", "_eager_impl", "eager_impl"} & set(vars(attention))
