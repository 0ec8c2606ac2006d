"""Presets and package layering: export/ stands alone (no engine imports, no import cycles), and the
inpainting presets materialise as diffusers inpainting folders that load, convert and export."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from export.presets import PRESETS

EXPORT_DIR = Path(__file__).resolve().parent.parent / "export"


# ---- layering ----


def module_name(path: Path) -> str:
    """Dotted module name of a file under export/ (export/__init__.py -> 'export')."""
    parts = path.relative_to(EXPORT_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions (relative imports resolved).
    `from pkg import name` counts as `pkg.name` when that is a module of ours, else as `pkg`."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def export_import_graph() -> dict[str, set[str]]:
    """export module -> the export modules it imports."""
    files = {module_name(p): p for p in EXPORT_DIR.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in files and m != name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_export_never_imports_engine():
    offenders = {
        module_name(p): sorted(m for m in imported_modules(p) if m == "engine" or m.startswith("engine."))
        for p in EXPORT_DIR.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_export_import_graph_has_no_cycle():
    graph = export_import_graph()
    assert {"export.models", "export.single_file", "export.onnx_export", "export.optimize"} <= graph.keys()
    assert "export.single_file" in graph["export.models"]  # the edges are seen (function-level ones too)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_store_names_are_shared_by_engine_cache():
    from engine import cache
    from export import models, store

    for name in ("canonical", "content_key", "hash_file", "hash_file_memo", "hash_files", "write_json_atomic",
                 "read_json", "staging_dir", "HASH_MEMO", "KEY_LEN"):
        assert getattr(cache, name) is getattr(store, name), name
    assert models.cache_root is store.cache_root


# ---- presets ----


def test_inpaint_presets():
    tiny, tiny_inpaint, sd15_inpaint = PRESETS["tiny"], PRESETS["tiny-inpaint"], PRESETS["sd15-inpaint"]
    assert tiny.unet_in_channels == tiny.latent_channels == 4 and not tiny.inpainting
    assert tiny_inpaint.unet == tiny.unet and tiny_inpaint.vae == tiny.vae and tiny_inpaint.clip == tiny.clip
    assert tiny_inpaint.seed != tiny.seed
    assert tiny_inpaint.unet_config()["in_channels"] == 9 and tiny_inpaint.unet_config()["out_channels"] == 4
    assert sd15_inpaint.unet == PRESETS["sd15"].unet and sd15_inpaint.unet_in_channels == 9
    assert [p.pipeline_class for p in (tiny, tiny_inpaint, sd15_inpaint)] == [
        "StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipeline"]


@pytest.fixture(scope="module")
def tiny_inpaint(engine_cache):
    from export.models import load_model

    return load_model("tiny-inpaint")


def test_tiny_inpaint_is_a_diffusers_inpainting_folder(tiny_inpaint):
    from diffusers import StableDiffusionInpaintPipeline

    from export.models import folder_dims, resolve_model

    folder = tiny_inpaint.path
    assert resolve_model(folder)[0] == folder  # a diffusers inpainting folder is accepted as a model path
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert tiny_inpaint.unet.config.in_channels == 9 and tiny_inpaint.unet.config.out_channels == 4
    assert folder_dims(folder).unet_in_channels == 9 and tiny_inpaint.dims.inpainting_unet
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    assert pipe.unet.config.in_channels == 9


def test_tiny_inpaint_unet_onnx_matches_torch(tiny_inpaint, tmp_path):
    from export.models import component_module
    from export.onnx_export import ExportOptions, example_inputs, export_component, run_onnx
    from export.specs import Shape, get_spec

    path = tmp_path / "unet.onnx"
    export_component(tiny_inpaint, "unet", path, ExportOptions())
    spec = get_spec("unet")
    inputs = example_inputs(spec, tiny_inpaint.dims, Shape(1, 64, 96), "fp32", seed=3)
    assert inputs["sample"].shape == (2, 9, 8, 12)
    with torch.no_grad():
        want = component_module(tiny_inpaint, "unet")(**inputs)
    got = torch.from_numpy(run_onnx(path, inputs)["latent"])
    assert got.shape == (2, 4, 8, 12)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
