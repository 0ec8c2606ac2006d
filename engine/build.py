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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine import build_extensions as extensions
from engine import cache
from engine.backends.base import Backend, get_backend
from engine.config import ATTENTION_MODES, BACKENDS, BuildConfig, BuildPlan, Profile
from export import control, feature_cache, ip_adapter, tiny_vae
from export.families import Family, detect_family
from export.footprint import folder_footprint
from export.quiet import add_verbose_flag, quiet_cli, quieted
from export.specs import MAX_CHUNKS, TEXT, Dims, Shape, check_size, export_range, parse_components


@dataclass
class BuildResult:
    record: dict[str, Any]  # what build.json holds
    built: list[str]  # "<component>:<stage>" that did work
    reused: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)  # repairs and clean-ups, one line each


def resolve_backend(cfg: BuildConfig) -> tuple[str, str | None, str]:
    """(backend, precision or None for the backend's default, a note) for `cfg`'s backend. `auto`: TensorRT
    where it is installed with a GPU; ONNX Runtime on another GPU; on a CPU, the fastest measured path usable
    here (engine/backends/cpu_choice.py)."""
    if cfg.backend != "auto":
        return cfg.backend, cfg.precision, ""
    if cfg.compile:  # torch.compile is the torch backend's
        return "torch", cfg.precision, "auto: torch (--compile compiles the torch backend's UNet)"
    import torch

    from engine.backends.tensorrt.build import trt_available

    if torch.cuda.is_available() and (trt_available() or cfg.device != "cpu"):
        return ("tensorrt" if trt_available() else "onnxruntime"), cfg.precision, ""
    from engine.backends import cpu_choice

    choice = cpu_choice.pick(cfg.precision)
    return choice.backend, choice.precision, choice.why


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
    hi = Shape(max(cfg.max_batch, cfg.batch_size), max(hi_s, h), max(hi_s, w), MAX_CHUNKS)  # prompts of 1..4 chunks
    return Profile(lo, opt, hi)


def make_plan(cfg: BuildConfig, backend: Backend, profile: Profile) -> BuildPlan:
    if cfg.compile and backend.name != "torch":
        raise ValueError(f"--compile applies to the torch backend only (torch.compile of the UNet), not to "
                         f"{backend.name}: drop --compile or use --backend torch")
    device = backend.resolve_device(cfg.device)
    precision = cfg.precision or backend.default_precision(device)
    if precision not in backend.precisions:  # the one place a precision is checked against the backend
        raise ValueError(f"precision {precision!r} is not available with the {backend.name} backend; "
                         f"choose from {', '.join(backend.precisions)}")
    return BuildPlan(
        backend=backend.name,
        device=device,
        precision=precision,
        attention=backend.default_attention() if cfg.attention == "auto" else cfg.attention,
        profile=profile,
        engine_dir=cfg.engine_dir,
        timing_cache=cfg.timing_cache,
        workspace_gib=cfg.workspace_gib,
        builder_optimization_level=cfg.builder_optimization_level,
        enable_refit=cfg.build_enable_refit,
        compile=cfg.compile,
    )


def _stale(cfg: BuildConfig, art: Path, label: str, notes: list[str]) -> bool:
    """Whether `art` must be (re)built: forced, absent, or damaged (each defect noted in one line).
    With cfg.verify every file is re-hashed, so bytes altered with their mtime put back are found too."""
    if cfg.force_rebuild or not art.exists():
        return True
    found = cache.problems(art, full=cfg.verify)
    notes.extend(f"{label}: {e.path}: {e.problem}; rebuilt" for e in found)
    return bool(found)


def export_precision(precision: str) -> str:
    """The ONNX graph a build starts from: fp16 for fp16 builds; fp32 for the rest (int8 quantizes the fp32
    graph, bf16 is a compile option of the fp32 graph), so those share the fp32 build's cached export."""
    return "fp16" if precision == "fp16" else "fp32"


def _onnx_stage(cfg: BuildConfig, model_id: str, name: str, weights: str, plan: BuildPlan, folder: Path,
                family: Family, done: list[str], notes: list[str], progress: bool = False) -> tuple[Path, str]:
    """The component's exported ONNX (reused when cached) and its key. The export reads the weights from the
    model folder's files one tensor at a time (export/lean.py): no model is loaded for it."""
    from export.lean import bar_progress
    from export.onnx_export import ExportOptions, export_component

    spec = family.spec(name)
    residuals = sum(t.name.startswith((control.DOWN, control.MID)) for t in spec.inputs)
    text = MAX_CHUNKS if any(TEXT in t.dynamic_axes.values() for t in spec.inputs) else 0
    opts = ExportOptions(precision=export_precision(plan.precision), attention=plan.attention, residuals=residuals,
                         text_chunks=text)
    parts = {"component": name, "weights": weights, "export": opts.to_json(),
             "io": [spec.input_names, spec.output_names]}  # a graph with other inputs or outputs is another graph
    key = cache.content_key(parts)
    art = cache.artifact_dir(cfg.engine_dir, model_id, "onnx", name, key)
    if _stale(cfg, art, f"{name}:onnx", notes):
        with cache.staging_dir(art) as tmp:
            if cfg.force_rebuild or not cache.fetch_export(key, tmp):  # another engine dir's export of this key
                info = export_component(folder, name, tmp / "model.onnx", opts,
                                        progress=bar_progress(f"{name} weights", disable=not progress), family=family)
                cache.write_manifest(tmp, key, parts, {"export": info})
                cache.publish_export(key, tmp)
        done.append(f"{name}:onnx")
    return art / "model.onnx", key


def _model_files_stage(cfg: BuildConfig, model_id: str, folder: Path, family: Family, done: list[str],
                       notes: list[str]) -> Path:
    """Copy what the runtime reads besides the engines (tokenizers, scheduler config) into the engine dir."""
    from export.store import cache_root

    files = [p for sub in family.tokenizers for p in sorted((folder / sub).iterdir()) if p.is_file()]
    files += [folder / f for f in family.runtime_files]
    parts = {"files": cache.hash_files(files, memo=cache_root() / cache.HASH_MEMO), "family": family.name}
    key = cache.content_key(parts)
    art = cache.artifact_dir(cfg.engine_dir, model_id, "model", "files", key)
    if _stale(cfg, art, "model:files", notes):
        with cache.staging_dir(art) as tmp:
            for f in files:
                dst = tmp / f.relative_to(folder)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
            cache.write_manifest(tmp, key, parts, {})
        done.append("model:files")
    return art


@dataclass
class _Job:
    """What every component's build shares: the resolved model, backend and plan."""

    cfg: BuildConfig
    model_id: str
    folder: Path
    family: Family
    dims: Dims
    backend: Backend
    plan: BuildPlan
    fingerprint: dict[str, Any]
    progress: bool = False  # progress bars (the export's weights bar too)
    why: str = ""  # how `auto` was resolved (one line), if it was
    source: Path | None = None  # the model folder as given (`folder` adds the ControlNets to it); None: `folder`
    ip: dict[str, Any] | None = None  # the IP-Adapter's name and image preprocessing (build.json), if given
    feature_cache: dict[str, Any] | None = None  # the feature cache's branch and tensors (build.json), if asked for


VAE_COMPONENTS = ("vae_decoder", "vae_encoder")


def component_precision(family: Family, folder: Path, name: str, precision: str) -> str:
    """The precision one component is built in: the build's, except a VAE that overflows in fp16. As diffusers'
    SDXL pipelines upcast a VAE whose config says `force_upcast` (SDXL's own VAE), an fp16 build of such a family
    keeps that VAE in fp32; a VAE with `force_upcast: false` (e.g. the fp16-fix VAE) stays fp16."""
    if precision != "fp16" or name not in VAE_COMPONENTS or not family.upcast_vae:
        return precision
    config = cache.read_json(folder / family.spec(name).model_folder / "config.json")
    return "fp32" if config.get("force_upcast", True) else precision  # AutoencoderKL's default is True


def _component(job: _Job, name: str, built: list[str], notes: list[str]) -> dict[str, str]:
    """Build (or reuse) one component's ONNX and backend artifact; its build.json entry."""
    from export.models import component_files
    from export.store import cache_root

    cfg, backend = job.cfg, job.backend
    plan = replace(job.plan, precision=component_precision(job.family, job.folder, name, job.plan.precision))
    spec = job.family.spec(name)
    weights = cache.hash_files(component_files(job.folder, spec.model_folder), memo=cache_root() / cache.HASH_MEMO)
    onnx_path, onnx_key = None, None
    if backend.needs_onnx:
        onnx_path, onnx_key = _onnx_stage(cfg, job.model_id, name, weights, plan, job.folder, job.family, built,
                                          notes, job.progress)
    parts = {"component": name, "weights": weights, "onnx": onnx_key, "backend": job.fingerprint,
             "precision": plan.precision, "attention": plan.attention,
             "profile": plan.profile.to_json() if backend.static_shapes else None}
    key = cache.content_key(parts)
    art = cache.artifact_dir(cfg.engine_dir, job.model_id, backend.name, name, key)
    if _stale(cfg, art, f"{name}:{backend.name}", notes):
        with cache.staging_dir(art) as tmp:
            extra = backend.build(spec, onnx_path, tmp, job.dims, plan, job.folder)
            cache.write_manifest(tmp, key, parts, extra)
        built.append(f"{name}:{backend.name}")
    return {"dir": art.relative_to(cfg.engine_dir / job.model_id).as_posix(), "key": key, "precision": plan.precision}


def _write_record(record_path: Path, record: dict[str, Any], notes: list[str]) -> None:
    """Write build.json unless it already holds `record`; a damaged one is rewritten (and noted)."""
    try:
        current = cache.read_json(record_path)
    except FileNotFoundError:
        current = None
    except (cache.DamagedFile, OSError) as e:
        notes.append(f"{e}; rewritten")
        current = None
    if current != record:
        cache.write_json_atomic(record_path, record, checksum=True)


def _prepare(cfg: BuildConfig) -> _Job:
    """Resolve the model, backend, profile and plan (before any lock or work)."""
    from export.models import default_size, folder_dims, resolve_model
    from export.presets import ALL_PRESETS

    name, precision, why = resolve_backend(cfg)
    cfg = replace(cfg, backend=name, precision=precision)
    backend: Backend = get_backend(name)
    source, model_id = resolve_model(cfg.model)
    family, dims = detect_family(source), folder_dims(source)
    for name in cfg.components or ():
        family.spec(name)
    folder, family = extensions.with_controlnets(cfg, source, family, dims)
    folder, family, dims, ip = extensions.with_ip_adapter(cfg, folder, family, dims)
    family, cached = extensions.with_feature_cache(cfg, folder, family)
    folder, family = extensions.with_tiny_vae(cfg, folder, family, dims, str(cfg.model))
    preset = ALL_PRESETS.get(str(cfg.model))
    profile = make_profile(cfg, dims, default_size(folder), preset.min_size if preset else 256,
                           preset.max_size if preset else 1024, static=backend.static_shapes)
    plan = make_plan(cfg, backend, profile)
    fingerprint = backend.fingerprint(plan)  # raises a clear error when the backend is unusable
    return _Job(cfg, model_id, folder, family, dims, backend, plan, fingerprint, why=why, source=source, ip=ip,
                feature_cache=cached)


def _components(cfg: BuildConfig, job: _Job, record_path: Path) -> tuple[tuple[str, ...], str | None]:
    """What to build, and a note: --components as given (a note says when that cannot generate, and what it
    dropped); else what the last build of this model and backend had, so a plain rebuild keeps an added
    vae_encoder (and a note says so); else the family's default."""
    needed = job.family.default_components(job.dims)
    try:
        before = cache.read_record(record_path)
    except (FileNotFoundError, ValueError, OSError):  # none yet, or one this build rewrites anyway
        before = {}
    nets = job.family.roles.conditions  # the ControlNets given: always built, never "kept"
    nets += (ip_adapter.COMPONENT,) if job.ip else ()  # so is the IP-Adapter's image encoder
    nets += (feature_cache.SHALLOW,) if job.feature_cache else ()  # and the feature cache's shallow graph
    nets += (tiny_vae.COMPONENT,) if job.cfg.tiny_vae else ()  # and the tiny decoder
    chosen, note = _base_components(cfg, job, before, needed, nets)
    return tuple(dict.fromkeys(chosen + nets)), note


def _base_components(cfg: BuildConfig, job: _Job, before: dict, needed: tuple[str, ...],
                     nets: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    had = tuple(c for c in before.get("components", {}) if c in job.family.specs and c not in nets)
    if cfg.components:
        dropped = [c for c in had if c not in cfg.components]
        missing = [c for c in needed if c not in cfg.components]
        said = [f"dropped {', '.join(dropped)}, which the last build had"] if dropped else []
        said += [f"--components {','.join(cfg.components)} lacks {', '.join(missing)}: these engines cannot "
                 f"generate until a build adds it (every generation with this model needs {','.join(needed)})"
                 ] if missing else []
        return tuple(cfg.components), "; ".join(said) or None
    if before.get("backend") != job.backend.name or set(had) <= set(needed):
        return needed, None
    return tuple(dict.fromkeys(needed + had)), (f"kept the components of the last build ({','.join(had)}); pass "
                                                "--components to change them")


def _record(job: _Job, model_files: Path, entries: dict[str, Any]) -> dict[str, Any]:
    """What build.json holds: everything the runtime needs, paths relative to <engine_dir>/<model_id>."""
    model_dir, plan = job.cfg.engine_dir / job.model_id, job.plan
    return {
        "format": cache.RECORD_FORMAT,
        "model": str(job.cfg.model),
        "model_id": job.model_id,
        "source": str((job.source or job.folder).resolve()),  # for people and find_model_dir
        "family": job.family.name,
        "backend": job.backend.name,
        "device": plan.device,
        "precision": plan.precision,
        "attention": plan.attention,
        "static_shapes": job.backend.static_shapes,
        "profile": plan.profile.to_json(),
        "dims": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(job.dims).items()},  # as JSON reads it
        "footprint": vars(folder_footprint(job.folder)),  # activation memory facts (engine/memory.py)
        "model_files": model_files.relative_to(model_dir).as_posix(),
        "components": entries,
        **({"controls": [n[len(control.PREFIX):] for n in job.family.roles.conditions]}
           if job.family.roles.conditions else {}),
        **({"ip_adapter": job.ip} if job.ip else {}),
        **({"feature_cache": job.feature_cache} if job.feature_cache else {}),
        **({"tiny_vae": Path(job.cfg.tiny_vae).name} if job.cfg.tiny_vae else {}),
        "text_chunks": MAX_CHUNKS,  # prompt chunks of 77 tokens the denoiser graphs take (engine/prompts.py)
    }


def build_all(cfg: BuildConfig, progress: bool = True, verbose: bool = False) -> BuildResult:
    """Build (or reuse) every requested component; write <engine_dir>/<model_id>/build.json.

    The whole build of a model holds its lock (<engine_dir>/<model_id>/.lock): a concurrent build of the
    same model waits, then reuses this one's work; the lock holder removes what killed builds left. The
    libraries' warnings and logs are kept off the console during it (`verbose` shows them), and put back after."""
    with quieted(verbose):
        return _build_all(cfg, progress)


def _build_all(cfg: BuildConfig, progress: bool) -> BuildResult:
    from tqdm import tqdm

    t0 = time.perf_counter()
    job = replace(_prepare(cfg), progress=progress)
    model_dir = cfg.engine_dir / job.model_id
    components, kept = _components(cfg, job, model_dir / cache.BUILD_RECORD)
    built: list[str] = []
    reused: list[str] = []
    entries: dict[str, Any] = {}
    with cache.model_lock(model_dir, job.model_id):
        notes = [job.why] if job.why else []
        notes += [kept] if kept else []
        notes += [f"removed the leftover of an interrupted build: {p}" for p in cache.remove_orphans(model_dir)]
        model_files = _model_files_stage(cfg, job.model_id, job.folder, job.family, built, notes)
        bar = tqdm(components, desc=f"build {job.backend.name}", unit="component", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            n_before = len(built)
            entries[name] = _component(job, name, built, notes)
            if len(built) == n_before:
                reused.append(name)
        record = _record(job, model_files, entries)
        _write_record(model_dir / cache.BUILD_RECORD, record, notes)
    return BuildResult(record, built, reused, time.perf_counter() - t0, notes)


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    d = BuildConfig()
    p = argparse.ArgumentParser(prog="python -m engine.build", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from export.presets import ALL_PRESETS

    p.add_argument("--model", default=d.model, help=f"preset ({', '.join(ALL_PRESETS)}) or a "
                   "local diffusers folder / single-file .safetensors")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend,
                   help="auto = tensorrt where it is installed with a GPU, onnxruntime on another GPU; on a CPU "
                        "the fastest measured path usable here that meets the quality gate "
                        "(engine/backends/cpu_table.json)")
    p.add_argument("--precision", default=d.precision,
                   help="fp32, fp16 (onnxruntime, torch, tensorrt), bf16 (torch, openvino; on a CPU with "
                        "avx512_bf16 or AMX), int8 (onnxruntime: MatMul weights; openvino: NNCF per-channel int8 weights); None = with --backend auto on a "
                        "CPU, the table's pick; else the backend's default: fp16 on a GPU, fp32 on the CPU")
    p.add_argument("--attention", choices=ATTENTION_MODES, default=d.attention,
                   help="ONNX attention emission; auto = the backend's preferred one")
    p.add_argument("--components", default=None,
                   help="comma-separated; None = clip,unet,vae_decoder (+ vae_encoder for inpainting models)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images denoised together")
    p.add_argument("--height", type=int, default=d.height, help="pixels; None = the model's default size")
    p.add_argument("--width", type=int, default=d.width, help="pixels; None = the model's default size")
    p.add_argument("--build-dynamic-shape", action="store_true", default=d.build_dynamic_shape,
                   help="TensorRT: build a shape range (the --min/--max flags) instead of one static shape")
    for f, what in (("min_batch", "smallest batch"), ("max_batch", "largest batch"),
                    ("min_size", "smallest side in pixels; None = the model's range"),
                    ("max_size", "largest side in pixels; None = the model's range")):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f),
                       help=f"with --build-dynamic-shape: the {what}")
    p.add_argument("--engine-dir", type=Path, default=d.engine_dir, help="where artifacts and build.json go")
    p.add_argument("--force-rebuild", action="store_true", default=d.force_rebuild, help="ignore the cache")
    p.add_argument("--verify", action="store_true", default=d.verify,
                   help="re-hash every artifact file (not only those whose mtime changed), report each mismatch "
                        "and rebuild that artifact")
    p.add_argument("--timing-cache", type=Path, default=d.timing_cache,
                   help="TensorRT timing cache file; None = one per TensorRT version and GPU in --engine-dir")
    p.add_argument("--workspace-gib", type=float, default=d.workspace_gib, help="TensorRT builder workspace limit")
    p.add_argument("--build-enable-refit", action="store_true", default=d.build_enable_refit,
                   help="TensorRT: build refittable engines, so LoRA adapters (generate --lora) need no rebuild")
    p.add_argument("--builder-optimization-level", type=int, default=d.builder_optimization_level,
                   help="TensorRT builder optimization level, 0..5")
    p.add_argument("--device", default=d.device,
                   help="where ONNX Runtime / torch engines run (cpu, cuda, cuda:N); auto = cuda if available")
    p.add_argument("--compile", action="store_true", default=d.compile,
                   help="torch backend: torch.compile the UNet (inductor; channels_last on CUDA) when it is loaded; "
                        "with fp16, our attention kernel and the whole-step CUDA graph this is the torch fast path")
    p.add_argument("--controlnet", dest="controlnets", action="append", default=list(d.controlnets), metavar="PATH",
                   help="a diffusers ControlNetModel folder for this model, built as a component named by the "
                        "folder's name (generate --controlnet NAME); repeatable")
    p.add_argument("--ip-adapter", default=d.ip_adapter, metavar="FILE",
                   help="an IP-Adapter .safetensors (the published layout) for this model: image prompts "
                        "(generate --ip-image); its image encoder is built as the image_encoder component")
    p.add_argument("--image-encoder", default=d.image_encoder, metavar="DIR",
                   help="the IP-Adapter's CLIP vision encoder folder; None = image_encoder/ beside the file")
    p.add_argument("--tiny-vae", default=d.tiny_vae, metavar="DIR",
                   help="an AutoencoderTiny folder (TAESD for SD 1.x/2.x, TAESDXL for SDXL), built as component "
                        "tiny_vae_decoder: live previews (generate --preview-every K) and generate --decoder tiny")
    p.add_argument("--cache-branch", type=int, default=d.cache_branch, metavar="B",
                   help="feature caching (DeepCache): also build the UNet's shallow graph above skip branch B (0 = the "
                        "shallowest: fastest) and the full graph that returns its cache; generate --cache-interval N "
                        "then runs N-1 shallow steps after each full one. SD and SDXL UNets without ControlNets or an "
                        "IP-Adapter")
    add_verbose_flag(p)
    a = vars(p.parse_args(argv))
    a["controlnets"] = tuple(a["controlnets"])
    if a["batch_size"] < 1:
        p.error(f"argument --batch-size: {a['batch_size']} must be >= 1")
    a["components"] = parse_components(a["components"]) if a["components"] else None
    return BuildConfig(**{f.name: a[f.name] for f in fields(BuildConfig) if f.name in a})


def main(argv: list[str] | None = None) -> int:
    verbose = quiet_cli(argv)
    try:
        cfg = parse_args(argv)
        result = build_all(cfg, verbose=verbose)
    except (ValueError, RuntimeError, OSError) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = result.record
    for note in result.notes:
        print(note)
    for name, c in r["components"].items():
        state = "cached, nothing to do" if name in result.reused else "built"
        print(f"{name}: {state} ({r['backend']}, {r['precision']}) -> {cfg.engine_dir / r['model_id'] / c['dir']}")
    if not result.built:
        print("all components were already built: no export or compile work done")
    print(f"build.json: {cfg.engine_dir / r['model_id'] / cache.BUILD_RECORD} ({result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
