"""The shape of the code that makes a new model family an added module (issue: "one shape for every model").

- No family-name comparison and no table keyed by a family name outside export/families/: a family's facts live in
  its own module, and everything else asks the family record (roles, hooks, data).
- No component name as a literal in the runtime (session, denoise step, continuous batching, backends): components
  are found by their family role (`Family.roles`) or by what their spec says (`ComponentSpec.per_step`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from export.families import FAMILIES, SD, SDXL, SDXL_REFINER, Roles
from export.specs import ALL_COMPONENTS

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ["engine/pipeline.py", "engine/denoise.py", "engine/continuous.py", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "engine/backends").rglob("*.py"))]


def _sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "families" not in p.parts)


def _family_uses(path: Path) -> list[str]:
    """Family names compared against, or used as dict keys, in one file."""
    names, found = set(FAMILIES), []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.Constant) and side.value in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares {side.value!r}")
        if isinstance(node, ast.Dict):
            for key in node.keys:
                if isinstance(key, ast.Constant) and key.value in names:
                    found.append(f"{path.relative_to(ROOT)}:{key.lineno} keys a table by {key.value!r}")
    return found


def test_no_family_name_tables_or_comparisons_outside_the_family_modules():
    found = [use for path in _sources("engine", "export", "benchmarks") for use in _family_uses(path)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("rel", RUNTIME)
def test_the_runtime_names_no_component(rel):
    path = ROOT / rel
    found = [f"{rel}:{node.lineno} {node.value!r}" for node in ast.walk(ast.parse(path.read_text(), rel))
             if isinstance(node, ast.Constant) and node.value in ALL_COMPONENTS]
    assert not found, "\n".join(found)


def test_the_checks_can_fail(tmp_path):
    """The walkers above find what they look for (so an empty result means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text('X = {"sdxl": 1}\nif family.name == "sd-x":\n    pass\nif name == "sd":\n    y = "unet"\n')
    assert [u.split(" ", 1)[1] for u in _family_uses_at(bad)] == ["keys a table by 'sdxl'", "compares 'sd'"]
    constants = [n.value for n in ast.walk(ast.parse(bad.read_text())) if isinstance(n, ast.Constant)]
    assert "unet" in constants and "unet" in ALL_COMPONENTS


def _family_uses_at(path: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return _family_uses(path)
    finally:
        ROOT = saved


def test_every_family_names_its_roles_and_owns_its_wrappers():
    for family in FAMILIES.values():
        roles = family.roles
        assert isinstance(roles, Roles)
        named = [*roles.text_encoders, roles.denoiser, roles.latent_decoder, roles.latent_encoder, *roles.conditions,
                 *(c for c in (roles.context_encoder, roles.map_encoder) if c in family.specs)]  # LDM condition encoders
        assert set(named) == set(family.specs), family.name  # every component plays a role, every role is built
        assert set(family.wrappers) == set(family.specs), family.name  # export can wrap each one
        assert {family.spec(c).model_folder for c in family.specs} <= set(family.model_classes), family.name
        assert len(family.tokenizers) == len(roles.text_encoders)
        assert [c for c in family.specs if family.spec(c).per_step] == [roles.denoiser]


def test_family_request_fields():
    assert SD.request_fields == ("clip_skip",) and SD.request_defaults is None  # A1111's clip skip
    assert SDXL.request_fields == ("original_size", "crop", "target_size")
    assert SDXL_REFINER.request_fields == ("original_size", "crop", "aesthetic_score", "negative_aesthetic_score")
