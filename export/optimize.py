"""Facts about exported graphs: the external-data threshold (read by export/onnx_export.py).

The clean-up after export (shape folding that leaves weights alone) is export/lean.py's `optimize`.
"""
from __future__ import annotations

# Graphs whose weights pass this keep them as external data (`model.onnx.data`), written one tensor at a time:
# embedding them would hold a second in-memory copy in the serialised proto (and protobuf stops at 2 GB). 0: every
# graph does, so that ONNX Runtime can replace any weight as the graph loads (a LoRA swap needs external data).
EXTERNAL_DATA_LIMIT = 0
