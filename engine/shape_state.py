"""Per-shape state a backend keeps for the life of a compiled model, bounded.

OpenVINO's CPU plugin keeps ~4 MB (tiny) per distinct input shape for as long as the compiled model lives: not
returned by malloc_trim, not bounded by CPU_RUNTIME_CACHE_CAPACITY (0 left ~1 MB per shape and cost 20 % when sizes
alternate), freed only by compiling again. benchmarks/shape_memory.py on tiny (320 requests over 64 sizes): RSS
+239 MB without this bound, +67-89 MB with it. A server answering random sizes grew without end. A runner that keeps such state is a `ShapeKeeper`; before a batch,
when one holds more than MAX_SHAPES shapes, each such runner forgets them (its compiled models dropped, the built
weights compiled again) and the pipeline merges its LoRA adapters again (engine/pipeline.py `use_adapters`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

MAX_SHAPES = 16  # distinct input shapes a compiled model may keep state for (~64 MB on tiny, OpenVINO)


@runtime_checkable
class ShapeKeeper(Protocol):
    @property
    def kept_shapes(self) -> int: ...  # distinct input shapes seen since the runner last compiled

    def forget_shapes(self) -> None: ...  # compile the built weights again: every per-shape state dropped


def over_budget(runners: Mapping[str, object], limit: int = MAX_SHAPES) -> bool:
    """Whether any runner keeps state for more than `limit` input shapes."""
    return any(isinstance(r, ShapeKeeper) and r.kept_shapes > limit for r in runners.values())


def forget(runners: Mapping[str, object]) -> None:
    """Every shape-keeping runner back to its built weights, compiled again (the caller merges adapters again)."""
    for runner in runners.values():
        if isinstance(runner, ShapeKeeper):
            runner.forget_shapes()
