"""TensorRT backend: polygraphy builds one engine per component; runners share one activation buffer.

Build: polygraphy parses the component's ONNX; one optimization profile from the ComponentSpec
(`spec.profile(dims, lo, opt, hi)`); workspace limit, builder optimization level, a reused timing
cache, tqdm progress (trt.IProgressMonitor), ProfilingVerbosity.DETAILED for the engine inspector,
which tells how many attention layers were fused or plugged. fp16 engines come from an fp16 ONNX:
TensorRT 11 networks are strongly typed; on 10.x the FP16 builder flag is set as well.
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
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine import cuda, trt_inspect
from engine.trt_inspect import MANIFEST_KEY, REBUILD_HINT, attention_mode_error, check_compat, network_typing
from engine.config import BuildConfig, Profile
from export.specs import ComponentSpec, Dims
from kernels import contract

if TYPE_CHECKING:
    import tensorrt as trt_t

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"
LAYERS_FILE = "layers.json"  # the engine inspector's JSON, kept next to the engine
INSTALL_HINT = "TensorRT is not installed: pip install 'sd-engine[trt]' (needs NVIDIA's package index and a CUDA GPU)"
DEBUG_ENV = "SD_ENGINE_TRT_DEBUG"  # "1": check outputs for NaN/Inf after every call (host sync)
CUDA_GRAPH_ENV = "SD_ENGINE_TRT_CUDA_GRAPH"  # "0": never capture CUDA graphs
GRAPH_COMPONENTS = ("unet",)
GIB = 1 << 30
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}

Range = tuple[tuple[int, ...], ...]  # (min, opt, max) shape


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the real package, not only its type stubs) cannot be imported."""


class EngineIncompatible(RuntimeError):
    """An engine on disk was built for another TensorRT version, GPU or plugin kernel."""


class PluginUnavailable(RuntimeError):
    """attention == 'plugin' but our TensorRT plugin (kernels.trt_plugin) cannot be registered."""


def _trt():
    """The tensorrt module; TensorRTUnavailable if absent (tensorrt-stubs alone import as a namespace)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(INSTALL_HINT) from e
    except OSError as e:  # the wheel is there but its CUDA libraries are not
        raise TensorRTUnavailable(f"{INSTALL_HINT}; importing it failed: {e}") from e
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable(INSTALL_HINT)
    return trt


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


def input_profiles(spec: ComponentSpec, dims: Dims, profile: Profile) -> dict[str, Range]:
    """(min, opt, max) shape per input of one component, from the spec; checks min <= opt <= max."""
    ranges = spec.profile(dims, profile.lo, profile.opt, profile.hi)
    for name, (lo, opt, hi) in ranges.items():
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ValueError(f"{spec.name} input {name!r}: profile min {lo} <= opt {opt} <= max {hi} does not hold")
    return ranges


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


def timing_cache_path(cfg: BuildConfig, env: dict[str, Any]) -> Path:
    """BuildConfig.timing_cache, else one file per TensorRT version and GPU arch under engine_dir."""
    if cfg.timing_cache is not None:
        return Path(cfg.timing_cache)
    arch = str(env.get("compute_capability", "unknown")).replace(".", "")
    return Path(cfg.engine_dir) / f"timing-trt{env.get('version', 'unknown')}-sm{arch}.cache"


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


# ---- build --------------------------------------------------------------------------------------------


def _progress_monitor(label: str) -> trt_t.IProgressMonitor:
    """A trt.IProgressMonitor drawing one tqdm bar per builder phase (nested by parent phase)."""
    from tqdm import tqdm

    trt = _trt()

    class TqdmProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, tuple[Any, int]] = {}
            self._lock = threading.Lock()  # TensorRT may call from several builder threads

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = 0 if parent_phase is None else self._bars.get(parent_phase, (None, -1))[1] + 1
                desc = f"{label}: {phase_name}" if depth == 0 else phase_name
                bar = tqdm(total=num_steps, desc=desc, position=depth, leave=depth == 0, disable=None)
                self._bars[phase_name] = (bar, depth)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                entry = self._bars.get(phase_name)
                if entry is not None:
                    entry[0].update(max(0, step + 1 - entry[0].n))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                entry = self._bars.pop(phase_name, None)
                if entry is not None:
                    entry[0].close()

    return TqdmProgress()


def _tag_plugin_layers(network: trt_t.INetworkDefinition, onnx_names: set[str]) -> int:
    """Prefix our plugin layers' names with the plugin id, so the engine inspector's JSON names them.
    Ours: PluginV3 layers named after one of our ONNX plugin nodes (or all PluginV3 layers if none is)."""
    trt = _trt()
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plugins = [layer for layer in layers if layer.type == trt.LayerType.PLUGIN_V3]
    ours = [layer for layer in plugins if layer.name in onnx_names or contract.PLUGIN_NAME in layer.name] or plugins
    for layer in ours:
        if contract.PLUGIN_NAME not in layer.name:
            layer.name = f"{contract.PLUGIN_ID}/{layer.name}"
    return len(ours)


def _parse_network(onnx_path: Path, mode: str, onnx_names: set[str]) -> tuple[Any, trt_t.INetworkDefinition, Any]:
    from polygraphy.backend.trt import NetworkFromOnnxPath

    builder, network, parser = NetworkFromOnnxPath(str(onnx_path))()
    if mode == "plugin":
        _tag_plugin_layers(network, onnx_names)
    return builder, network, parser


def _builder_config(ranges: dict[str, Range], cfg: BuildConfig, fp16_flag: bool, cache: Path,
                    monitor: trt_t.IProgressMonitor) -> Any:
    from polygraphy.backend.trt import CreateConfig
    from polygraphy.backend.trt import Profile as PolyProfile

    trt = _trt()
    profile = PolyProfile()
    for name, (lo, opt, hi) in ranges.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    kwargs: dict[str, Any] = dict(
        profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(cfg.workspace_gib * GIB)},
        builder_optimization_level=cfg.builder_optimization_level,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        progress_monitor=monitor,
        load_timing_cache=str(cache),
    )
    if fp16_flag:
        kwargs["fp16"] = True  # TensorRT 10.x only: polygraphy fails on 11 where the flag is gone
    return CreateConfig(**kwargs)


def _build_engine(name: str, onnx_path: Path, mode: str, plugin_nodes: set[str], ranges: dict[str, Range],
                  cfg: BuildConfig, fp16_flag: bool, cache: Path) -> Any:
    """Parse, configure and build through polygraphy; the serialized engine (IHostMemory)."""
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    cache.parent.mkdir(parents=True, exist_ok=True)
    monitor = _progress_monitor(f"TensorRT {name}")  # must outlive the build
    try:
        network = _parse_network(onnx_path, mode, plugin_nodes)
        config = _builder_config(ranges, cfg, fp16_flag, cache, monitor)
        return EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache))()
    except PolygraphyException as e:  # one line for the CLI; details are in the TensorRT log above
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise RuntimeError(f"TensorRT could not build {name} from {onnx_path}: {last}") from e


def _inspect(engine_bytes: Any) -> tuple[str, int]:
    """(engine inspector JSON, activation bytes the engine needs: device_memory_size_v2)."""
    trt = _trt()
    runtime = trt.Runtime(_logger())
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise RuntimeError("TensorRT built an engine it cannot deserialize (see the TensorRT log above)")
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return info, int(engine.device_memory_size_v2)


_TRT_LOGGER: trt_t.Logger | None = None


def _logger() -> trt_t.Logger:
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        trt = _trt()
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


def _check_onnx_dtype(spec: ComponentSpec, onnx_path: Path, precision: str, io_dtypes: dict[str, str]) -> None:
    """Strongly typed networks (TensorRT >= 11) take their precision from the ONNX: it must match."""
    want = "float16" if precision == "fp16" else "float32"
    tensors = [t.name for t in (*spec.inputs, *spec.outputs) if t.dtype == "model" and t.name in io_dtypes]
    if wrong := {io_dtypes[n] for n in tensors} - {want}:
        raise ValueError(
            f"{onnx_path} has {'/'.join(sorted(wrong))} tensors but a {precision} engine was asked for; TensorRT >= 11 "
            f"builds strongly typed networks, so export the ONNX in {precision} (--precision {precision})"
        )


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
        cuda.arena(index).attach(self, int(engine.device_memory_size_v2))

    @property
    def graph_safe(self) -> bool:
        return not self.debug  # the NaN check synchronizes with the host

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

    def version(self) -> str:
        return _trt().__version__

    def default_precision(self, cfg: BuildConfig) -> str:
        return "fp16"

    def default_attention(self) -> str:
        return "decomposed"  # TensorRT's own MHA fusion: every 10.x; "onnx" needs >= 10.14

    def _attention(self, cfg: BuildConfig) -> str:
        return self.default_attention() if cfg.attention == "auto" else cfg.attention

    def fingerprint(self, cfg: BuildConfig) -> dict[str, Any]:
        _trt()
        mode = self._attention(cfg)
        if mode == "plugin":  # fails early and clearly without the plugin; builds the PTX that is hashed
            register_attention_plugin()
        env = current_environment(_device_index(cfg.device), with_plugin=mode == "plugin")
        return {"tensorrt": env["version"], "gpu": env["gpu"], "compute_capability": env["compute_capability"],
                "plugin_ptx_sha256": env["plugin_ptx_sha256"], "workspace_gib": cfg.workspace_gib,
                "builder_optimization_level": cfg.builder_optimization_level}

    def build(self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, profile: Profile,
              cfg: BuildConfig) -> dict[str, Any]:
        _trt()
        if onnx_path is None:
            raise ValueError("the tensorrt backend builds from ONNX; no ONNX path was given")
        precision, mode = cfg.precision or self.default_precision(cfg), self._attention(cfg)
        if mode == "plugin":  # before parsing (the parser looks the creator up) and hashing (builds the PTX)
            register_attention_plugin()
        env = current_environment(_device_index(cfg.device), with_plugin=mode == "plugin")
        if error := attention_mode_error(mode, env["version"]):
            raise ValueError(error)
        strongly_typed, fp16_flag = network_typing(env["version"], precision)
        counts, plugin_nodes, io_dtypes = trt_inspect.onnx_summary(onnx_path, contract.PLUGIN_ID)
        if strongly_typed:
            _check_onnx_dtype(spec, onnx_path, precision, io_dtypes)
        ranges = input_profiles(spec, dims, profile)
        cache = timing_cache_path(cfg, env)
        start = time.perf_counter()
        engine_bytes = _build_engine(spec.name, onnx_path, mode, plugin_nodes, ranges, cfg, fp16_flag, cache)
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
            "workspace_gib": cfg.workspace_gib, "builder_optimization_level": cfg.builder_optimization_level,
            "timing_cache": str(cache), "build_seconds": round(seconds, 2), "device_memory_bytes": activation_bytes,
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
        return TrtRunner(spec, art_dir / section.get("engine", ENGINE_FILE), section, index)


BACKEND = TrtBackend()
