"""Parity of engine.samplers with the diffusers schedulers, plus API / graph-safety checks.

Every expected value comes from diffusers itself (scheduler built with ``from_config`` from the same
config dict, driven like StableDiffusionPipeline drives it), never from our own code.
"""
from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from engine import sampler_registry, samplers
from engine.samplers import SAMPLERS, add_noise, init_state, make_schedule, scale_model_input, step
from tests.sampler_cases import (
    ATOL,
    CONFIGS,
    EDGE_CASES,
    EXTRA_CONFIGS,
    REFERENCE,
    RTOL,
    SD15,
    SD21_V,
    SHAPE,
    diffusers_scheduler,
    seeded_bias,
    stand_in_model,
)

NOISY = {"euler_a", "lcm"}


def _run_reference(name: str, config: dict, steps: int):
    """Drive the diffusers scheduler the way StableDiffusionPipeline does; record everything."""
    cls, overrides = REFERENCE[name]
    sched = cls.from_config(dict(config), **overrides)
    sched.set_timesteps(steps)
    bias = seeded_bias()
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    inputs, outs = [], []
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        inputs.append(x_in)
        x = sched.step(stand_in_model(x_in, t, bias), t, x, generator=gen).prev_sample
        outs.append(x)
    return sched.timesteps.float(), float(sched.init_noise_sigma), inputs, outs


def _run_ours(name: str, config: dict, steps: int):
    sch = make_schedule(name, config, steps)
    bias = seeded_bias()
    gen = torch.Generator().manual_seed(123)  # same draws, same order as diffusers' randn_tensor
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sch.init_noise_sigma
    state = init_state(sch, x)
    inputs, outs = [], []
    for k in range(len(sch.timesteps)):
        i = torch.tensor(k, dtype=torch.int64)
        x_in = scale_model_input(sch, x, i)
        inputs.append(x_in)
        noise = torch.randn(SHAPE, generator=gen) if sch.needs_noise else None
        x, state = step(sch, i, x, stand_in_model(x_in, sch.timesteps[k], bias), state, noise)
        outs.append(x)
    return sch, inputs, outs


def _check_parity(name: str, config: dict, steps: int) -> None:
    ref_t, ref_sigma, ref_in, ref_out = _run_reference(name, config, steps)
    sch, our_in, our_out = _run_ours(name, config, steps)
    assert sch.timesteps.dtype == torch.float32
    torch.testing.assert_close(sch.timesteps, ref_t, atol=0, rtol=0)
    assert sch.init_noise_sigma == pytest.approx(ref_sigma, rel=1e-7)
    assert len(our_out) == len(ref_out) == steps
    before = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * ref_sigma  # the latents into step 0
    largest = 0.0
    for k, (a, b, c, d) in enumerate(zip(our_in, ref_in, our_out, ref_out, strict=True)):
        assert c.dtype == torch.float32 and torch.isfinite(c).all(), f"step {k}"
        # float32 keeps ~7 digits of the latents: zero-terminal-SNR's first sigma (~4096) makes them ~1e4, so every
        # later value carries their rounding (an ulp there is 1e-3): 4 ulps of the largest latents so far allowed
        largest = max(largest, float(before.abs().max()))
        atol = ATOL + 4 * torch.finfo(torch.float32).eps * largest
        torch.testing.assert_close(a, b, atol=atol, rtol=RTOL, msg=lambda m, k=k: f"model input, step {k}: {m}")
        torch.testing.assert_close(c, d, atol=atol, rtol=RTOL, msg=lambda m, k=k: f"latents after step {k}: {m}")
        before = d
    # the sampler really moved the latents (the comparison is not between two trivial tensors)
    assert (ref_out[-1] - ref_in[0]).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 20, 50])
@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
@pytest.mark.parametrize("name", SAMPLERS)
def test_parity_with_diffusers(name: str, config: str, steps: int) -> None:
    _check_parity(name, CONFIGS[config], steps)


@pytest.mark.parametrize("steps", [1, 3, 14, 15, 20])
@pytest.mark.parametrize("name, config", EDGE_CASES, ids=str)
def test_parity_edge_configs(name: str, config: str, steps: int) -> None:
    _check_parity(name, EXTRA_CONFIGS[config], steps)


def test_euler_a_sample_prediction_uses_model_output_as_x0() -> None:
    """diffusers has no x0-prediction Euler-a; check ours against the closed form with x0 = model output."""
    cfg = {**SD15, "prediction_type": "sample"}
    sch = make_schedule("euler_a", cfg, 5)
    ref = EulerAncestralDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(5)
    s = ref.sigmas.double()
    x, m, z = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(s_), dtype=torch.float64)
               for s_ in (3, 4, 5))
    k = 2
    up = (s[k + 1] ** 2 * (s[k] ** 2 - s[k + 1] ** 2) / s[k] ** 2) ** 0.5
    down = (s[k + 1] ** 2 - up**2) ** 0.5
    expected = x + (x - m) / s[k] * (down - s[k]) + z * up
    got, _ = step(sch, torch.tensor(k), x.float(), m.float(), init_state(sch, x.float()), z.float())
    torch.testing.assert_close(got, expected.float(), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- API and graph safety


def test_unknown_sampler_lists_choices() -> None:
    with pytest.raises(ValueError) as err:
        make_schedule("heun_xyz", SD15, 20)
    msg = str(err.value)
    assert "heun_xyz" in msg and "\n" not in msg
    assert all(n in msg for n in SAMPLERS)


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_steps_out_of_range(steps: int) -> None:
    with pytest.raises(ValueError) as err:
        make_schedule("euler", SD15, steps)
    msg = str(err.value)
    assert str(steps) in msg and "1..1000" in msg and "\n" not in msg


def test_steps_at_the_limits() -> None:
    assert len(make_schedule("euler", SD15, 1000).timesteps) == 1000
    assert len(make_schedule("ddim", {**SD15, "steps_offset": 0}, 1000).timesteps) == 1000
    # diffusers' DDIM would index alphas_cumprod[1000] here (IndexError in step); we refuse up front
    with pytest.raises(ValueError, match="steps_offset"):
        make_schedule("ddim", SD15, 1000)


@pytest.mark.parametrize("steps", [999, 1000])
def test_dpmpp_2m_at_repeated_timesteps_is_refused_not_nan(steps: int) -> None:
    """With leading spacing (tiny's DDIM config), diffusers' DPM++ raises IndexError at 1000 steps; ours gave NaN."""
    leading = {**SD15, "timestep_spacing": "leading", "steps_offset": 1}
    if steps == 1000:
        sched = diffusers_scheduler("dpmpp_2m", leading)
        sched.set_timesteps(steps)
        latents = torch.zeros(1, 4, 8, 8)
        with pytest.raises(IndexError):
            for t in sched.timesteps:
                latents = sched.step(torch.zeros_like(latents), t, latents).prev_sample
    with pytest.raises(ValueError, match=f"steps {steps} .* sampler dpmpp_2m.*not finite"):
        make_schedule("dpmpp_2m", leading, steps)
    assert torch.isfinite(make_schedule("dpmpp_2m", leading, 998).tables["c_x"]).all()


def test_unknown_prediction_type() -> None:
    with pytest.raises(ValueError) as err:
        make_schedule("ddim", {**SD15, "prediction_type": "flow_prediction"}, 20)
    msg = str(err.value)
    assert "flow_prediction" in msg and "epsilon" in msg and "v_prediction" in msg


def test_lcm_more_steps_than_original_inference_steps_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="lcm"):
        make_schedule("lcm", SD15, 51)


@pytest.mark.parametrize("name", SAMPLERS)
def test_schedule_shapes_and_move(name: str) -> None:
    sch = make_schedule(name, SD21_V, 7)
    assert sch.name == name and sch.prediction_type == "v_prediction"
    assert sch.needs_noise == (name in NOISY)
    assert sch.timesteps.shape == (7,) and sch.timesteps.dtype == torch.float32
    for key, tab in sch.tables.items():
        assert tab.dtype == torch.float32 and tab.shape[0] in (7, 8), key
    moved = sch.to("meta", torch.float16)
    assert all(t.device.type == "meta" and t.dtype == torch.float16 for t in moved.tables.values())
    assert moved.timesteps.device.type == "meta" and moved.timesteps.dtype == torch.float32
    assert sch.tables["x0_x"].device.type == "cpu"  # original untouched


_SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "nonzero", "any", "all"}
_SYNC_BUILTINS = {"float", "int", "bool"}


def _sync_calls(tree: ast.AST) -> list[str]:
    """Calls that read a tensor value back to the host: t.item(), float(t), ..."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in _SYNC_METHODS:
                found.append(f".{f.attr}()")
            elif isinstance(f, ast.Name) and f.id in _SYNC_BUILTINS:
                found.append(f"{f.id}()")
    return found


@pytest.mark.parametrize("module", [samplers, sampler_registry], ids=lambda m: m.__name__)
def test_no_item_calls_anywhere_in_samplers(module) -> None:
    """Code, not docstrings: the module docstring itself explains the .item() rule."""
    assert ".item()" not in _sync_calls(ast.parse(inspect.getsource(module)))


def test_step_functions_have_no_host_sync_calls() -> None:
    funcs = [samplers.step, samplers.scale_model_input, samplers.init_state, samplers.add_noise,
             sampler_registry.table_at, sampler_registry.pred_x0, *(s.step for s in sampler_registry.REGISTRY.values())]
    for fn in funcs:
        src = textwrap.dedent(inspect.getsource(fn))
        assert ".item(" not in src, fn.__name__  # plain grep
        calls = _sync_calls(ast.parse(src))
        assert not calls, f"{fn.__name__} calls {calls}"


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("config", ["sd15_eps", "sd21_v"])
def test_step_runs_on_meta_device(name: str, config: str) -> None:
    """Meta tensors have no values: any .item(), float(t) or `if tensor` in the step raises here."""
    cfg = {**CONFIGS[config], "clip_sample": True, "_class_name": "DDIMScheduler"}
    sch = make_schedule(name, cfg, 4).to("meta")
    x = torch.empty(SHAPE, device="meta", dtype=torch.float16)
    state = init_state(sch, x)
    noise = torch.empty(SHAPE, device="meta") if sch.needs_noise else None
    for k in range(4):
        i = torch.tensor(k, device="meta", dtype=torch.int64)
        x_in = scale_model_input(sch, x, i)
        assert x_in.shape == SHAPE and x_in.dtype == torch.float16
        x, state = step(sch, i, x, torch.empty(SHAPE, device="meta", dtype=torch.float16), state, noise)
        assert x.shape == SHAPE and x.dtype == torch.float16 and state.shape == SHAPE
        blended = add_noise(sch, x, torch.empty(SHAPE, device="meta"), i + 1)
        assert blended.shape == SHAPE and blended.dtype == torch.float16


@pytest.mark.parametrize("name", SAMPLERS)
def test_step_is_pure_and_keeps_dtype(name: str) -> None:
    sch = make_schedule(name, SD15, 10)
    g = torch.Generator().manual_seed(9)
    x, m, z, st = (torch.randn(SHAPE, generator=g) for _ in range(4))
    copies = [t.clone() for t in (x, m, z, st)]
    i = torch.tensor(3)
    a = step(sch, i, x, m, st, z)
    b = step(sch, i, x, m, st, z)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    for t, c in zip((x, m, z, st), copies, strict=True):
        torch.testing.assert_close(t, c, atol=0, rtol=0)
    half, _ = step(sch, i, x.half(), m.half(), st, z.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), a[0], atol=2e-2, rtol=2e-2)


def test_noisy_samplers_require_noise() -> None:
    sch = make_schedule("euler_a", SD15, 4)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        step(sch, torch.tensor(0), x, x, init_state(sch, x))
