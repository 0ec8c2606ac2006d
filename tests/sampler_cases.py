"""The sampler parity tests' shared cases (tests/test_samplers.py, test_samplers_img2img.py,
test_scheduler_tables.py, test_sampler_registry.py): scheduler configs, the diffusers scheduler each sampler must
reproduce, tolerances, latent shape and a deterministic stand-in for the UNet; and `diffusers_scheduler`, the
diffusers scheduler object that the pipeline parity tests put into their diffusers reference pipelines.

Every expected value comes from diffusers itself, never from our own code.
"""
from __future__ import annotations

import inspect

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from engine import sampler_registry
from engine.samplers import SAMPLERS

ATOL = RTOL = 1e-5
SHAPE = (2, 4, 8, 8)  # [B, 4, H/8, W/8]

SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
SD21_V = {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
CONFIGS = {"sd15_eps": SD15, "sd21_v": SD21_V}
# extra coverage: zero-SNR + trailing (v-pred), x0-prediction with clipping, sigma_min final, other knobs
EXTRA_CONFIGS = {
    "zsnr_trailing_v": {**SD21_V, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    "sample_clip": {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "sample", "clip_sample": True,
                    "clip_sample_range": 0.8},
    "leading_sigma_min": {**SD15, "timestep_spacing": "leading", "final_sigmas_type": "sigma_min"},
    # DPM++: heun solver; LCM: another distillation grid, small boundary scaling. (Not with sigma_min:
    # karras + sigma_min repeats the last sigma, h = 0, and diffusers' heun update is NaN there.)
    "knobs": {**SD15, "_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun",
              "lower_order_final": False, "timestep_spacing": "trailing",
              "original_inference_steps": 100, "timestep_scaling": 0.01},
}

# Written out independently of engine.samplers: the scheduler each sampler must reproduce.
REFERENCE = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": (LCMScheduler, {}),
}

# diffusers' Euler-a has no x0 ("sample") prediction; that pair is checked against the closed form in
# tests/test_samplers.py
EDGE_CASES = [(n, c) for n in SAMPLERS for c in EXTRA_CONFIGS
              if not (n == "euler_a" and EXTRA_CONFIGS[c]["prediction_type"] == "sample")]


def seeded_bias() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def stand_in_model(x: torch.Tensor, t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in for the guided UNet output: depends on the current input and timestep."""
    return 0.5 * x + 0.1 * t.float() / 1000 + 0.3 * bias


def diffusers_scheduler(name: str, scheduler_config: dict):
    """The diffusers scheduler object our sampler `name` reproduces: the class its registry record names, built
    with the record's overrides (generating never builds one; engine/schedulers.py computes the same tables)."""
    sampler = sampler_registry.get(name)
    cls = getattr(diffusers, sampler.scheduler)
    # keys the class does not know are ignored by from_config anyway; dropping them first only
    # silences its "not expected and will be ignored" warning for e.g. PNDM's skip_prk_steps
    known = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in scheduler_config.items() if k in known or k.startswith("_")}
    return cls.from_config(config, **sampler.overrides)
