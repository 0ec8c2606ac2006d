"""The setup half of the diffusers schedulers our samplers reproduce, in our own code (no diffusers import).

`setup(sampler, scheduler_config, steps)` returns what a diffusers scheduler holds after
``SchedulerClass.from_config(config, **overrides).set_timesteps(steps)``: the config as the class
resolves it (its defaults, then the model's values, then the sampler's overrides), ``alphas_cumprod``,
``final_alpha_cumprod``, ``timesteps``, ``sigmas``, ``init_noise_sigma``, and the two ``add_noise``
tables. engine/samplers.py turns these into its per-step coefficient tables.

Every line mirrors diffusers 0.42's arithmetic (same operations, same dtypes, same order: float32 torch
betas and cumprod, numpy float64 interpolation, float32 casts where diffusers casts), so the tables are
bit-identical to those read from diffusers' own scheduler objects; tests/test_scheduler_tables.py checks
that for every sampler, several step counts and many configs. Options diffusers has but these samplers
do not support (thresholding, flow sigmas, learned variance, beta sigmas) are refused with a ValueError.

The scheduler class each sampler matches, and the overrides that make it that sampler, are the sampler's
record in engine/sampler_registry.py; this module keeps what is per class (`CLASS_DEFAULTS`, `_SETUPS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.sampler_registry import REGISTRY

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}

# each class's __init__ defaults in diffusers 0.42 (tests check them against the signatures)
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {
        **_BETAS, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon",
        **_THRESHOLD, "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    },
    "EulerDiscreteScheduler": {
        **_BETAS, "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
        "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0,
        "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {
        **_BETAS, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    },
    "DPMSolverMultistepScheduler": {
        **_BETAS, "solver_order": 2, "prediction_type": "epsilon", **_THRESHOLD, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"), "variance_type": None, "timestep_spacing": "linspace",
        "steps_offset": 0, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
    "LCMScheduler": {
        **_BETAS, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
        "steps_offset": 0, "prediction_type": "epsilon", **_THRESHOLD, "timestep_spacing": "leading",
        "timestep_scaling": 10.0, "rescale_betas_zero_snr": False,
    },
}


class StepsRefused(ValueError):
    """The scheduler cannot be set up for this many steps (LCM: more than original_inference_steps)."""


class Config(dict):
    """A resolved scheduler config: a dict whose keys are also attributes (like diffusers' FrozenDict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def resolve_config(sampler: str, scheduler_config: dict[str, Any]) -> Config:
    """What ``from_config(scheduler_config, **overrides)`` makes the class's config: its __init__ defaults,
    then the keys of `scheduler_config` it knows (those `_use_default_values` lists stay defaults), then the
    sampler's overrides, with DPM-Solver's own normalisations."""
    cls_name, overrides = REGISTRY[sampler].scheduler, REGISTRY[sampler].overrides
    defaults = CLASS_DEFAULTS[cls_name]
    keep_default = set(scheduler_config.get("_use_default_values", []))
    given = {k: v for k, v in scheduler_config.items() if k in defaults and k not in keep_default}
    cfg = Config({**defaults, **given, **overrides})
    if cls_name == "DPMSolverMultistepScheduler":
        if cfg.solver_type in ("logrho", "bh1", "bh2"):  # diffusers maps these to midpoint
            cfg["solver_type"] = "midpoint"
        elif cfg.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"{sampler}: solver_type {cfg.solver_type!r} is not supported; allowed: midpoint, heun")
        if cfg.get("use_flow_sigmas") or cfg.get("variance_type") in ("learned", "learned_range"):
            raise ValueError(f"{sampler}: use_flow_sigmas / learned variance_type are not supported; "
                             "allowed: false / None")
    if cfg.get("use_beta_sigmas"):
        raise ValueError(f"{sampler}: use_beta_sigmas is not supported; allowed: false")
    if sum(bool(cfg.get(k)) for k in ("use_beta_sigmas", "use_exponential_sigmas", "use_karras_sigmas")) > 1:
        raise ValueError(f"{sampler}: only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas "
                         "can be set")
    return cfg


@dataclass(eq=False)
class SchedulerSetup:
    """A diffusers scheduler's state after ``set_timesteps(steps)``, as the sampler tables read it."""

    config: Config
    alphas_cumprod: torch.Tensor  # [T] float32
    final_alpha_cumprod: torch.Tensor | None  # 0-d float32 (DDIM, LCM)
    timesteps: torch.Tensor  # [N]: int64 (DDIM, DPM-Solver, LCM) or float32 (Euler family)
    sigmas: torch.Tensor | None  # [N+1] float32 (Euler family, DPM-Solver)
    init_noise_sigma: float
    num_inference_steps: int
    noise_a: torch.Tensor  # [N] float32: add_noise(x0, noise, timesteps[j]) = noise_a[j] * x0 + noise_b[j] * noise
    noise_b: torch.Tensor
    order: int = 1


# ----------------------------------------------------------------------------- betas and alphas


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The Glide cosine schedule (``squaredcos_cap_v2``), as diffusers' betas_for_alpha_bar("cosine")."""

    def alpha_bar_fn(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled to zero terminal SNR (https://huggingface.co/papers/2305.08891, Algorithm 1)."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_T
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = torch.cat([alphas_bar[0:1], alphas])
    return 1 - alphas


def betas(cfg: Config, name: str) -> torch.Tensor:
    """[T] float32 betas of the config (trained_betas, linear, scaled_linear or squaredcos_cap_v2)."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        b = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        b = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        b = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        b = betas_for_alpha_bar(n)
    else:
        raise ValueError(f"{name}: beta_schedule {cfg.beta_schedule!r} is not supported; allowed: linear, "
                         "scaled_linear, squaredcos_cap_v2 (or trained_betas)")
    if cfg.rescale_betas_zero_snr:
        b = rescale_zero_terminal_snr(b)
    return b


def alphas_cumprod(cfg: Config, name: str, sigma_family: bool) -> torch.Tensor:
    """[T] float32; the Euler family and DPM-Solver keep the last entry off zero after zero-SNR rescaling."""
    ac = torch.cumprod(1.0 - betas(cfg, name), dim=0)
    if cfg.rescale_betas_zero_snr and sigma_family:
        ac[-1] = 2**-24  # so the first sigma is not inf (fp16's smallest subnormal, as diffusers)
    return ac


# ----------------------------------------------------------------------------- timesteps


def _spacing_error(name: str, spacing: Any) -> ValueError:
    return ValueError(f"{name}: timestep_spacing {spacing!r} is not supported; allowed: linspace, leading, trailing")


def _int_timesteps(cfg: Config, steps: int, name: str) -> np.ndarray:
    """DDIMScheduler.set_timesteps: int64 [N]."""
    n_train = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, steps).round()[::-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        step_ratio = n_train // steps
        t = (np.arange(0, steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        t += cfg.steps_offset
        return t
    if cfg.timestep_spacing == "trailing":
        step_ratio = n_train / steps
        t = np.round(np.arange(n_train, 0, -step_ratio)).astype(np.int64)
        t -= 1
        return t
    raise _spacing_error(name, cfg.timestep_spacing)


def _float_timesteps(cfg: Config, steps: int, name: str) -> np.ndarray:
    """Euler(-ancestral)Scheduler.set_timesteps: float32 [N]."""
    n_train = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        step_ratio = n_train // steps
        t = (np.arange(0, steps) * step_ratio).round()[::-1].copy().astype(np.float32)
        t += cfg.steps_offset
        return t
    if cfg.timestep_spacing == "trailing":
        step_ratio = n_train / steps
        t = (np.arange(n_train, 0, -step_ratio)).round().copy().astype(np.float32)
        t -= 1
        return t
    raise _spacing_error(name, cfg.timestep_spacing)


# ----------------------------------------------------------------------------- sigma schedules


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of a sigma, interpolated in log-sigma space."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def _timesteps_of(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """_sigma_to_t of each sigma, one at a time (as diffusers: the same float operations per element)."""
    return np.array([_sigma_to_t(sigma, log_sigmas) for sigma in sigmas])


def _sigma_range(cfg: Config, in_sigmas: np.ndarray) -> tuple[float, float]:
    sigma_min = cfg.get("sigma_min")  # only the Euler scheduler has sigma_min / sigma_max
    sigma_max = cfg.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return sigma_min, sigma_max


def _karras(cfg: Config, in_sigmas: np.ndarray, steps: int) -> np.ndarray:
    """Karras et al. (2022) sigmas, rho = 7."""
    sigma_min, sigma_max = _sigma_range(cfg, in_sigmas)
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _exponential(cfg: Config, in_sigmas: np.ndarray, steps: int) -> np.ndarray:
    sigma_min, sigma_max = _sigma_range(cfg, in_sigmas)
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def _lu_lambdas(in_lambdas: np.ndarray, steps: int) -> np.ndarray:
    """Lu et al. (2022) lambdas, rho = 1."""
    lambda_min: float = in_lambdas[-1].item()
    lambda_max: float = in_lambdas[0].item()
    rho = 1.0
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = lambda_min ** (1 / rho)
    max_inv_rho = lambda_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _final_sigma(cfg: Config, ac: torch.Tensor, name: str):
    if cfg.final_sigmas_type == "sigma_min":
        return ((1 - ac[0]) / ac[0]) ** 0.5
    if cfg.final_sigmas_type == "zero":
        return 0
    raise ValueError(f"{name}: final_sigmas_type {cfg.final_sigmas_type!r} is not supported; allowed: zero, sigma_min")


# ----------------------------------------------------------------------------- per scheduler


def _ddim(cfg: Config, steps: int, name: str) -> SchedulerSetup:
    """DDIMScheduler (also the alphas / final alpha of LCMScheduler, set up separately below)."""
    ac = alphas_cumprod(cfg, name, sigma_family=False)
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]
    timesteps = torch.from_numpy(_int_timesteps(cfg, steps, name))
    n_train = cfg.num_train_timesteps
    if int(timesteps.max()) >= n_train:  # e.g. 1000 "leading" steps + steps_offset=1 -> t=1000
        raise ValueError(
            f"ddim with steps={len(timesteps)}: timestep {int(timesteps.max())} >= num_train_timesteps={n_train} "
            f"(steps_offset={cfg.steps_offset}); allowed: fewer steps or steps_offset=0"
        )
    return _alpha_setup(cfg, ac, final, timesteps, steps)


def _lcm(cfg: Config, steps: int, name: str) -> SchedulerSetup:
    """LCMScheduler.set_timesteps(steps) (strength 1): evenly spaced picks of the distillation schedule."""
    ac = alphas_cumprod(cfg, name, sigma_family=False)
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]
    n_train = cfg.num_train_timesteps
    original_steps = cfg.original_inference_steps
    if original_steps > n_train:
        raise StepsRefused(f"original_inference_steps {original_steps} is larger than num_train_timesteps {n_train}")
    k = n_train // original_steps
    lcm_origin_timesteps = np.asarray(list(range(1, int(original_steps * 1.0) + 1))) * k - 1
    skipping_step = len(lcm_origin_timesteps) // steps
    if skipping_step < 1 or steps > original_steps:
        raise StepsRefused(f"steps {steps} is larger than original_inference_steps {original_steps}")
    lcm_origin_timesteps = lcm_origin_timesteps[::-1].copy()
    inference_indices = np.linspace(0, len(lcm_origin_timesteps), num=steps, endpoint=False)
    inference_indices = np.floor(inference_indices).astype(np.int64)
    timesteps = torch.from_numpy(lcm_origin_timesteps[inference_indices]).to(dtype=torch.long)
    return _alpha_setup(cfg, ac, final, timesteps, steps)


def _alpha_setup(cfg: Config, ac: torch.Tensor, final: torch.Tensor, timesteps: torch.Tensor,
                 steps: int) -> SchedulerSetup:
    """add_noise of the alphas_cumprod schedulers: sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * noise, in float32."""
    a = ac[timesteps]
    return SchedulerSetup(config=cfg, alphas_cumprod=ac, final_alpha_cumprod=final, timesteps=timesteps, sigmas=None,
                          init_noise_sigma=1.0, num_inference_steps=steps, noise_a=a**0.5, noise_b=(1 - a) ** 0.5)


def _euler_init_noise_sigma(cfg: Config, sigmas: torch.Tensor) -> float:
    max_sigma = sigmas.max()
    if cfg.timestep_spacing in ["linspace", "trailing"]:
        return float(max_sigma)
    return float((max_sigma**2 + 1) ** 0.5)


def _sigma_setup(cfg: Config, ac: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor, steps: int,
                 init_noise_sigma: float, vp: bool) -> SchedulerSetup:
    """add_noise of the sigma-indexed schedulers at index j: Euler x0 + sigma * noise (`vp` False), DPM-Solver
    alpha_t * x0 + sigma_t * noise with alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t."""
    sigma = sigmas[: len(timesteps)]
    if vp:
        noise_a = 1 / ((sigma**2 + 1) ** 0.5)
        noise_b = sigma * noise_a
    else:
        noise_a, noise_b = torch.ones_like(sigma), sigma.clone()
    return SchedulerSetup(config=cfg, alphas_cumprod=ac, final_alpha_cumprod=None, timesteps=timesteps, sigmas=sigmas,
                          init_noise_sigma=init_noise_sigma, num_inference_steps=steps, noise_a=noise_a,
                          noise_b=noise_b)


def _euler(cfg: Config, steps: int, name: str) -> SchedulerSetup:
    """EulerDiscreteScheduler.set_timesteps(steps)."""
    ac = alphas_cumprod(cfg, name, sigma_family=True)
    timesteps = _float_timesteps(cfg, steps, name)
    sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    log_sigmas = np.log(sigmas)
    if cfg.interpolation_type == "linear":
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    elif cfg.interpolation_type == "log_linear":
        sigmas = torch.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), steps + 1).exp().numpy()
    else:
        raise ValueError(f"{name}: interpolation_type {cfg.interpolation_type!r} is not supported; "
                         "allowed: linear, log_linear")
    if cfg.use_karras_sigmas:
        sigmas = _karras(cfg, sigmas, steps)
        timesteps = _timesteps_of(sigmas, log_sigmas)
    elif cfg.use_exponential_sigmas:
        sigmas = _exponential(cfg, sigmas, steps)
        timesteps = _timesteps_of(sigmas, log_sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(cfg, ac, name)]]).astype(np.float32)
    sig = torch.from_numpy(sigmas).to(dtype=torch.float32)
    if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
        t = torch.Tensor([0.25 * sigma.log() for sigma in sig[:-1]])
    else:
        t = torch.from_numpy(timesteps.astype(np.float32))
    return _sigma_setup(cfg, ac, t, sig, steps, _euler_init_noise_sigma(cfg, sig), vp=False)


def _euler_a(cfg: Config, steps: int, name: str) -> SchedulerSetup:
    """EulerAncestralDiscreteScheduler.set_timesteps(steps)."""
    ac = alphas_cumprod(cfg, name, sigma_family=True)
    timesteps = _float_timesteps(cfg, steps, name)
    sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    sig = torch.from_numpy(sigmas)
    return _sigma_setup(cfg, ac, torch.from_numpy(timesteps), sig, steps, _euler_init_noise_sigma(cfg, sig), vp=False)


def _dpm(cfg: Config, steps: int, name: str) -> SchedulerSetup:
    """DPMSolverMultistepScheduler.set_timesteps(steps)."""
    ac = alphas_cumprod(cfg, name, sigma_family=True)
    n_train = cfg.num_train_timesteps
    lambda_t = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
    clipped_idx = torch.searchsorted(torch.flip(lambda_t, [0]), cfg.lambda_min_clipped)
    last_timestep = ((n_train - clipped_idx).numpy()).item()
    if cfg.timestep_spacing == "linspace":
        timesteps = np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        step_ratio = last_timestep // (steps + 1)
        timesteps = (np.arange(0, steps + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
        timesteps += cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        step_ratio = n_train / steps
        timesteps = np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64)
        timesteps -= 1
    else:
        raise _spacing_error(name, cfg.timestep_spacing)
    sigmas = (((1 - ac) / ac) ** 0.5).numpy()
    log_sigmas = np.log(sigmas)
    if cfg.use_karras_sigmas:
        sigmas = np.flip(sigmas).copy()
        sigmas = _karras(cfg, sigmas, steps)
        timesteps = _timesteps_of(sigmas, log_sigmas)
        if cfg.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    elif cfg.use_lu_lambdas:
        lambdas = np.flip(log_sigmas.copy())
        lambdas = _lu_lambdas(lambdas, steps)
        sigmas = np.exp(lambdas)
        timesteps = _timesteps_of(sigmas, log_sigmas)
        if cfg.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    elif cfg.use_exponential_sigmas:
        sigmas = np.flip(sigmas).copy()
        sigmas = _exponential(cfg, sigmas, steps)
        timesteps = _timesteps_of(sigmas, log_sigmas)
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(cfg, ac, name)]]).astype(np.float32)
    t = torch.from_numpy(timesteps).to(dtype=torch.int64)
    return _sigma_setup(cfg, ac, t, torch.from_numpy(sigmas), len(timesteps), 1.0, vp=True)


_SETUPS = {
    "DDIMScheduler": _ddim,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_a,
    "DPMSolverMultistepScheduler": _dpm,
    "LCMScheduler": _lcm,
}


def setup(sampler: str, cfg: Config, steps: int) -> SchedulerSetup:
    """The scheduler state of `sampler` for a config from `resolve_config`, after set_timesteps(steps).
    ValueError for a config option these samplers do not support or steps the scheduler refuses."""
    return _SETUPS[REGISTRY[sampler].scheduler](cfg, steps, sampler)
