"""The backend protocol: every backend builds artifacts for one component and loads a runner.

A runner takes and returns torch tensors keyed by the ComponentSpec's tensor names, on the runner's
device, so the pipeline never sees a backend type. Backends are imported lazily by name.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.config import BuildConfig, Profile
from export.specs import ComponentSpec, Dims

BACKEND_MODULES = {
    "torch": "engine.backends.torch_backend",
    "onnxruntime": "engine.backends.ort_backend",
    "tensorrt": "engine.backends.trt_backend",
}


class Runner(Protocol):
    spec: ComponentSpec
    device: torch.device

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


class Backend(Protocol):
    name: str
    needs_onnx: bool  # False: builds straight from the torch model (the torch backend)

    def version(self) -> str: ...

    def fingerprint(self, cfg: BuildConfig) -> dict[str, Any]:
        """What besides the ONNX shapes the artifact: backend version, device arch, build options."""
        ...

    def default_precision(self, cfg: BuildConfig) -> str: ...

    def default_attention(self) -> str: ...

    def build(
        self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, profile: Profile, cfg: BuildConfig
    ) -> dict[str, Any]:
        """Write the artifact files into out_dir (a fresh temp dir); return extra manifest fields."""
        ...

    def load(self, spec: ComponentSpec, art_dir: Path, manifest: dict[str, Any], device: str) -> Runner: ...


def get_backend(name: str) -> Backend:
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name]).BACKEND
