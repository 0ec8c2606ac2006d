"""engine/schedulers.py (our own scheduler setup, no diffusers at run time) against diffusers' schedulers.

For every sampler, several step counts and many configs (the presets' config, SD 1.5 / 2.1 / SDXL model
folders' configs, and the edge configs of tests/sampler_cases.py), the state a diffusers scheduler holds after
``from_config(config, **overrides).set_timesteps(steps)`` must equal ours bit for bit: alphas_cumprod,
final_alpha_cumprod, timesteps (values and dtype), sigmas, init_noise_sigma, and the scalars ``add_noise``
multiplies by at each step. Then every coefficient table `make_schedule` returns must equal, bit for bit,
the table built from the diffusers scheduler object (what the samplers did before), img2img start included.
"""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import sampler_registry, samplers, schedulers
from engine.samplers import SAMPLERS, make_schedule
from export.presets import PRESETS
from tests.sampler_cases import CONFIGS, EXTRA_CONFIGS, SD15, diffusers_scheduler

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
SDXL_FOLDER = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
MORE = {
    "sdxl_folder": SDXL_FOLDER,
    "cosine_linspace": {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"},
    "linear_trailing_zsnr_v": {"beta_schedule": "linear", "timestep_spacing": "trailing",
                               "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    "exponential_sigmas": {**SD15, "use_exponential_sigmas": True},
    "lu_lambdas": {**SD15, "use_lu_lambdas": True},
    "euler_karras_continuous_v": {**CONFIGS["sd21_v"], "use_karras_sigmas": True, "timestep_type": "continuous",
                                  "sigma_min": 0.05, "sigma_max": 10.0},
    "cosine_lambda_clipped_karras": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
                                     "use_karras_sigmas": True},
    "trained_betas": {"trained_betas": torch.linspace(1e-4, 0.02, 1000).tolist(), "timestep_spacing": "trailing"},
    "defaults_listed": {**SD15, "_use_default_values": ["steps_offset", "timestep_spacing"]},
}
PRESET_CONFIGS = {f"preset_{p.prediction_type}": p.scheduler.config(p.prediction_type) for p in PRESETS.values()}
ALL = {**PRESET_CONFIGS, **CONFIGS, **EXTRA_CONFIGS, **MORE}
STEPS = [1, 2, 3, 7, 15, 25, 50]


def _reference(name: str, config: dict, steps: int):
    sched = diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    return sched


def _reference_noise(sched) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 scalars diffusers' add_noise multiplies x0 and noise by at step j, driven as the pipelines
    drive it (set_begin_index(j) for the sigma-indexed schedulers, timesteps[j] for the others)."""
    n = len(sched.timesteps)
    one, zero = torch.ones(1), torch.zeros(1)
    a, b = torch.ones(n), torch.zeros(n)
    for j in range(n):
        t = sched.timesteps[j: j + 1]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(j)
        a[j] = sched.add_noise(one, zero, t)[0]
        b[j] = sched.add_noise(zero, one, t)[0]
    return a, b


def _equal(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    torch.testing.assert_close(ours, ref, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", list(ALL), ids=str)
@pytest.mark.parametrize("name", SAMPLERS)
def test_setup_equals_diffusers_bit_for_bit(name: str, config: str, steps: int) -> None:
    cfg = ALL[config]
    try:
        ref = _reference(name, cfg, steps)
    except ValueError as err:  # e.g. LCM with more steps than original_inference_steps
        with pytest.raises(ValueError):
            schedulers.setup(name, schedulers.resolve_config(name, cfg), steps)
        pytest.skip(f"diffusers refuses it too: {err}")
    ours = schedulers.setup(name, schedulers.resolve_config(name, cfg), steps)
    for key, value in ours.config.items():  # the config as the class resolved it
        assert ref.config[key] == value or (value != value and ref.config[key] != ref.config[key]), key
    _equal(ours.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod")
    _equal(ours.timesteps, ref.timesteps, "timesteps")
    assert ours.num_inference_steps == ref.num_inference_steps
    assert ours.init_noise_sigma == float(ref.init_noise_sigma)
    if hasattr(ref, "final_alpha_cumprod"):
        _equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod, "final_alpha_cumprod")
    else:
        assert ours.final_alpha_cumprod is None
    if hasattr(ref, "sigmas"):
        _equal(ours.sigmas, ref.sigmas, "sigmas")
    else:
        assert ours.sigmas is None
    a, b = _reference_noise(ref)
    _equal(ours.noise_a, a, "add_noise x0 scale")
    _equal(ours.noise_b, b, "add_noise noise scale")


def _reference_tables(name: str, config: dict, steps: int, strength: float) -> dict[str, torch.Tensor]:
    """The tables as the samplers built them from the diffusers scheduler object."""
    sched = _reference(name, config, steps)
    pred = config.get("prediction_type", "epsilon")
    start = samplers._first_step(strength, steps)
    a, b = _reference_noise(sched)
    tables = {**sampler_registry.REGISTRY[name].tables(sched, pred, start),
              "noise_a": torch.cat([a, torch.ones(1)]), "noise_b": torch.cat([b, torch.zeros(1)])}
    return {k: v.to(torch.float32).contiguous() for k, v in tables.items()}


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("steps", [1, 4, 25])
@pytest.mark.parametrize("config", [*PRESET_CONFIGS, "sd15_eps", "sd21_v", "zsnr_trailing_v", "sample_clip",
                                    "leading_sigma_min", "knobs", "sdxl_folder", "lu_lambdas"], ids=str)
@pytest.mark.parametrize("name", SAMPLERS)
def test_make_schedule_tables_equal_those_from_diffusers(name: str, config: str, steps: int, strength: float) -> None:
    cfg = ALL[config]
    if int(steps * strength) < 1:  # runs no step: refused (test_samplers_img2img checks the message)
        with pytest.raises(ValueError, match="strength"):
            make_schedule(name, cfg, steps, strength)
        return
    sch = make_schedule(name, cfg, steps, strength)
    ref = _reference_tables(name, cfg, steps, strength)
    assert sch.start == samplers._first_step(strength, steps)
    assert sorted(sch.tables) == sorted(ref)
    for key in ref:
        _equal(sch.tables[key], ref[key], key)
    _equal(sch.timesteps, _reference(name, cfg, steps).timesteps.to(torch.float32), "timesteps")


@pytest.mark.parametrize("cls_name", sorted(schedulers.CLASS_DEFAULTS))
def test_class_defaults_are_diffusers_defaults(cls_name: str) -> None:
    """Our copy of each class's __init__ defaults (what from_config fills in) is the installed diffusers'."""
    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    theirs = {k: p.default for k, p in params.items() if k not in ("self", "kwargs")}
    assert schedulers.CLASS_DEFAULTS[cls_name] == theirs


UNSUPPORTED = [
    *[(n, {"beta_schedule": "sigmoid"}, "beta_schedule") for n in SAMPLERS],
    *[(n, {"timestep_spacing": "odd"}, "timestep_spacing") for n in ("ddim", "euler", "euler_a", "dpmpp_2m")],
    *[(n, {"use_beta_sigmas": True}, "use_beta_sigmas") for n in ("euler", "dpmpp_2m")],
    *[(n, {"use_flow_sigmas": True}, "use_flow_sigmas") for n in ("dpmpp_2m", "dpmpp_2m_karras")],
    *[(n, {"final_sigmas_type": "other"}, "final_sigmas_type") for n in ("euler", "dpmpp_2m")],
    ("dpmpp_2m", {"solver_type": "other"}, "solver_type"),
    ("euler", {"interpolation_type": "other"}, "interpolation_type"),
    ("euler", {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of"),
]


@pytest.mark.parametrize("name, bad, message", UNSUPPORTED, ids=str)
def test_unsupported_options_are_one_line_value_errors(name: str, bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        make_schedule(name, {**SD15, **bad}, 10)
    assert "\n" not in str(err.value)


def test_generating_imports_neither_diffusers_nor_transformers(ort_engines, tmp_path) -> None:
    """Tables, tokenizer and engines of a tiny engine dir load and run without diffusers or transformers."""
    code = f"""
import sys
from engine.pipeline import Pipeline
from engine.request import Request
pipe = Pipeline.load({str(ort_engines)!r})
for sampler in {list(SAMPLERS)!r}:
    pipe.schedule(sampler, 4, None)
    pipe.schedule(sampler, 4, 0.5)
pipe.run(Request(prompt="a lighthouse", steps=2, height=32, width=32), progress=False)
heavy = [m for m in ("diffusers", "transformers", "scipy", "sympy") if m in sys.modules]
print("heavy:", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout, out.stdout
