"""TensorRT backend: one engine per component, built from the exported ONNX; runners share one activation buffer.

    build.py     the TensorRT import, logger and plugin registration; profiles, timing cache, the polygraphy
                 build of one engine (`build_engine`); TrtBackend.build below drives it per component
    runtime.py   `TrtRunner` (static buffers, shared arena and stream, per-shape CUDA graphs, refit) and
                 `load_runner`
    inspect.py   pure decisions on recorded facts: engine-inspector JSON, ONNX summary, version / GPU / plugin
                 compatibility (no TensorRT needed)

Without TensorRT the package imports; version/fingerprint/build/load raise `TensorRTUnavailable`.
docs/tensorrt.md describes the whole path.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from engine.backends.tensorrt.build import (
    ENGINE_FILE,
    INSTALL_HINT,
    LAYERS_FILE,
    PluginUnavailable,
    TensorRTUnavailable,
    build_engine,
    check_onnx_dtype,
    current_environment,
    device_index,
    import_trt,
    input_profiles,
    inspect_engine,
    register_attention_plugin,
    timing_cache_path,
    trt_available,
)
from engine.backends.tensorrt.inspect import (
    MANIFEST_KEY,
    REBUILD_HINT,
    attention_mode_error,
    check_compat,
    network_typing,
    onnx_summary,
    plugin_build_error,
    summarize,
)
from engine.backends.tensorrt.runtime import (
    EngineIncompatible,
    TrtRunner,
    check_input_shape,
    load_runner,
    torch_dtype,
)
from engine.config import BuildPlan
from export.specs import ComponentSpec, Dims
from kernels import contract

log = logging.getLogger(__name__)

__all__ = [
    "BACKEND", "ENGINE_FILE", "INSTALL_HINT", "LAYERS_FILE", "MANIFEST_KEY", "REBUILD_HINT", "EngineIncompatible",
    "PluginUnavailable", "TensorRTUnavailable", "TrtBackend", "TrtRunner", "check_compat", "check_input_shape",
    "input_profiles", "timing_cache_path", "torch_dtype", "trt_available",
]


class TrtBackend:
    name = "tensorrt"
    needs_onnx = True
    static_shapes = True
    precisions = ("fp16", "fp32")

    def version(self) -> str:
        return import_trt().__version__

    def resolve_device(self, device: str) -> str:
        return "cuda" if device == "auto" else device

    def default_precision(self, device: str) -> str:
        return "fp16"

    def default_attention(self) -> str:
        return "decomposed"  # TensorRT's own MHA fusion: every 10.x; "onnx" needs >= 10.14

    def fingerprint(self, plan: BuildPlan) -> dict[str, Any]:
        import_trt()
        if plan.attention == "plugin":  # fails early and clearly without the plugin; builds the PTX that is hashed
            register_attention_plugin()
        env = current_environment(device_index(plan.device), with_plugin=plan.attention == "plugin")
        return {"tensorrt": env["version"], "gpu": env["gpu"], "compute_capability": env["compute_capability"],
                "plugin_ptx_sha256": env["plugin_ptx_sha256"], "workspace_gib": plan.workspace_gib,
                "builder_optimization_level": plan.builder_optimization_level, "refit": plan.enable_refit}

    def build(self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, plan: BuildPlan,
              source: Path) -> dict[str, Any]:
        import_trt()
        if onnx_path is None:
            raise ValueError("the tensorrt backend builds from ONNX; no ONNX path was given")
        precision, mode = plan.precision, plan.attention
        if mode == "plugin":  # before parsing (the parser looks the creator up) and hashing (builds the PTX)
            register_attention_plugin()
        env = current_environment(device_index(plan.device), with_plugin=mode == "plugin")
        if error := attention_mode_error(mode, env["version"]):
            raise ValueError(error)
        strongly_typed, fp16_flag = network_typing(env["version"], precision)
        counts, plugin_nodes, io_dtypes = onnx_summary(onnx_path, contract.PLUGIN_ID)
        if strongly_typed:
            check_onnx_dtype(spec, onnx_path, precision, io_dtypes)
        ranges = input_profiles(spec, dims, plan.profile)
        cache = timing_cache_path(plan, env)
        start = time.perf_counter()
        engine_bytes = build_engine(spec.name, onnx_path, mode, plugin_nodes, ranges, plan, fp16_flag, cache)
        seconds = time.perf_counter() - start
        with open(out_dir / ENGINE_FILE, "wb") as f:
            f.write(engine_bytes)
        info, activation_bytes = inspect_engine(engine_bytes)
        (out_dir / LAYERS_FILE).write_text(info)
        summary = summarize(info, contract.PLUGIN_NAME)
        expected = counts.get(contract.PLUGIN_ID, 0)
        if mode == "plugin" and (why := plugin_build_error(summary, contract.PLUGIN_NAME, expected)):
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
        return load_runner(spec, art_dir, manifest, device)


BACKEND = TrtBackend()
