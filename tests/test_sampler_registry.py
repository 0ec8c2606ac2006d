"""engine/sampler_registry.py is the one list of samplers: the CLI, the server, the image writer, the
scheduler setup and the sampler math all read its records, and no other list of sampler names is left."""
from __future__ import annotations

import ast
import contextlib
import inspect
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from engine import png, sampler_registry, samplers, schedulers
from engine.generate import parse_args
from engine.sampler_registry import REGISTRY, SAMPLERS, get
from engine.server.schemas import GenerateBody, ImagesBody
from tests.a1111 import TXT2IMG, by_a1111_name, parse_a1111
from tests.sampler_cases import SD15

REPO = Path(__file__).resolve().parents[1]


def test_keys_are_the_records_names() -> None:
    assert SAMPLERS == tuple(REGISTRY) and all(REGISTRY[n].name == n for n in SAMPLERS)
    assert samplers.SAMPLERS == SAMPLERS


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_cli_accepts_every_sampler(name: str) -> None:
    assert parse_args(["--sampler", name]).scheduler == name
    assert parse_args(["--scheduler", name]).requests()[0].sampler == name


def test_the_cli_help_lists_exactly_the_registry() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    assert f"one of {', '.join(SAMPLERS)} " in " ".join(out.getvalue().split())


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_server_schemas_accept_every_sampler(name: str) -> None:
    assert GenerateBody(prompt="a cat", sampler=name).to_request().sampler == name
    assert ImagesBody(prompt="a cat", scheduler=name).to_request().sampler == name


def test_the_server_and_the_engine_refuse_other_names_with_the_same_message() -> None:
    with pytest.raises(ValueError) as ours:
        get("heun9")
    with pytest.raises(ValidationError) as server:
        GenerateBody(prompt="a cat", sampler="heun9")
    with pytest.raises(ValueError) as engine:
        samplers.make_schedule("heun9", SD15, 4)
    assert str(ours.value) == str(engine.value) == f"unknown sampler 'heun9'; choose one of: {', '.join(SAMPLERS)}"
    assert str(ours.value) in str(server.value)


@pytest.mark.parametrize("name", SAMPLERS)
def test_png_round_trips_the_a1111_name(name: str) -> None:
    shown = parse_a1111(png.parameters_text({**TXT2IMG, "sampler": name}))["Sampler"]
    assert shown == REGISTRY[name].a1111_name == png.SAMPLER_NAMES[name]
    assert by_a1111_name(shown).name == name


def test_a1111_names_are_unique_and_unquoted() -> None:
    names = [s.a1111_name for s in REGISTRY.values()]
    assert len(set(names)) == len(names)
    assert all(png.quote(n) == n for n in names)
    with pytest.raises(ValueError, match="unknown A1111 sampler 'Heun'; choose one of: DDIM, "):
        by_a1111_name("Heun")


@pytest.mark.parametrize("name", SAMPLERS)
def test_the_record_drives_setup_tables_and_step(name: str) -> None:
    rec = REGISTRY[name]
    assert rec.scheduler in schedulers.CLASS_DEFAULTS and rec.scheduler in schedulers._SETUPS
    assert set(rec.overrides) <= set(schedulers.CLASS_DEFAULTS[rec.scheduler])  # keys from_config knows
    cfg = schedulers.resolve_config(name, SD15)
    assert all(cfg[k] == v for k, v in rec.overrides.items())
    sch = samplers.make_schedule(name, SD15, 4)
    assert sch.needs_noise == rec.draws_noise
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(x) if rec.draws_noise else None
    got = samplers.step(sch, torch.tensor(1), x, x, samplers.init_state(sch, x), noise)
    want = rec.step(sch.tables, torch.tensor(1), x, x, samplers.init_state(sch, x), noise)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_allowed_steps_come_from_the_record() -> None:
    assert [n for n in SAMPLERS if REGISTRY[n].steps_key != "num_train_timesteps"] == ["lcm"]
    lcm = schedulers.resolve_config("lcm", SD15)
    assert REGISTRY["lcm"].max_steps(lcm) == (50, "original_inference_steps")
    assert REGISTRY["lcm"].max_steps({**lcm, "original_inference_steps": 2000}) == (1000, "num_train_timesteps")
    assert REGISTRY["ddim"].max_steps(schedulers.resolve_config("ddim", SD15)) == (1000, "num_train_timesteps")


def _name_literals(path: Path, names: set[str]) -> set[str]:
    """The sampler names (ours or A1111's) that appear as whole string constants in a module's code."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names}


def test_no_other_list_of_sampler_names() -> None:
    """Outside the registry a module may name one sampler (a default such as Request.sampler = "dpmpp_2m"),
    never several: a second list would have to be kept in step with the registry by hand."""
    names = set(SAMPLERS) | {s.a1111_name for s in REGISTRY.values()}
    registry = Path(inspect.getfile(sampler_registry))
    lists = {}
    for folder in ("engine", "export", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            found = _name_literals(path, names) if path != registry else set()
            if len(found) > 1:
                lists[str(path.relative_to(REPO))] = sorted(found)
    assert not lists, f"sampler names listed outside engine/sampler_registry.py: {lists}"


def test_reading_the_registry_does_not_load_torch() -> None:
    """The CLI's --help lists the samplers before torch loads: the registry and engine/png.py must not import it."""
    code = "import sys, engine.sampler_registry, engine.png; print('loaded:', 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "loaded: False" in out.stdout, out.stdout
