"""PyTorch backend: the reference modules themselves, eager on CPU or CUDA, fp32 or fp16.

On CUDA in fp16 the attention runs our fused kernel when it is built (kernels/), and the pipeline
can capture the whole denoise step in a CUDA graph (runners are graph-safe: no host syncs).
The artifact is only a manifest: weights are read from the model folder, keyed by their hash.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from engine.config import BuildConfig, Profile
from export.specs import ComponentSpec, Dims


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=2)
def _model(path: str, precision: str, device: str):
    from export.models import load_model

    return load_model(path, dtype=torch.float16 if precision == "fp16" else torch.float32, device=device)


class TorchRunner:
    graph_safe = True

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, device: str, attention_impl: str):
        self.spec = spec
        self.module = module
        self.device = torch.device(device)
        self.dtype = next(module.parameters()).dtype
        self.attention_impl = attention_impl

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        from export import attention

        args = {t.name: inputs[t.name].to(self.device, self.dtype if t.dtype == "model" else None)
                for t in self.spec.inputs}
        with attention.eager_impl(self.attention_impl):
            out = self.module(**args)
        outs = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.spec.output_names, outs, strict=True))


class TorchBackend:
    name = "torch"
    needs_onnx = False

    def version(self) -> str:
        return torch.__version__

    def fingerprint(self, cfg: BuildConfig) -> dict[str, Any]:
        return {"torch": self.version(), "device": _resolve_device(cfg.device)}

    def default_precision(self, cfg: BuildConfig) -> str:
        return "fp16" if _resolve_device(cfg.device) == "cuda" else "fp32"

    def default_attention(self) -> str:
        return "decomposed"  # unused: no ONNX; recorded for the manifest

    def build(self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, profile: Profile,
              cfg: BuildConfig) -> dict[str, Any]:
        return {"device": _resolve_device(cfg.device)}

    def load(self, spec: ComponentSpec, art_dir: Path, manifest: dict[str, Any], device: str) -> TorchRunner:
        from export.models import component_module

        device = manifest.get("device", "cpu") if device == "auto" else device
        precision = manifest["key_parts"]["precision"]
        model = _model(manifest["model_path"], precision, device)
        impl = "kernel" if device == "cuda" and precision == "fp16" and _kernel_available() else "sdpa"
        return TorchRunner(spec, component_module(model, spec.name), device, impl)


def _kernel_available() -> bool:
    import kernels

    return bool(getattr(kernels, "is_available", lambda: False)())


BACKEND = TorchBackend()
