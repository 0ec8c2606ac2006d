"""TensorRT engine building: polygraphy parses a component's ONNX and builds one serialized engine.

One optimization profile from the ComponentSpec (`spec.profile(dims, lo, opt, hi)`); workspace limit,
builder optimization level, a reused timing cache, tqdm progress (trt.IProgressMonitor),
ProfilingVerbosity.DETAILED for the engine inspector, which tells how many attention layers were fused
or plugged. fp16 engines come from an fp16 ONNX: TensorRT 11 networks are strongly typed; on 10.x the
FP16 builder flag is set as well. TrtBackend.build (engine/backends/tensorrt/__init__.py) drives a build.

Also what the runtime (engine.backends.tensorrt.runtime) shares: the TensorRT import (`import_trt`,
`TensorRTUnavailable`), its logger, our attention plugin's registration and the environment an engine
is tied to. Without TensorRT this module imports; `import_trt()` raises TensorRTUnavailable.
"""
from __future__ import annotations

import hashlib
import importlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import cuda
from engine.config import BuildPlan, Profile
from export.specs import ComponentSpec, Dims, precision_dtype
from kernels import contract

if TYPE_CHECKING:
    import tensorrt as trt_t

INSTALL_HINT = "TensorRT is not installed: pip install 'sd-engine[trt]' (needs NVIDIA's package index and a CUDA GPU)"
GIB = 1 << 30
ENGINE_FILE = "engine.plan"
LAYERS_FILE = "layers.json"  # the engine inspector's JSON, kept next to the engine

Range = tuple[tuple[int, ...], ...]  # (min, opt, max) shape


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the real package, not only its type stubs) cannot be imported."""


class PluginUnavailable(RuntimeError):
    """attention == 'plugin' but our TensorRT plugin (kernels.trt_plugin) cannot be registered."""


def import_trt():
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
    """True when the real TensorRT imports (engine.build's backend choice uses this, not find_spec)."""
    try:
        return bool(import_trt())
    except TensorRTUnavailable:
        return False


_TRT_LOGGER: trt_t.Logger | None = None


def trt_logger() -> trt_t.Logger:
    """The one TensorRT logger (warnings and errors) every builder, runtime and refitter uses."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        trt = import_trt()
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


# ---- our attention plugin: things the tensorrt-stubs (TensorRT 10.13) do not describe -------------------
# kernels.trt_plugin uses `tensorrt.plugin` (no stubs; ImportError without TensorRT >= 10.9), so it is
# imported by name here and nowhere else. Contract: register_plugin() -> None; optional ptx_sha256() -> str.
# Nothing else newer than the stubs is called: ONNX `Attention` reaches IAttention through the parser.


def plugin_module() -> Any:
    """kernels.trt_plugin, imported by name (ImportError without TensorRT >= 10.9)."""
    return importlib.import_module("kernels.trt_plugin")


def register_attention_plugin() -> None:
    """Register our AOT `tensorrt.plugin` (kernels.trt_plugin) before parsing a `plugin` ONNX."""
    try:
        plugin_module().register_plugin()
    except ImportError as e:
        raise PluginUnavailable(
            f"attention 'plugin' needs the TensorRT plugin of our kernel (kernels.trt_plugin, tensorrt>=10.9 "
            f"with tensorrt.plugin): {e}. Build the kernels (docs/tensorrt.md) or use --attention decomposed"
        ) from e


def plugin_ptx_sha256() -> str | None:
    """sha256 of the PTX our plugin embeds in engines (kernels.trt_plugin.ptx_sha256() when it exists,
    else the built attention.ptx that register_plugin() reads); None when no PTX is built."""
    try:
        fn = getattr(plugin_module(), "ptx_sha256", None)
        if callable(fn):
            return str(fn())
    except (ImportError, OSError, RuntimeError):
        pass
    from kernels import build as kernel_build

    found = kernel_build.find_artifacts(ptx_only=True)
    return hashlib.sha256(found.ptx.read_bytes()).hexdigest() if found is not None else None


def device_index(device: str) -> int:
    """The CUDA device index of "auto" / "cuda" / "cuda:N"; ValueError for any other device."""
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    raise ValueError(f"the tensorrt backend runs on CUDA devices only, got device {device!r}")


def current_environment(index: int = 0, with_plugin: bool = False) -> dict[str, Any]:
    """What an engine is tied to: TensorRT version, GPU name and compute capability, plugin PTX hash."""
    trt = import_trt()
    info = cuda.device_info(index)
    return {"version": trt.__version__, "gpu": info["name"], "compute_capability": info["compute_capability"],
            "plugin_ptx_sha256": plugin_ptx_sha256() if with_plugin else None}


# ---- pure decisions (unit-tested without TensorRT) ----------------------------------------------------


def input_profiles(spec: ComponentSpec, dims: Dims, profile: Profile) -> dict[str, Range]:
    """(min, opt, max) shape per input of one component, from the spec; checks min <= opt <= max."""
    ranges = spec.profile(dims, profile.lo, profile.opt, profile.hi)
    for name, (lo, opt, hi) in ranges.items():
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise ValueError(f"{spec.name} input {name!r}: profile min {lo} <= opt {opt} <= max {hi} does not hold")
    return ranges


def timing_cache_path(plan: BuildPlan, env: dict[str, Any]) -> Path:
    """BuildPlan.timing_cache, else one file per TensorRT version and GPU arch under engine_dir."""
    if plan.timing_cache is not None:
        return Path(plan.timing_cache)
    arch = str(env.get("compute_capability", "unknown")).replace(".", "")
    return Path(plan.engine_dir) / f"timing-trt{env.get('version', 'unknown')}-sm{arch}.cache"


# ---- build --------------------------------------------------------------------------------------------


def _progress_monitor(label: str) -> trt_t.IProgressMonitor:
    """A trt.IProgressMonitor drawing one tqdm bar per builder phase (nested by parent phase)."""
    from tqdm import tqdm

    trt = import_trt()

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
    trt = import_trt()
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


def _builder_config(ranges: dict[str, Range], plan: BuildPlan, fp16_flag: bool, cache: Path,
                    monitor: trt_t.IProgressMonitor) -> Any:
    from polygraphy.backend.trt import CreateConfig
    from polygraphy.backend.trt import Profile as PolyProfile

    trt = import_trt()
    profile = PolyProfile()
    for name, (lo, opt, hi) in ranges.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    kwargs: dict[str, Any] = {
        "profiles": [profile],
        "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: int(plan.workspace_gib * GIB)},
        "builder_optimization_level": plan.builder_optimization_level,
        "profiling_verbosity": trt.ProfilingVerbosity.DETAILED,
        "progress_monitor": monitor,
        "load_timing_cache": str(cache),
    }
    if plan.enable_refit:
        kwargs["refittable"] = True  # BuilderFlag.REFIT: weights can be replaced later (LoRA) by their ONNX names
    if fp16_flag:
        kwargs["fp16"] = True  # TensorRT 10.x only: polygraphy fails on 11 where the flag is gone
    return CreateConfig(**kwargs)


def build_engine(name: str, onnx_path: Path, mode: str, plugin_nodes: set[str], ranges: dict[str, Range],
                  plan: BuildPlan, fp16_flag: bool, cache: Path) -> Any:
    """Parse, configure and build through polygraphy; the serialized engine (IHostMemory)."""
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    cache.parent.mkdir(parents=True, exist_ok=True)
    monitor = _progress_monitor(f"TensorRT {name}")  # must outlive the build
    try:
        network = _parse_network(onnx_path, mode, plugin_nodes)
        config = _builder_config(ranges, plan, fp16_flag, cache, monitor)
        return EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache))()
    except PolygraphyException as e:  # one line for the CLI; details are in the TensorRT log above
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise RuntimeError(f"TensorRT could not build {name} from {onnx_path}: {last}") from e


def inspect_engine(engine_bytes: Any) -> tuple[str, int]:
    """(engine inspector JSON, activation bytes the engine needs: device_memory_size_v2)."""
    trt = import_trt()
    runtime = trt.Runtime(trt_logger())
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise RuntimeError("TensorRT built an engine it cannot deserialize (see the TensorRT log above)")
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return info, int(engine.device_memory_size_v2)


def check_onnx_dtype(spec: ComponentSpec, onnx_path: Path, precision: str, io_dtypes: dict[str, str]) -> None:
    """Strongly typed networks (TensorRT >= 11) take their precision from the ONNX: it must match."""
    want = precision_dtype(precision)
    tensors = [t.name for t in (*spec.inputs, *spec.outputs) if t.dtype == "model" and t.name in io_dtypes]
    if wrong := {io_dtypes[n] for n in tensors} - {want}:
        raise ValueError(
            f"{onnx_path} has {'/'.join(sorted(wrong))} tensors but a {precision} engine was asked for; TensorRT >= 11 "
            f"builds strongly typed networks, so export the ONNX in {precision} (--precision {precision})"
        )

