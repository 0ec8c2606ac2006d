"""img2img and inpainting parts of engine.samplers vs diffusers: start step from strength (get_timesteps),
add_noise tables, the first executed DPM++ step, and full img2img / inpainting-blend loops.

Every expected value comes from diffusers itself, never from our own code.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import pathlib
from types import SimpleNamespace

import pytest
import torch

from engine.samplers import SAMPLERS, add_noise, init_state, make_schedule, scale_model_input, step
from tests.sampler_cases import (  # shared with the txt2img parity tests
    ATOL,
    CONFIGS,
    EDGE_CASES,
    EXTRA_CONFIGS,
    REFERENCE,
    RTOL,
    SD15,
    SD21_V,
    SHAPE,
    seeded_bias,
    stand_in_model,
)

# ----------------------------------------------------------------------------- img2img / inpainting (strength)


def _diffusers_get_timesteps():
    """The real ``StableDiffusionImg2ImgPipeline.get_timesteps``, compiled from diffusers' source file.

    Importing the pipeline module pulls in transformers (seconds); the method only needs ``self.scheduler``.
    The inpainting pipeline's copy ("Copied from ...img2img...get_timesteps") must be the same code.
    """
    root = pathlib.Path(importlib.util.find_spec("diffusers").origin).parent / "pipelines" / "stable_diffusion"
    sources = []
    for file in ("pipeline_stable_diffusion_img2img.py", "pipeline_stable_diffusion_inpaint.py"):
        tree = ast.parse((root / file).read_text())
        fns = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_timesteps"]
        assert len(fns) == 1, file
        sources.append(ast.unparse(fns[0]))
    assert sources[0] == sources[1], "img2img and inpaint get_timesteps differ"
    scope: dict = {}
    exec(compile(sources[0], "get_timesteps", "exec"), scope)
    return scope["get_timesteps"]


GET_TIMESTEPS = _diffusers_get_timesteps()
STRENGTHS = [0.3, 0.8, 1.0]


def _ref_scheduler(name: str, config: dict, steps: int, strength: float):
    """diffusers scheduler after set_timesteps + get_timesteps (which calls set_begin_index(t_start))."""
    cls, overrides = REFERENCE[name]
    sched = cls.from_config(dict(config), **overrides)
    sched.set_timesteps(steps)
    full = sched.timesteps.clone()
    timesteps, n_run = GET_TIMESTEPS(SimpleNamespace(scheduler=sched), steps, strength, "cpu")
    return sched, full, timesteps, n_run


def _image_latents() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 = "VAE-encoded image" latents, the add_noise noise, a [B, 1, H, W] 0/1 inpainting mask)."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(SHAPE, generator=g)
    noise = torch.randn(SHAPE, generator=g)
    mask = (torch.rand((SHAPE[0], 1, *SHAPE[2:]), generator=g) > 0.5).float()
    return x0, noise, mask


def _run_reference_img2img(name: str, config: dict, steps: int, strength: float, inpaint: bool):
    """Drive diffusers like StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline (4-channel UNet)."""
    sched, _, timesteps, _ = _ref_scheduler(name, config, steps, strength)
    x0, noise, mask = _image_latents()
    bias = seeded_bias()
    gen = torch.Generator().manual_seed(123)
    latent_timestep = timesteps[:1].repeat(SHAPE[0])
    if inpaint and strength == 1.0:  # the inpainting pipeline's is_strength_max: pure noise, like txt2img
        x = noise * sched.init_noise_sigma
    else:
        x = sched.add_noise(x0, noise, latent_timestep)
    first, outs, propers = x, [], []
    for k, t in enumerate(timesteps):
        x_in = sched.scale_model_input(x, t)
        x = sched.step(stand_in_model(x_in, t, bias), t, x, generator=gen).prev_sample
        if inpaint:
            proper = x0
            if k < len(timesteps) - 1:
                proper = sched.add_noise(x0, noise, torch.tensor([timesteps[k + 1]]))
            propers.append(proper)
            x = (1 - mask) * proper + mask * x
        outs.append(x)
    return first, outs, propers


def _run_ours_img2img(name: str, config: dict, steps: int, strength: float, inpaint: bool):
    sch = make_schedule(name, config, steps, strength)
    x0, noise, mask = _image_latents()
    bias = seeded_bias()
    gen = torch.Generator().manual_seed(123)
    if inpaint and strength == 1.0:
        x = noise * sch.init_noise_sigma
    else:
        x = add_noise(sch, x0, noise, torch.tensor(sch.start))
    state = init_state(sch, x)
    first, outs, propers = x, [], []
    for k in range(sch.start, sch.num_steps):
        i = torch.tensor(k, dtype=torch.int64)
        x_in = scale_model_input(sch, x, i)
        z = torch.randn(SHAPE, generator=gen) if sch.needs_noise else None
        x, state = step(sch, i, x, stand_in_model(x_in, sch.timesteps[k], bias), state, z)
        if inpaint:
            proper = add_noise(sch, x0, noise, i + 1)  # j = N after the last step: x0 itself
            propers.append(proper)
            x = (1 - mask) * proper + mask * x
        outs.append(x)
    return first, outs, propers


def _check_img2img(name: str, config: dict, steps: int, strength: float, inpaint: bool) -> None:
    ref_first, ref_out, ref_prop = _run_reference_img2img(name, config, steps, strength, inpaint)
    first, out, prop = _run_ours_img2img(name, config, steps, strength, inpaint)
    assert len(out) == len(ref_out) >= 1 and len(prop) == len(ref_prop)
    torch.testing.assert_close(first, ref_first, atol=ATOL, rtol=RTOL, msg=lambda m: f"initial latents: {m}")
    for k, (a, b) in enumerate(zip(prop, ref_prop, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"blend latents after step {k}: {m}")
    for k, (a, b) in enumerate(zip(out, ref_out, strict=True)):
        assert torch.isfinite(a).all(), f"step {k}"
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"latents after step {k}: {m}")
    assert (ref_out[-1] - ref_first).abs().max() > 1e-3  # the loop really moved the latents


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
@pytest.mark.parametrize("name", SAMPLERS)
def test_start_matches_get_timesteps(name: str, config: str, steps: int, strength: float) -> None:
    _, full, timesteps, n_run = _ref_scheduler(name, CONFIGS[config], steps, strength)
    if n_run < 1:  # e.g. steps=1, strength 0.3: diffusers' pipelines raise too
        with pytest.raises(ValueError) as err:
            make_schedule(name, CONFIGS[config], steps, strength)
        msg = str(err.value)
        assert str(strength) in msg and f"steps={steps}" in msg and str(1 / steps) in msg
        return
    sch = make_schedule(name, CONFIGS[config], steps, strength)
    start = steps - n_run
    assert sch.start == start and sch.run_steps == n_run and sch.num_steps == steps
    torch.testing.assert_close(sch.timesteps, full.float(), atol=0, rtol=0)  # full length, unchanged
    torch.testing.assert_close(sch.timesteps[sch.start:], timesteps.float(), atol=0, rtol=0)
    for key, tab in sch.tables.items():
        assert tab.dtype == torch.float32 and tab.shape[0] in (steps, steps + 1), key
    assert sch.tables["noise_a"].shape == sch.tables["noise_b"].shape == (steps + 1,)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("steps", [4, 20])
@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
@pytest.mark.parametrize("name", SAMPLERS)
def test_img2img_parity_with_diffusers(name: str, config: str, steps: int, strength: float) -> None:
    _check_img2img(name, CONFIGS[config], steps, strength, inpaint=False)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("steps", [4, 20])
@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
@pytest.mark.parametrize("name", SAMPLERS)
def test_inpaint_blend_parity_with_diffusers(name: str, config: str, steps: int, strength: float) -> None:
    _check_img2img(name, CONFIGS[config], steps, strength, inpaint=True)


@pytest.mark.parametrize("name, config", EDGE_CASES, ids=str)
def test_img2img_and_inpaint_edge_configs(name: str, config: str) -> None:
    for steps, strength in [(3, 0.7), (14, 0.5)]:
        for inpaint in (False, True):
            _check_img2img(name, EXTRA_CONFIGS[config], steps, strength, inpaint)


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("name", SAMPLERS)
def test_add_noise_tables_every_index(name: str, steps: int) -> None:
    """Every j < N against diffusers in the inpainting-loop state (after step j - 1); j = N is (1, 0)."""
    sch = make_schedule(name, SD21_V, steps)
    sched, full, _, _ = _ref_scheduler(name, SD21_V, steps, 1.0)
    x0, noise, _ = _image_latents()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=gen) * sched.init_noise_sigma
    expected = [sched.add_noise(x0, noise, full[:1].repeat(SHAPE[0]))]  # j = 0, before any step
    for k, t in enumerate(full):
        x = sched.step(0.1 * sched.scale_model_input(x, t), t, x, generator=gen).prev_sample
        if k < steps - 1:
            expected.append(sched.add_noise(x0, noise, torch.tensor([full[k + 1]])))
    expected.append(x0)
    for j, ref in enumerate(expected):
        got = add_noise(sch, x0, noise, torch.tensor(j))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=lambda m, j=j: f"j={j}: {m}")
    assert sch.tables["noise_a"][-1] == 1 and sch.tables["noise_b"][-1] == 0
    assert add_noise(sch, x0.half(), noise.half(), torch.tensor(0)).dtype == torch.float16


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras"])
def test_dpmpp_first_executed_step_is_first_order(name: str) -> None:
    """diffusers restarts DPM++ 2M's history (lower_order_nums = 0) at the first executed step, not at 0."""
    full = make_schedule(name, SD15, 20)
    part = make_schedule(name, SD15, 20, 0.5)
    assert part.start == 10
    assert full.tables["c_d1"][10] != 0 and part.tables["c_d1"][10] == 0
    torch.testing.assert_close(part.tables["c_d1"][11:], full.tables["c_d1"][11:], atol=0, rtol=0)
    for key in full.tables.keys() - {"c_d1"}:  # nothing else depends on start
        torch.testing.assert_close(part.tables[key], full.tables[key], atol=0, rtol=0, msg=key)


def test_strength_defaults_to_txt2img() -> None:
    sch = make_schedule("euler", SD15, 10)
    assert sch.start == 0 and sch.run_steps == sch.num_steps == 10
    assert make_schedule("euler", SD15, 10, 1).start == 0  # an int 1 is a valid strength


@pytest.mark.parametrize("strength", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), -float("inf")])
def test_bad_strength(strength: float) -> None:
    with pytest.raises(ValueError) as err:
        make_schedule("ddim", SD15, 20, strength)
    msg = str(err.value)
    assert f"strength {strength!r}" in msg and "(0, 1]" in msg and "\n" not in msg


@pytest.mark.parametrize("strength", [True, "0.5", None])
def test_strength_must_be_a_number(strength) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        make_schedule("ddim", SD15, 20, strength)


def test_strength_too_small_for_steps() -> None:
    with pytest.raises(ValueError) as err:
        make_schedule("euler", SD15, 20, 0.04)  # int(20 * 0.04) = 0 steps
    msg = str(err.value)
    assert "0.04" in msg and "steps=20" in msg and "0.05" in msg and "\n" not in msg
    assert make_schedule("euler", SD15, 20, 0.05).run_steps == 1


def test_smallest_strength_is_exact_even_where_one_over_steps_is_not() -> None:
    """49 * (1 / 49) < 1 in floating point: diffusers runs 0 steps there, so 1/49 itself is refused."""
    assert int(49 * (1 / 49)) == 0
    with pytest.raises(ValueError) as err:
        make_schedule("euler", SD15, 49, 1 / 49)
    allowed = float(str(err.value).rsplit("strength >= ", 1)[1].split(" ")[0])
    assert allowed == math.nextafter(1 / 49, 1)
    sch = make_schedule("euler", SD15, 49, allowed)
    _, _, timesteps, n_run = _ref_scheduler("euler", SD15, 49, allowed)
    assert sch.start == 48 and sch.run_steps == n_run == 1
    torch.testing.assert_close(sch.timesteps[sch.start:], timesteps.float(), atol=0, rtol=0)
