"""Published figures of other engines: drawn as reference lines only on the device they were measured on.

These are not our measurements and are never mixed into our tables; the report lists them apart, with
their source, and only when the run's device name contains `device`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Anchor:
    device: str  # substring of the GPU name the figure was measured on
    what: str
    model: str
    size: int
    metric: str  # our metric it compares with
    value: float
    unit: str
    source: str


ANCHORS = (
    Anchor("H100", "diffusers eager, fp16, batch 1 + CFG", "sd15", 512, "unet_its", 54.5, "it/s",
           "stable-fast README"),
    Anchor("H100", "torch.compile, fp16, batch 1 + CFG", "sd15", 512, "unet_its", 66.0, "it/s", "stable-fast README"),
    Anchor("H100", "stable-fast, fp16, batch 1 + CFG", "sd15", 512, "unet_its", 104.6, "it/s", "stable-fast README"),
    Anchor("H100", "ONNX Runtime CUDA EP (Optimum), 50 steps", "sd15", 512, "e2e_ms_p50", 572.0, "ms",
           "ONNX Runtime SD benchmarks"),
    Anchor("A100", "TensorRT 9 static shapes + CUDA graph, 50 steps", "sd15", 512, "e2e_ms_p50", 819.0, "ms",
           "fal benchmark"),
)


def anchors_for(device: str) -> list[Anchor]:
    """The anchors measured on this device (none on a CPU)."""
    return [a for a in ANCHORS if a.device.lower() in device.lower()]
