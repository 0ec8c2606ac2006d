"""TensorRT runtime: `TrtRunner` runs one engine behind the runner contract (engine/backends/base.py).

Loading (`load_runner`) refuses engines of another TensorRT / GPU arch / plugin PTX (`check_compat`). A runner
binds a USER_MANAGED execution context to the device's shared activation arena (engine.cuda.arena), owns
static I/O buffers sized for the profile's maximum, runs on one non-default cuda-python stream per device
(a torch ExternalStream) and replays the UNet as CUDA graphs per input shape (engine.graphs.GraphCache).
Without TensorRT the module imports; loading raises TensorRTUnavailable.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine import cuda, graphs
from engine.backends.tensorrt.build import (
    ENGINE_FILE,
    PluginUnavailable,
    current_environment,
    device_index,
    import_trt,
    register_attention_plugin,
    trt_logger,
)
from engine.backends.tensorrt.inspect import MANIFEST_KEY, REBUILD_HINT, check_compat
from engine.lora import OnnxWeights
from export.specs import ComponentSpec

if TYPE_CHECKING:
    import tensorrt as trt_t

log = logging.getLogger(__name__)

DEBUG_ENV = "SD_ENGINE_TRT_DEBUG"  # "1": check outputs for NaN/Inf after every call (host sync)
CUDA_GRAPH_ENV = "SD_ENGINE_TRT_CUDA_GRAPH"  # "0": never capture CUDA graphs
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


class EngineIncompatible(RuntimeError):
    """An engine on disk was built for another TensorRT version, GPU or plugin kernel."""


def check_input_shape(component: str, name: str, shape: tuple[int, ...], lo: tuple[int, ...],
                      hi: tuple[int, ...]) -> None:
    """ValueError naming the value and the built range when `shape` is outside [lo, hi]."""
    if len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
        return
    span = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi, strict=True))
    raise ValueError(
        f"{component} input {name!r} has shape {tuple(shape)} but the TensorRT engine was built for ({span}); "
        "rebuild with matching --batch-size/--height/--width or with --build-dynamic-shape"
    )


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    if trt_dtype_name not in _TORCH_DTYPES:
        raise ValueError(f"TensorRT data type {trt_dtype_name} has no torch equivalent here")
    return _TORCH_DTYPES[trt_dtype_name]


def _create_context(engine: trt_t.ICudaEngine) -> trt_t.IExecutionContext:
    trt = import_trt()
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    try:
        context = engine.create_execution_context(strategy)
    except TypeError:  # bindings that only take an IRuntimeConfig
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        context = engine.create_execution_context(config)
    if context is None:
        raise RuntimeError("TensorRT could not create an execution context (see the TensorRT log above)")
    return context


class TrtRunner:
    """One engine: __call__(**inputs) -> {output name: static output tensor} on the device; graph-safe
    (no host sync) unless debug. Outputs are views of static buffers, overwritten by the next call."""

    def __init__(self, spec: ComponentSpec, engine_path: Path, section: dict[str, Any], index: int):
        trt = import_trt()
        self.spec, self.device = spec, torch.device("cuda", index)
        cuda.set_device(index)
        self._runtime = trt.Runtime(trt_logger())  # must outlive the engine
        engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise EngineIncompatible(f"{engine_path}: TensorRT could not deserialize this engine. {REBUILD_HINT}")
        self._engine: trt_t.ICudaEngine = engine
        self._context = _create_context(engine)
        self._stream = cuda.shared_stream(index)
        self.torch_stream = torch.cuda.ExternalStream(self._stream.ptr, device=self.device)
        self.debug = os.environ.get(DEBUG_ENV, "") == "1"
        use_graph = spec.per_step and os.environ.get(CUDA_GRAPH_ENV, "1") != "0"
        self._graphs = graphs.GraphCache(self.torch_stream, f"TensorRT {spec.name}", enabled=use_graph)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        if missing := set(spec.input_names + spec.output_names) - set(names):
            raise EngineIncompatible(f"{spec.name} engine lacks tensors {sorted(missing)}. {REBUILD_HINT}")
        self._ranges = {n: self._profile_range(n, section) for n in self.input_names}
        self._buffers = self._allocate()
        self._views: dict[tuple, dict[str, torch.Tensor]] = {}
        self._current: tuple | None = None
        self._refitted: set[str] = set()  # weights (sub-model names) that hold adapter values now
        self._base: OnnxWeights | None = None  # the built weights, from the refit source ONNX, read on first use
        self.closed = False
        cuda.arena(index).attach(self, int(engine.device_memory_size_v2))

    @property
    def graph_safe(self) -> bool:
        return not self.debug  # the NaN check synchronizes with the host

    refit_source: Path | None = None  # the exported ONNX whose initializers the engine was built from

    def base_weights(self) -> Mapping[str, torch.Tensor]:
        """The built weights, by the sub-model's parameter names, from the ONNX the engine was built from."""
        if self._base is None:  # read once: every switch needs the names and some base tensors
            self._base = OnnxWeights(self._refit_onnx())
        return self._base

    def set_weights(self, merged: Mapping[str, torch.Tensor] | None) -> None:
        """Refit the engine in place: `merged` (sub-model parameter names) replaces those weights, and weights an
        earlier call replaced go back to the built ones. ValueError naming the rebuild flag when the engine was
        not built refittable, or naming a weight TensorRT cannot refit."""
        trt = import_trt()
        base = self.base_weights()
        assert isinstance(base, OnnxWeights)
        new = dict(merged or {})
        restore = {n: base[n] for n in self._refitted - set(new)}
        refitter = trt.Refitter(self._engine, trt_logger())
        refittable = set(refitter.get_all_weights())
        keep = []  # the arrays must live until refit_cuda_engine returns
        for name, tensor in {**restore, **new}.items():
            onnx_name = base.prefix + name
            if onnx_name not in refittable:
                raise ValueError(f"{self.spec.name}: TensorRT cannot refit weight {onnx_name!r} (folded into another "
                                 f"layer at build time); {len(refittable)} weights are refittable")
            keep.append(tensor.detach().cpu().contiguous().numpy())
            if not refitter.set_named_weights(onnx_name, trt.Weights(keep[-1])):
                raise ValueError(f"{self.spec.name}: TensorRT refused weight {onnx_name!r} "
                                 f"({tuple(tensor.shape)}, {tensor.dtype})")
        if not refitter.refit_cuda_engine():
            raise RuntimeError(f"{self.spec.name}: TensorRT refit failed; missing weights: "
                               f"{refitter.get_missing_weights()[:5]}")
        self._refitted = set(new)
        self._graphs.clear()  # captured launches are redone against the refitted engine

    def _refit_onnx(self) -> Path:
        if not self._engine.refittable or self.refit_source is None:
            raise ValueError(f"{self.spec.name}: this TensorRT engine was built without refit, so LoRA adapters "
                             "cannot be applied; rebuild with python -m engine.build --backend tensorrt "
                             "--build-enable-refit")
        return self.refit_source

    @property
    def graph_shapes(self) -> list[tuple]:
        return self._graphs.keys

    def _profile_range(self, name: str, section: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        recorded = section.get("profile", {}).get(name)
        if recorded:
            return tuple(recorded[0]), tuple(recorded[2])
        lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
        return _dims(lo), _dims(hi)

    def _allocate(self) -> dict[str, torch.Tensor]:
        """One flat buffer per I/O tensor, sized for the profile's max shapes; addresses set once."""
        self._set_shapes(tuple(self._ranges[n][1] for n in self.input_names))
        buffers = {}
        for n in self.input_names + self.output_names:
            shape = _dims(self._context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.spec.name}: TensorRT gives {n!r} no static max shape ({shape})")
            dtype = torch_dtype(self._engine.get_tensor_dtype(n).name)
            buffers[n] = torch.empty(max(1, math.prod(shape)), dtype=dtype, device=self.device)
            buffers[n].record_stream(self.torch_stream)  # freed only after our stream is done with it
            self._context.set_tensor_address(n, buffers[n].data_ptr())
        return buffers

    def bind_memory(self, ptr: int, size: int) -> None:
        """(Re)bind the shared activation buffer; drops CUDA graphs, which captured the old address."""
        self._context.set_device_memory(ptr, size)
        self._graphs.clear()

    def _set_shapes(self, key: tuple) -> None:
        for name, shape in zip(self.input_names, key, strict=True):
            if not self._context.set_input_shape(name, shape):
                raise ValueError(f"{self.spec.name}: TensorRT rejected shape {shape} for input {name!r}")
        self._current = key

    def _views_for(self, key: tuple) -> dict[str, torch.Tensor]:
        if key not in self._views:
            for name, shape in zip(self.input_names, key, strict=True):
                check_input_shape(self.spec.name, name, shape, *self._ranges[name])
            self._set_shapes(key)
            shapes = dict(zip(self.input_names, key, strict=True))
            shapes.update({n: _dims(self._context.get_tensor_shape(n)) for n in self.output_names})
            self._views[key] = {n: self._buffers[n][: math.prod(s)].view(s) for n, s in shapes.items()}
        return self._views[key]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.closed:
            raise RuntimeError(f"{self.spec.name}: this TensorRT runner was closed")
        if missing := [n for n in self.input_names if n not in inputs]:
            raise ValueError(f"{self.spec.name}: missing inputs {missing}; expected {self.input_names}")
        key = tuple(tuple(inputs[n].shape) for n in self.input_names)
        views = self._views_for(key)
        caller = torch.cuda.current_stream(self.device)
        capturing = torch.cuda.is_current_stream_capturing()
        self.torch_stream.wait_stream(caller)  # inputs were produced on the caller's stream
        with torch.cuda.stream(self.torch_stream):
            for n in self.input_names:
                if inputs[n].data_ptr() != views[n].data_ptr():
                    views[n].copy_(inputs[n], non_blocking=True)
            self._run(key, capturing)
        caller.wait_stream(self.torch_stream)
        outputs = {n: views[n] for n in self.output_names}
        if self.debug:
            self._check_finite(outputs)
        return outputs

    def _run(self, key: tuple, capturing: bool) -> None:
        if key != self._current:
            self._set_shapes(key)
        if not capturing:
            self._graphs.run(key, self._enqueue)
        elif self._graphs.is_warm(key):  # the caller captures its own graph: enqueue into it
            self._enqueue()
        else:
            raise RuntimeError(f"{self.spec.name}: run each input shape once before capturing a CUDA graph")

    def _enqueue(self) -> bool:
        if not self._context.execute_async_v3(self._stream.ptr):
            raise RuntimeError(f"{self.spec.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return True

    def _check_finite(self, outputs: dict[str, torch.Tensor]) -> None:
        for n, t in outputs.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise FloatingPointError(f"{self.spec.name}: output {n!r} has NaN/Inf (fp16 overflow?)")

    def close(self) -> None:
        """Release graphs, buffers, context and engine (Pipeline.close calls it); the runner is unusable after."""
        if self.closed:
            return
        self._stream.synchronize()  # no launch of a graph may be pending when it is destroyed
        self._graphs.clear()
        cuda.arena(self.device.index or 0).detach(self)  # a later growth must not rebind a closed context
        self._views.clear()
        self._buffers.clear()
        del self._context  # before the engine it was made from, the engine before its runtime
        del self._engine
        self.closed = True


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


def load_runner(spec: ComponentSpec, art_dir: Path, manifest: dict[str, Any], device: str) -> TrtRunner:
    """The runner of one built engine (TrtBackend.load); EngineIncompatible when it cannot run here."""
    import_trt()
    index = device_index(device)
    section = manifest.get(MANIFEST_KEY) or {}
    plugin = (section.get("attention") or {}).get("mode") == "plugin"
    error = check_compat(manifest, current_environment(index, with_plugin=plugin))
    if error:
        raise EngineIncompatible(f"{art_dir}: {error}")
    if plugin:
        try:  # AOT plugin engines should run without Python; registering is harmless when available
            register_attention_plugin()
        except PluginUnavailable as e:
            log.info("%s: %s", spec.name, e)
    runner = TrtRunner(spec, art_dir / section.get("engine", ENGINE_FILE), section, index)
    if section.get("refit_onnx"):
        runner.refit_source = art_dir.parents[1] / section["refit_onnx"]
    return runner
