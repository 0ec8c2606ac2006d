"""The backend protocol: every backend builds artifacts for one component and loads a runner.

A runner takes and returns torch tensors keyed by the ComponentSpec's tensor names, on the runner's
device, so the pipeline never sees a backend type. Backends are imported lazily by name.

The runner contract (what the pipeline relies on):
- `__call__(**inputs)` returns {output name: tensor}. Outputs are valid **until the next call on the
  same runner**: TensorRT returns views of static buffers that the next call overwrites, ONNX Runtime
  and torch return fresh tensors. A caller copies what it keeps across calls.
- `graph_safe`: True when a call enqueues only stream-ordered device work with no host sync, so the
  denoise step that calls it can be captured in a CUDA graph and replayed.
- `base_weights()` / `set_weights(merged)`: the weights as built, by ONNX initializer name, and swapping some of
  them in place (LoRA merges: engine/lora.py); `set_weights(None)` puts the built weights back exactly. A runner
  that cannot swap raises ValueError naming what it would need (TensorRT: a refittable engine).
- `close()`: release sessions, engines and graphs; the runner is unusable afterwards.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.config import BuildPlan
from export.specs import ComponentSpec, Dims

BACKEND_MODULES = {
    "torch": "engine.backends.torch_backend",
    "onnxruntime": "engine.backends.ort_backend",
    "tensorrt": "engine.backends.tensorrt",
    "openvino": "engine.backends.openvino_backend",
}


class Runner(Protocol):
    spec: ComponentSpec
    device: torch.device

    @property
    def graph_safe(self) -> bool: ...

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def base_weights(self) -> Mapping[str, torch.Tensor]: ...

    def set_weights(self, merged: Mapping[str, torch.Tensor] | None) -> None: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str
    needs_onnx: bool  # False: builds straight from the torch model (the torch backend)
    static_shapes: bool  # True: engines accept only their built profile (TensorRT); else any exported shape
    precisions: tuple[str, ...]  # what --precision may be with this backend (checked once, in build's plan step)

    def version(self) -> str: ...

    def resolve_device(self, device: str) -> str:
        """'auto' -> the device this backend would run on here."""
        ...

    def default_precision(self, device: str) -> str: ...

    def default_attention(self) -> str: ...

    def fingerprint(self, plan: BuildPlan) -> dict[str, Any]:
        """What besides the ONNX shapes the artifact: backend version, device arch, build options."""
        ...

    def build(self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, plan: BuildPlan,
              source: Path) -> dict[str, Any]:
        """Write the artifact files into out_dir (a fresh temp dir; `source` is the model folder, for
        backends that package weights); return extra manifest fields. The artifact must be
        self-contained: `load` never reads `source`."""
        ...

    def load(self, spec: ComponentSpec, art_dir: Path, manifest: dict[str, Any], device: str) -> Runner: ...


def get_backend(name: str) -> Backend:
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name]).BACKEND
