"""TensorRT backend: engines built by engine.trt_build; runners share one activation buffer.

Build: `TrtBackend.build` checks the attention mode and precision against the installed TensorRT, then
engine.trt_build parses the ONNX through polygraphy, applies one optimization profile from the
ComponentSpec, reuses a timing cache and builds; the engine inspector's JSON is kept next to the engine.
Load: `check_compat` refuses engines of another TensorRT / GPU arch / plugin PTX; `TrtRunner` binds a
USER_MANAGED context to the device's shared activation arena, owns static I/O buffers, runs on one
non-default cuda-python stream per device (a torch ExternalStream) and replays the UNet as CUDA graphs.
Without TensorRT the module imports; version/fingerprint/build/load raise `TensorRTUnavailable`.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine import cuda, trt_inspect
from engine.trt_inspect import MANIFEST_KEY, REBUILD_HINT, attention_mode_error, check_compat, network_typing
from engine.config import BuildPlan
from engine.lora import OnnxWeights
from engine.trt_build import (  # INSTALL_HINT, TensorRTUnavailable, ...: importable from here as before
    INSTALL_HINT,  # noqa: F401  (re-exported)
    TensorRTUnavailable,
    _build_engine,
    _check_onnx_dtype,
    _inspect,
    _logger,
    _trt,
    input_profiles,
    timing_cache_path,
)
from export.specs import ComponentSpec, Dims
from kernels import contract

if TYPE_CHECKING:
    import tensorrt as trt_t

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"
LAYERS_FILE = "layers.json"  # the engine inspector's JSON, kept next to the engine
DEBUG_ENV = "SD_ENGINE_TRT_DEBUG"  # "1": check outputs for NaN/Inf after every call (host sync)
CUDA_GRAPH_ENV = "SD_ENGINE_TRT_CUDA_GRAPH"  # "0": never capture CUDA graphs
GRAPH_COMPONENTS = ("unet",)
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


class EngineIncompatible(RuntimeError):
    """An engine on disk was built for another TensorRT version, GPU or plugin kernel."""


class PluginUnavailable(RuntimeError):
    """attention == 'plugin' but our TensorRT plugin (kernels.trt_plugin) cannot be registered."""


def trt_available() -> bool:
    """True when the real TensorRT imports (engine.build's backend choice should use this, not find_spec)."""
    try:
        return bool(_trt())
    except TensorRTUnavailable:
        return False


# ---- _trt_new_api: things the tensorrt-stubs (TensorRT 10.13) do not describe -------------------------
# kernels.trt_plugin uses `tensorrt.plugin` (no stubs; ImportError without TensorRT >= 10.9), so it is
# imported by name here and nowhere else. Contract: register_plugin() -> None; optional ptx_sha256() -> str.
# Nothing else newer than the stubs is called: ONNX `Attention` reaches IAttention through the parser.


def _trt_plugin_module() -> Any:
    return importlib.import_module("kernels.trt_plugin")


def register_attention_plugin() -> None:
    """Register our AOT `tensorrt.plugin` (kernels.trt_plugin) before parsing a `plugin` ONNX."""
    try:
        _trt_plugin_module().register_plugin()
    except ImportError as e:
        raise PluginUnavailable(
            f"attention 'plugin' needs the TensorRT plugin of our kernel (kernels.trt_plugin, tensorrt>=10.9 "
            f"with tensorrt.plugin): {e}. Build the kernels (docs/tensorrt.md) or use --attention decomposed"
        ) from e


def plugin_ptx_sha256() -> str | None:
    """sha256 of the PTX our plugin embeds in engines (kernels.trt_plugin.ptx_sha256() when it exists,
    else the built attention.ptx that register_plugin() reads); None when no PTX is built."""
    try:
        fn = getattr(_trt_plugin_module(), "ptx_sha256", None)
        if callable(fn):
            return str(fn())
    except (ImportError, OSError, RuntimeError):
        pass
    from kernels import build as kernel_build

    found = kernel_build.find_artifacts(ptx_only=True)
    return hashlib.sha256(found.ptx.read_bytes()).hexdigest() if found is not None else None


# ---- pure decisions (unit-tested without TensorRT) ----------------------------------------------------


def check_input_shape(component: str, name: str, shape: tuple[int, ...], lo: tuple[int, ...],
                      hi: tuple[int, ...]) -> None:
    """ValueError naming the value and the built range when `shape` is outside [lo, hi]."""
    if len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
        return
    span = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi))
    raise ValueError(
        f"{component} input {name!r} has shape {tuple(shape)} but the TensorRT engine was built for ({span}); "
        "rebuild with matching --batch-size/--height/--width or with --build-dynamic-shape"
    )


def torch_dtype(trt_dtype_name: str) -> torch.dtype:
    if trt_dtype_name not in _TORCH_DTYPES:
        raise ValueError(f"TensorRT data type {trt_dtype_name} has no torch equivalent here")
    return _TORCH_DTYPES[trt_dtype_name]


def _device_index(device: str) -> int:
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    raise ValueError(f"the tensorrt backend runs on CUDA devices only, got device {device!r}")


def current_environment(device_index: int = 0, with_plugin: bool = False) -> dict[str, Any]:
    """What an engine is tied to: TensorRT version, GPU name and compute capability, plugin PTX hash."""
    trt = _trt()
    info = cuda.device_info(device_index)
    return {"version": trt.__version__, "gpu": info["name"], "compute_capability": info["compute_capability"],
            "plugin_ptx_sha256": plugin_ptx_sha256() if with_plugin else None}


# ---- runtime ------------------------------------------------------------------------------------------


def _create_context(engine: trt_t.ICudaEngine) -> trt_t.IExecutionContext:
    trt = _trt()
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
        trt = _trt()
        self.spec, self.device = spec, torch.device("cuda", index)
        cuda.set_device(index)
        self._runtime = trt.Runtime(_logger())  # must outlive the engine
        engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise EngineIncompatible(f"{engine_path}: TensorRT could not deserialize this engine. {REBUILD_HINT}")
        self._engine: trt_t.ICudaEngine = engine
        self._context = _create_context(engine)
        self._stream = cuda.shared_stream(index)
        self.torch_stream = torch.cuda.ExternalStream(self._stream.ptr, device=self.device)
        self.debug = os.environ.get(DEBUG_ENV, "") == "1"
        use_graph = spec.name in GRAPH_COMPONENTS and os.environ.get(CUDA_GRAPH_ENV, "1") != "0"
        self._graphs = cuda.GraphCache(self._stream, f"TensorRT {spec.name}", enabled=use_graph)
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
        trt = _trt()
        base = self.base_weights()
        assert isinstance(base, OnnxWeights)
        new = dict(merged or {})
        restore = {n: base[n] for n in self._refitted - set(new)}
        refitter = trt.Refitter(self._engine, _logger())
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
        for name, shape in zip(self.input_names, key):
            if not self._context.set_input_shape(name, shape):
                raise ValueError(f"{self.spec.name}: TensorRT rejected shape {shape} for input {name!r}")
        self._current = key

    def _views_for(self, key: tuple) -> dict[str, torch.Tensor]:
        if key not in self._views:
            for name, shape in zip(self.input_names, key):
                check_input_shape(self.spec.name, name, shape, *self._ranges[name])
            self._set_shapes(key)
            shapes = dict(zip(self.input_names, key))
            shapes.update({n: _dims(self._context.get_tensor_shape(n)) for n in self.output_names})
            self._views[key] = {n: self._buffers[n][: math.prod(s)].view(s) for n, s in shapes.items()}
        return self._views[key]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
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
        self._stream.synchronize()  # no launch of a graph may be pending when it is destroyed
        self._graphs.clear()


def _dims(dims: Any) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))


# ---- the backend ----------------------------------------------------------------------------------------


class TrtBackend:
    name = "tensorrt"
    needs_onnx = True
    static_shapes = True

    def version(self) -> str:
        return _trt().__version__

    def resolve_device(self, device: str) -> str:
        return "cuda" if device == "auto" else device

    def default_precision(self, device: str) -> str:
        return "fp16"

    def default_attention(self) -> str:
        return "decomposed"  # TensorRT's own MHA fusion: every 10.x; "onnx" needs >= 10.14

    def fingerprint(self, plan: BuildPlan) -> dict[str, Any]:
        _trt()
        if plan.attention == "plugin":  # fails early and clearly without the plugin; builds the PTX that is hashed
            register_attention_plugin()
        env = current_environment(_device_index(plan.device), with_plugin=plan.attention == "plugin")
        return {"tensorrt": env["version"], "gpu": env["gpu"], "compute_capability": env["compute_capability"],
                "plugin_ptx_sha256": env["plugin_ptx_sha256"], "workspace_gib": plan.workspace_gib,
                "builder_optimization_level": plan.builder_optimization_level, "refit": plan.enable_refit}

    def build(self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, plan: BuildPlan,
              source: Path) -> dict[str, Any]:
        _trt()
        if onnx_path is None:
            raise ValueError("the tensorrt backend builds from ONNX; no ONNX path was given")
        precision, mode = plan.precision, plan.attention
        if mode == "plugin":  # before parsing (the parser looks the creator up) and hashing (builds the PTX)
            register_attention_plugin()
        env = current_environment(_device_index(plan.device), with_plugin=mode == "plugin")
        if error := attention_mode_error(mode, env["version"]):
            raise ValueError(error)
        strongly_typed, fp16_flag = network_typing(env["version"], precision)
        counts, plugin_nodes, io_dtypes = trt_inspect.onnx_summary(onnx_path, contract.PLUGIN_ID)
        if strongly_typed:
            _check_onnx_dtype(spec, onnx_path, precision, io_dtypes)
        ranges = input_profiles(spec, dims, plan.profile)
        cache = timing_cache_path(plan, env)
        start = time.perf_counter()
        engine_bytes = _build_engine(spec.name, onnx_path, mode, plugin_nodes, ranges, plan, fp16_flag, cache)
        seconds = time.perf_counter() - start
        with open(out_dir / ENGINE_FILE, "wb") as f:
            f.write(engine_bytes)
        info, activation_bytes = _inspect(engine_bytes)
        (out_dir / LAYERS_FILE).write_text(info)
        summary = trt_inspect.summarize(info, contract.PLUGIN_NAME)
        expected = counts.get(contract.PLUGIN_ID, 0)
        if mode == "plugin" and (why := trt_inspect.plugin_build_error(summary, contract.PLUGIN_NAME, expected)):
            raise RuntimeError(f"{spec.name}: {why}")
        if mode == "onnx" and counts.get("Attention", 0) and not (summary.fused or summary.opaque):
            log.warning("%s: the ONNX has Attention nodes but the engine shows no fused attention layer", spec.name)
        return {MANIFEST_KEY: {
            **env, "engine": ENGINE_FILE, "layers": LAYERS_FILE, "precision": precision,
            "strongly_typed": strongly_typed, "fp16_flag": fp16_flag, "onnx_io_dtypes": io_dtypes,
            "attention": {"mode": mode, "onnx_attention_nodes": counts.get("Attention", 0),
                          "onnx_plugin_nodes": expected, **summary.to_json()},
            "profile": {n: [list(s) for s in r] for n, r in ranges.items()},
            "workspace_gib": plan.workspace_gib, "builder_optimization_level": plan.builder_optimization_level,
            "timing_cache": str(cache), "build_seconds": round(seconds, 2), "device_memory_bytes": activation_bytes,
            "refittable": plan.enable_refit,
            # the refit source: the exported graph's weights, <model dir>/onnx/<component>-<key>/model.onnx
            "refit_onnx": onnx_path.relative_to(onnx_path.parents[2]).as_posix() if plan.enable_refit else None,
        }}

    def load(self, spec: ComponentSpec, art_dir: Path, manifest: dict[str, Any], device: str) -> TrtRunner:
        _trt()
        index = _device_index(device)
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


BACKEND = TrtBackend()
