"""PyTorch backend: the reference modules themselves, eager or compiled, on CPU or CUDA, fp32 or fp16.

On CUDA in fp16 the attention runs our fused kernel when it is built (kernels/), and the pipeline
can capture the whole denoise step in a CUDA graph (runners are graph-safe: no host syncs).
The artifact is a copy of the component's model sub-folder (config + safetensors weights), so the
engine directory runs without the source model; any batch and size runs.

The fast path (`python -m engine.build --backend torch --compile`): fp16 on CUDA, our attention op, the
UNet through `torch.compile` (inductor's default mode: no CUDA graphs of its own, since the pipeline
captures the whole step; channels_last weights on CUDA, where convolutions prefer NHWC), and the
whole-step CUDA graph. The first call of each shape compiles (the step graph's warm-up step does it,
before capture).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from engine.backends.cpu import check_bf16
from engine.config import BuildPlan
from export import attention, control, feature_cache
from export.specs import ComponentSpec, Dims, precision_torch_dtype

WEIGHT_SUFFIXES = (".json", ".safetensors")


def _resolve_device(device: str) -> str:
    """auto -> cuda where torch sees a GPU, else cpu; ValueError for a CUDA device this torch cannot use (a CPU
    build of torch, or no GPU), before anything is built for it."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch {torch.__version__} sees no GPU"
        raise ValueError(f"device {device!r}: {build}; build with --device cpu (or auto), or install a CUDA torch "
                         "on a machine with a GPU")
    return device


def compile_module(module: torch.nn.Module, channels_last: bool = False) -> Callable[..., Any]:
    """`module` through torch.compile (inductor, default mode), its 4-d weights channels_last when asked.
    The parameters stay the module's own (compiled code reads them at each call), so LoRA swaps reach it."""
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return torch.compile(module)


class TorchRunner:
    graph_safe = True

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, device: str, attention_impl: str,
                 compile: bool = False):
        self.spec = spec
        self.module = module
        self.device = torch.device(device)
        self.dtype = next(module.parameters()).dtype
        self.attention_impl = attention_impl
        attention.set_eager(module, attention_impl)  # this module's processors (no process-global mode)
        self.compiled = compile
        # what a call runs: the module, or its compiled form (self.module stays the module, for LoRA swaps)
        self._forward: Callable[..., Any] = (
            compile_module(module, channels_last=self.device.type == "cuda") if compile else module)
        self._applied: Any = None  # engine.lora.AppliedLora while adapters are merged in

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        args = {t.name: inputs[t.name].to(self.device, self.dtype if t.dtype == "model" else None)
                for t in self.spec.inputs}
        out = self._forward(**feature_cache.pack(control.pack(args)))  # residuals, a feature cache: tuples
        outs = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.spec.output_names, outs, strict=True))

    def _sub_model(self) -> torch.nn.Module:
        assert self.module is not None, "runner closed"
        return next(iter(self.module.children()))  # the wrapper's diffusers / transformers model

    def base_weights(self) -> Mapping[str, torch.Tensor]:
        """The sub-model's parameters as loaded (before any adapter)."""
        if self._applied is not None:
            self._applied.unapply()
            self._applied = None
        return dict(self._sub_model().named_parameters())

    def set_weights(self, merged: Mapping[str, torch.Tensor] | None) -> None:
        """Swap `merged` in (sub-model parameter names), or put the loaded weights back (None), bit for bit."""
        from engine.lora import AppliedLora

        if self._applied is not None:
            self._applied.unapply()
            self._applied = None
        if merged:
            self._applied = AppliedLora()
            self._applied.swap(self._sub_model(), {n: t.to(self.device) for n, t in merged.items()})

    def close(self) -> None:
        self.module = None
        self._applied = None


class TorchBackend:
    name = "torch"
    needs_onnx = False
    static_shapes = False
    precisions = ("fp32", "fp16", "bf16")  # bf16: on a CPU only with avx512_bf16 / AMX (engine/backends/cpu.py)

    def version(self) -> str:
        return torch.__version__

    def resolve_device(self, device: str) -> str:
        return _resolve_device(device)

    def fingerprint(self, plan: BuildPlan) -> dict[str, Any]:
        compiled = {"compile": True} if plan.compile else {}  # absent when off: earlier keys stay valid
        if plan.precision == "bf16" and not plan.device.startswith("cuda"):
            check_bf16("torch")
        return {"torch": self.version(), "device": plan.device, **compiled}

    def default_precision(self, device: str) -> str:
        return "fp16" if device.startswith("cuda") else "fp32"

    def default_attention(self) -> str:
        return "decomposed"  # unused: no ONNX; recorded for the manifest

    def build(self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, plan: BuildPlan,
              source: Path) -> dict[str, Any]:
        sub = source / spec.model_folder
        (out_dir / spec.model_folder).mkdir()
        for f in sorted(p for p in sub.iterdir() if p.suffix in WEIGHT_SUFFIXES):
            shutil.copyfile(f, out_dir / spec.model_folder / f.name)
        shutil.copyfile(source / "model_index.json", out_dir / "model_index.json")  # the family, for load_component
        return {"device": plan.device, "precision": plan.precision,
                "compile": plan.compile and spec.per_step}  # --compile: what runs every step

    def load(self, spec: ComponentSpec, art_dir: Path, manifest: dict[str, Any], device: str) -> TorchRunner:
        from export.models import load_component

        device = manifest.get("device", "cpu") if device == "auto" else device
        precision = manifest["precision"]
        if precision == "bf16" and not device.startswith("cuda"):
            check_bf16("torch")  # an engine dir moved to a CPU without native bf16
        dtype = precision_torch_dtype(precision)  # weights and compute
        module = load_component(art_dir, spec.name, dtype, device, family=feature_cache.family_for(spec, art_dir))
        impl = "kernel" if device.startswith("cuda") and precision == "fp16" and _kernel_available() else "sdpa"
        return TorchRunner(spec, module, device, impl, compile=bool(manifest.get("compile")))


def _kernel_available() -> bool:
    import kernels

    return bool(getattr(kernels, "is_available", lambda: False)())


BACKEND = TorchBackend()
