"""ONNX Runtime backend: CPU execution provider, or CUDA EP with IO binding where installed.

The artifact is a copy of the optimized ONNX graph (a regular file, so `onnx.load` and other tools
accept its external data, and the engine directory can be moved or copied anywhere); the session is
created at load time with full graph optimizations. Any batch and size the graph was exported for runs.

LoRA: a session is made again with the merged weights as external initializers; a runner keeps its last few
sessions (engine.lora_cache.variants_limit(), the built one included) by the content of their merged weights, so
alternating between a few adapter sets makes each session once; `sessions_made` counts them.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import BuildPlan
from engine.lora import OnnxWeights
from engine.lora_cache import Lru, variants_limit, weights_key
from export.specs import ComponentSpec, Dims

MODEL_FILE = "model.onnx"


def _ort():
    import onnxruntime

    return onnxruntime


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if "CUDAExecutionProvider" in _ort().get_available_providers() and torch.cuda.is_available() else "cpu"


def _providers(device: str) -> list[str]:
    if device == "cuda":
        if "CUDAExecutionProvider" not in _ort().get_available_providers():
            raise RuntimeError("onnxruntime has no CUDA execution provider here: pip install onnxruntime-gpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner:
    """Runs one component's session; torch tensors in and out, on the session's device."""

    graph_safe = False  # ORT's own allocations and host work are not capturable in a CUDA graph

    def __init__(self, spec: ComponentSpec, path: Path, device: str, threads: int = 0):
        self.spec = spec
        self.path = path
        self.device = torch.device(device)
        self.threads = threads
        self._overrides: dict[str, Any] = {}  # initializer name -> OrtValue the session was made with
        self._weights: OnnxWeights | None = None  # the graph's own weights, read on first use
        self.sessions_made = 0  # InferenceSession()s: the first, then one per adapter set new to `variants`
        self.session: Any = self._session(self._overrides)  # None once closed
        # (session, the OrtValues it was made with: they must outlive it) by weights_key of the merged weights
        self.variants: Lru[str | None, tuple[Any, dict[str, Any]]] = Lru(max_entries=variants_limit())
        self.variants.put(None, (self.session, self._overrides))
        self.dtypes = {i.name: _onnx_type_to_torch(i.type) for i in self.session.get_inputs()}

    def _session(self, overrides: dict[str, Any]):
        """A session of the graph, `overrides` (initializer name -> OrtValue) replacing some of its weights."""
        ort = _ort()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if overrides:  # replace the graph's initializers as it is loaded, before any optimization folds them
            opts.add_external_initializers(list(overrides), list(overrides.values()))
        self.sessions_made += 1
        return ort.InferenceSession(str(self.path), sess_options=opts, providers=_providers(str(self.device)))

    def base_weights(self) -> Mapping[str, torch.Tensor]:
        """The graph's own weights by the sub-model's parameter names (read on access, external data mapped)."""
        if self._weights is None:  # read once: every switch needs the names and some base tensors
            self._weights = OnnxWeights(self.path)
            if any(n.endswith(".T_quantized") for n in self._weights):  # engine/backends/ort_int8.py's names
                self._weights = None
                raise ValueError(f"{self.path}: an int8 (quantized) graph: LoRA adapters cannot be merged into it; "
                                 "build with --precision fp32 for LoRA")
        return self._weights

    def set_weights(self, merged: Mapping[str, torch.Tensor] | None) -> None:
        """Recreate the session with `merged` (sub-model parameter names) replacing the graph's initializers,
        or with the graph's own (None); a session of the same weights kept in `variants` is taken instead. No
        re-export, no rebuild: the ONNX file is untouched."""
        weights = self.base_weights()
        assert isinstance(weights, OnnxWeights)
        inline = [n for n in (merged or {}) if not weights.external(n)]
        if inline:
            raise ValueError(f"{self.path}: weight {inline[0]!r} is stored inside the graph, not as external data, "
                             "so ONNX Runtime cannot replace it; rebuild with python -m engine.build --force-rebuild")
        key = weights_key(merged) if merged else None
        variant = self.variants.get(key)
        if variant is None:
            self.variants.reserve()
            prefix = weights.prefix
            overrides = {prefix + name: _ort().OrtValue.ortvalue_from_numpy(t.detach().cpu().contiguous().numpy())
                         for name, t in (merged or {}).items()}
            variant = (self._session(overrides), overrides)  # a failure leaves the runner as it was
            self.variants.put(key, variant)
        self.session, self._overrides = variant

    def close(self) -> None:
        self.session = None  # the session frees its arena when dropped (with the kept variants)
        self._overrides, self._weights = {}, None
        self.variants.clear()

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {n: inputs[n].to(self.dtypes[n]).contiguous() for n in self.spec.input_names}
        if self.device.type == "cuda":
            return self._run_cuda(feeds)
        outs = self.session.run(self.spec.output_names, {n: t.numpy() for n, t in feeds.items()})
        return {n: torch.from_numpy(o) for n, o in zip(self.spec.output_names, outs, strict=True)}

    def _run_cuda(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        idx = self.device.index or 0
        for n, t in feeds.items():
            binding.bind_input(n, "cuda", idx, _torch_to_np(t.dtype), tuple(t.shape), t.data_ptr())
        for n in self.spec.output_names:
            binding.bind_output(n, "cuda", idx)
        self.session.run_with_iobinding(binding)
        return {n: _ortvalue_to_torch(v) for n, v in zip(self.spec.output_names, binding.get_outputs(), strict=True)}


def _onnx_type_to_torch(t: str) -> torch.dtype:
    return {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int32)": torch.int32,
            "tensor(int64)": torch.int64}[t]


def _torch_to_np(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32}[dtype]


def _ortvalue_to_torch(v) -> torch.Tensor:
    # DLPack keeps the output on the GPU, no host copy
    return torch.utils.dlpack.from_dlpack(v.to_dlpack())


class OrtBackend:
    name = "onnxruntime"
    needs_onnx = True
    static_shapes = False
    precisions = ("fp32", "fp16", "int8")  # int8: the fp32 graph's weight MatMuls quantized (ort_int8.py)

    def version(self) -> str:
        return _ort().__version__

    def resolve_device(self, device: str) -> str:
        return _resolve_device(device)

    def fingerprint(self, plan: BuildPlan) -> dict[str, Any]:
        return {"onnxruntime": self.version(), "device": plan.device}

    def default_precision(self, device: str) -> str:
        return "fp16" if device.startswith("cuda") else "fp32"

    def default_attention(self) -> str:
        return "decomposed"

    def build(self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, plan: BuildPlan,
              source: Path) -> dict[str, Any]:
        assert onnx_path is not None
        extra: dict[str, Any] = {}
        if plan.precision == "int8":
            from engine.backends.ort_int8 import quantize_matmul_int8

            extra = quantize_matmul_int8(onnx_path, out_dir / MODEL_FILE)
        else:
            for src in sorted(onnx_path.parent.glob(onnx_path.name + "*")):
                shutil.copyfile(src, out_dir / src.name)  # the export cache names it model.onnx too
        OrtRunner(spec, out_dir / MODEL_FILE, plan.device)  # fails here, not at generate time, if ORT rejects it
        return {"device": plan.device, **extra}

    def load(self, spec: ComponentSpec, art_dir: Path, manifest: dict[str, Any], device: str) -> OrtRunner:
        return OrtRunner(spec, art_dir / MODEL_FILE, manifest.get("device", "cpu") if device == "auto" else device)


BACKEND = OrtBackend()
