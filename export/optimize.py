"""Facts about exported graphs shared by export, build and tests: the external-data threshold and op counts.

The clean-up after export (shape folding that leaves weights alone) is export/lean.py's `optimize`.
"""
from __future__ import annotations

from pathlib import Path

import onnx

# Graphs whose weights pass this keep them as external data (`model.onnx.data`), written one tensor at a time:
# embedding them would hold a second in-memory copy in the serialised proto (and protobuf stops at 2 GB). 0: every
# graph does, so that ONNX Runtime can replace any weight as the graph loads (a LoRA swap needs external data).
EXTERNAL_DATA_LIMIT = 0


def count_ops(path: Path) -> dict[str, int]:
    """op_type (prefixed by its domain when custom) -> count, over the main graph."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts
