"""TensorRT engine building: polygraphy parses a component's ONNX and builds one serialized engine.

One optimization profile from the ComponentSpec (`spec.profile(dims, lo, opt, hi)`); workspace limit,
builder optimization level, a reused timing cache, tqdm progress (trt.IProgressMonitor),
ProfilingVerbosity.DETAILED for the engine inspector, which tells how many attention layers were fused
or plugged. fp16 engines come from an fp16 ONNX: TensorRT 11 networks are strongly typed; on 10.x the
FP16 builder flag is set as well. Also the TensorRT import (`_trt`, `TensorRTUnavailable`) and logger
that the runtime in engine.backends.trt_backend shares; that module drives a build (TrtBackend.build)
and re-exports the public names here. Without TensorRT this module imports; `_trt()` raises.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import BuildPlan, Profile
from export.specs import ComponentSpec, Dims
from kernels import contract

if TYPE_CHECKING:
    import tensorrt as trt_t

INSTALL_HINT = "TensorRT is not installed: pip install 'sd-engine[trt]' (needs NVIDIA's package index and a CUDA GPU)"
GIB = 1 << 30

Range = tuple[tuple[int, ...], ...]  # (min, opt, max) shape


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the real package, not only its type stubs) cannot be imported."""


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


_TRT_LOGGER: trt_t.Logger | None = None


def _logger() -> trt_t.Logger:
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        trt = _trt()
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


# ---- pure decisions (unit-tested without TensorRT) ----------------------------------------------------


def input_profiles(spec: ComponentSpec, dims: Dims, profile: Profile) -> dict[str, Range]:
    """(min, opt, max) shape per input of one component, from the spec; checks min <= opt <= max."""
    ranges = spec.profile(dims, profile.lo, profile.opt, profile.hi)
    for name, (lo, opt, hi) in ranges.items():
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
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


def _builder_config(ranges: dict[str, Range], plan: BuildPlan, fp16_flag: bool, cache: Path,
                    monitor: trt_t.IProgressMonitor) -> Any:
    from polygraphy.backend.trt import CreateConfig
    from polygraphy.backend.trt import Profile as PolyProfile

    trt = _trt()
    profile = PolyProfile()
    for name, (lo, opt, hi) in ranges.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    kwargs: dict[str, Any] = dict(
        profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(plan.workspace_gib * GIB)},
        builder_optimization_level=plan.builder_optimization_level,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        progress_monitor=monitor,
        load_timing_cache=str(cache),
    )
    if plan.enable_refit:
        kwargs["refittable"] = True  # BuilderFlag.REFIT: weights can be replaced later (LoRA) by their ONNX names
    if fp16_flag:
        kwargs["fp16"] = True  # TensorRT 10.x only: polygraphy fails on 11 where the flag is gone
    return CreateConfig(**kwargs)


def _build_engine(name: str, onnx_path: Path, mode: str, plugin_nodes: set[str], ranges: dict[str, Range],
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


def _inspect(engine_bytes: Any) -> tuple[str, int]:
    """(engine inspector JSON, activation bytes the engine needs: device_memory_size_v2)."""
    trt = _trt()
    runtime = trt.Runtime(_logger())
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise RuntimeError("TensorRT built an engine it cannot deserialize (see the TensorRT log above)")
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return info, int(engine.device_memory_size_v2)


def _check_onnx_dtype(spec: ComponentSpec, onnx_path: Path, precision: str, io_dtypes: dict[str, str]) -> None:
    """Strongly typed networks (TensorRT >= 11) take their precision from the ONNX: it must match."""
    want = "float16" if precision == "fp16" else "float32"
    tensors = [t.name for t in (*spec.inputs, *spec.outputs) if t.dtype == "model" and t.name in io_dtypes]
    if wrong := {io_dtypes[n] for n in tensors} - {want}:
        raise ValueError(
            f"{onnx_path} has {'/'.join(sorted(wrong))} tensors but a {precision} engine was asked for; TensorRT >= 11 "
            f"builds strongly typed networks, so export the ONNX in {precision} (--precision {precision})"
        )
