"""python -m engine.build: export -> optimize -> backend build per component, through the cache.

Each component's ONNX is keyed by its weights and export options; each backend artifact by that
ONNX, the backend's fingerprint (version, device), precision, profile and attention mode. What the
cache already holds is verified (hashes) and reused, so an identical second build does no work.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from engine import cache
from engine.backends.base import Backend, get_backend
from engine.config import ATTENTION_MODES, BACKENDS, BuildConfig, BuildPlan, Profile
from export.families import Family, detect_family
from export.specs import Dims, Shape, check_size, export_range, parse_components



@dataclass
class BuildResult:
    record: dict[str, Any]  # what build.json holds
    built: list[str]  # "<component>:<stage>" that did work
    reused: list[str]
    seconds: float


def resolve_backend(name: str) -> str:
    if name != "auto":
        return name
    import torch

    from engine.backends.trt_backend import trt_available

    return "tensorrt" if trt_available() and torch.cuda.is_available() else "onnxruntime"


def make_profile(cfg: BuildConfig, dims: Dims, size: int, min_size: int, max_size: int,
                 static: bool = True) -> Profile:
    """The shapes the engines accept. Static-shape backends (TensorRT) get the asked shape or range;
    the others accept every shape the graphs were exported for, with the asked shape as the default."""
    h, w = cfg.height or size, cfg.width or size
    check_size(dims, h, w)
    if cfg.batch_size < 1:
        raise ValueError(f"batch size {cfg.batch_size} must be >= 1")
    opt = Shape(cfg.batch_size, h, w)
    if not static:
        lo, hi = export_range(dims)
        if cfg.batch_size > hi.batch:
            raise ValueError(f"batch size {cfg.batch_size} is above {hi.batch}, the most the exported graphs take")
        return Profile(lo, opt, hi)
    if not cfg.build_dynamic_shape:
        return Profile(opt, opt, opt)
    lo_s, hi_s = cfg.min_size or min_size, cfg.max_size or max_size
    m = dims.size_multiple
    lo_s, hi_s = max(m, lo_s // m * m), hi_s // m * m
    lo = Shape(min(cfg.min_batch, cfg.batch_size), min(lo_s, h), min(lo_s, w))
    hi = Shape(max(cfg.max_batch, cfg.batch_size), max(hi_s, h), max(hi_s, w))
    return Profile(lo, opt, hi)


def make_plan(cfg: BuildConfig, backend: Backend, profile: Profile) -> BuildPlan:
    device = backend.resolve_device(cfg.device)
    return BuildPlan(
        backend=backend.name,
        device=device,
        precision=cfg.precision or backend.default_precision(device),
        attention=backend.default_attention() if cfg.attention == "auto" else cfg.attention,
        profile=profile,
        engine_dir=cfg.engine_dir,
        timing_cache=cfg.timing_cache,
        workspace_gib=cfg.workspace_gib,
        builder_optimization_level=cfg.builder_optimization_level,
    )


def _onnx_stage(cfg: BuildConfig, model_id: str, name: str, weights: str, plan: BuildPlan,
                model_ref, done: list[str]) -> tuple[Path, str]:
    """The component's exported ONNX (reused when cached) and its key."""
    from export.onnx_export import ExportOptions, export_component

    opts = ExportOptions(precision=plan.precision, attention=plan.attention)
    parts = {"component": name, "weights": weights, "export": opts.to_json()}
    key = cache.content_key(parts)
    art = cache.artifact_dir(cfg.engine_dir, model_id, "onnx", name, key)
    if cfg.force_rebuild or cache.lookup(art) is None:
        with cache.staging_dir(art) as tmp:
            info = export_component(model_ref(), name, tmp / "model.onnx", opts)
            cache.write_manifest(tmp, key, parts, {"export": info})
        done.append(f"{name}:onnx")
    return art / "model.onnx", key


def _model_files_stage(cfg: BuildConfig, model_id: str, folder: Path, family: Family, done: list[str]) -> Path:
    """Copy what the runtime reads besides the engines (tokenizers, scheduler config) into the engine dir."""
    from export.store import cache_root

    files = [p for sub in family.tokenizers for p in sorted((folder / sub).iterdir()) if p.is_file()]
    files.append(folder / family.scheduler_config)
    parts = {"files": cache.hash_files(files, memo=cache_root() / cache.HASH_MEMO), "family": family.name}
    key = cache.content_key(parts)
    art = cache.artifact_dir(cfg.engine_dir, model_id, "model", "files", key)
    if cfg.force_rebuild or cache.lookup(art) is None:
        with cache.staging_dir(art) as tmp:
            for f in files:
                dst = tmp / f.relative_to(folder)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
            cache.write_manifest(tmp, key, parts, {})
        done.append("model:files")
    return art


def build_all(cfg: BuildConfig, progress: bool = True) -> BuildResult:
    """Build (or reuse) every requested component; write <engine_dir>/<model_id>/build.json."""
    from tqdm import tqdm

    from export.models import component_files, default_size, folder_dims, resolve_model
    from export.presets import PRESETS
    from export.store import cache_root

    t0 = time.perf_counter()
    backend: Backend = get_backend(resolve_backend(cfg.backend))
    folder, model_id = resolve_model(cfg.model)
    family, dims = detect_family(folder), folder_dims(folder)
    components = cfg.components or family.default_components(dims)
    for name in components:
        family.spec(name)
    preset = PRESETS.get(str(cfg.model))
    size = default_size(folder)
    profile = make_profile(cfg, dims, size, preset.min_size if preset else 256, preset.max_size if preset else 1024,
                           static=backend.static_shapes)
    plan = make_plan(cfg, backend, profile)
    fingerprint = backend.fingerprint(plan)  # raises a clear error when the backend is unusable
    loaded: list = []

    def model_ref():  # weights are loaded only if something must be exported
        if not loaded:
            import torch

            from export.models import load_model

            loaded.append(load_model(folder, dtype=torch.float16 if plan.precision == "fp16" else torch.float32))
        return loaded[0]

    model_dir = cfg.engine_dir / model_id
    built: list[str] = []
    reused: list[str] = []
    entries: dict[str, Any] = {}
    model_files = _model_files_stage(cfg, model_id, folder, family, built)
    bar = tqdm(components, desc=f"build {backend.name}", unit="component", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        spec = family.spec(name)
        weights = cache.hash_files(component_files(folder, spec.model_folder), memo=cache_root() / cache.HASH_MEMO)
        n_before = len(built)
        onnx_path, onnx_key = None, None
        if backend.needs_onnx:
            onnx_path, onnx_key = _onnx_stage(cfg, model_id, name, weights, plan, model_ref, built)
        parts = {"component": name, "weights": weights, "onnx": onnx_key, "backend": fingerprint,
                 "precision": plan.precision, "attention": plan.attention,
                 "profile": profile.to_json() if backend.static_shapes else None}
        key = cache.content_key(parts)
        art = cache.artifact_dir(cfg.engine_dir, model_id, backend.name, name, key)
        if cfg.force_rebuild or cache.lookup(art) is None:
            with cache.staging_dir(art) as tmp:
                extra = backend.build(spec, onnx_path, tmp, dims, plan, folder)
                cache.write_manifest(tmp, key, parts, extra)
            built.append(f"{name}:{backend.name}")
        if len(built) == n_before:
            reused.append(name)
        entries[name] = {"dir": art.relative_to(model_dir).as_posix(), "key": key}
    record = {
        "format": cache.RECORD_FORMAT,
        "model": str(cfg.model),
        "model_id": model_id,
        "source": str(folder.resolve()),  # for people; the runtime never reads it
        "family": family.name,
        "backend": backend.name,
        "device": plan.device,
        "precision": plan.precision,
        "attention": plan.attention,
        "static_shapes": backend.static_shapes,
        "profile": profile.to_json(),
        "dims": vars(dims),
        "model_files": model_files.relative_to(model_dir).as_posix(),
        "components": entries,
    }
    record_path = model_dir / cache.BUILD_RECORD
    if not record_path.is_file() or cache.read_json(record_path) != record:
        cache.write_json_atomic(record_path, record)
    return BuildResult(record, built, reused, time.perf_counter() - t0)


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    d = BuildConfig()
    p = argparse.ArgumentParser(prog="python -m engine.build", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=d.model, help="preset (tiny, sd15, sd21) or a local diffusers folder / .safetensors")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--precision", choices=("fp16", "fp32"), default=d.precision)
    p.add_argument("--attention", choices=ATTENTION_MODES, default=d.attention)
    p.add_argument("--components", default=None,
                   help="comma-separated; default clip,unet,vae_decoder (+ vae_encoder for inpainting models)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images denoised together")
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--build-dynamic-shape", action="store_true", default=d.build_dynamic_shape)
    for f in ("min_batch", "max_batch", "min_size", "max_size"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f))
    p.add_argument("--engine-dir", type=Path, default=d.engine_dir)
    p.add_argument("--force-rebuild", action="store_true", default=d.force_rebuild)
    p.add_argument("--timing-cache", type=Path, default=d.timing_cache)
    p.add_argument("--workspace-gib", type=float, default=d.workspace_gib)
    p.add_argument("--builder-optimization-level", type=int, default=d.builder_optimization_level)
    p.add_argument("--device", default=d.device)
    a = vars(p.parse_args(argv))
    if a["batch_size"] < 1:
        p.error(f"argument --batch-size: {a['batch_size']} must be >= 1")
    a["components"] = parse_components(a["components"]) if a["components"] else None
    return BuildConfig(**{f.name: a[f.name] for f in fields(BuildConfig) if f.name in a})


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        result = build_all(cfg)
    except (ValueError, RuntimeError, OSError) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = result.record
    for name, c in r["components"].items():
        state = "cached, nothing to do" if name in result.reused else "built"
        print(f"{name}: {state} ({r['backend']}, {r['precision']}) -> {cfg.engine_dir / r['model_id'] / c['dir']}")
    if not result.built:
        print("all components were already built: no export or compile work done")
    print(f"build.json: {cfg.engine_dir / r['model_id'] / cache.BUILD_RECORD} ({result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
