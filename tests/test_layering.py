"""The layering rule (docs in /work/shared/DESIGN.md, README): kernels <- export <- engine <- server / benchmarks,
no arrow back up; engine keeps the torch exporter, diffusers and transformers out of its module-level imports.

Read with `ast` from the sources (no module is imported): every import, wherever it sits, counts for the
direction rule; for the heavy-import rule only those that run when the module loads (not inside a function,
not under `if TYPE_CHECKING:`)."""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {  # package -> top-level packages of ours it may not import
    "kernels": ("export", "engine", "benchmarks", "tests"),
    "export": ("engine", "benchmarks", "tests"),
    "engine": ("benchmarks", "tests"),
}
HEAVY = ("export.onnx_export", "export.models", "export.lean", "diffusers", "transformers")
HEAVY_ALLOWED = {"engine/backends/torch_backend.py"}  # runs the torch modules themselves (DESIGN.md)
HEAVY_TO_FIX: dict[str, set[str]] = {}  # to fix: engine module -> the HEAVY names it still imports at load


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _imported(node: ast.Import | ast.ImportFrom, path: Path) -> Iterator[str]:
    """Dotted names an import statement brings in (`from a import b` gives a and a.b; relative resolved)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        parts = list(path.relative_to(REPO).with_suffix("").parts)[: -node.level]
        base = ".".join([*parts, base] if base else parts)
    yield base
    yield from (f"{base}.{alias.name}" for alias in node.names if alias.name != "*")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, load_time: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements of a module; with `load_time`, only those executed when it is imported."""
    def walk(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            elif load_time and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            elif load_time and isinstance(child, ast.If) and _is_type_checking(child.test):
                yield from (n for stmt in child.orelse for n in walk(ast.Module([stmt], [])))
            else:
                yield from walk(child)
    return walk(tree)


def _names(path: Path, load_time: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {name for node in _imports(tree, load_time) for name in _imported(node, path)}


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_goes_up_a_layer(package: str):
    bad = {
        _rel(path): sorted(n for n in _names(path) if any(_matches(n, up) for up in FORBIDDEN[package]))
        for path in _sources(package)
    }
    assert not {k: v for k, v in bad.items() if v}, f"{package}/ imports a layer above it"


def _heavy(path: Path) -> set[str]:
    """Which of HEAVY the module imports when it loads."""
    names = _names(path, load_time=True)
    return {h for h in HEAVY if any(_matches(n, h) for n in names)}


def test_engine_loads_no_exporter_diffusers_or_transformers():
    found = {_rel(p): heavy for p in _sources("engine") if _rel(p) not in HEAVY_ALLOWED and (heavy := _heavy(p))}
    assert found == HEAVY_TO_FIX, "engine modules import the exporter / diffusers / transformers when they load"


def test_the_reader_sees_each_kind_of_import(tmp_path: Path):
    """The ast reader itself: plain, from, relative and function-level imports; TYPE_CHECKING excluded at load."""
    src = tmp_path / "mod.py"
    src.write_text(
        "import engine.cuda\nfrom typing import TYPE_CHECKING\nfrom export import models\n"
        "if TYPE_CHECKING:\n    import diffusers\nelse:\n    import json\n"
        "def f():\n    import transformers\n"
        "class C:\n    from export.lean import save\n"
    )
    every = _names(src)
    assert {"engine.cuda", "export", "export.models", "diffusers", "transformers", "export.lean.save"} <= every
    at_load = _names(src, load_time=True)
    assert "diffusers" not in at_load and "transformers" not in at_load
    assert {"engine.cuda", "export.models", "json", "export.lean.save"} <= at_load
