"""One record per sampler: its names, the diffusers scheduler it reproduces, its tables, its step, its steps.

`REGISTRY` is the only list of samplers. engine/samplers.py builds a sampler's tables and runs its step
from its record, engine/schedulers.py sets up the scheduler class the record names, engine/png.py writes
its A1111 name, and the CLI (`--sampler`) and the server (`sampler`) accept exactly its keys.

The per-step math each record points at lives here too, as pure functions:

- ``tables(setup, prediction_type, start)`` (host side, once per schedule): per-step coefficient tables,
  each [N] or [N+1] float64, from the scheduler state engine/schedulers.py computes. Every sampler predicts
  x0 as ``x0_x[i] * x + x0_m[i] * model_output``: the prediction type is folded into those two tables, and
  first/last-step special cases (DPM++ 2M first order, lower_order_final, LCM's noise-free last step) are
  0/1 weights.
- ``step(tables, i, x, m, state, noise)`` (device side, every step): reads every per-step scalar from a
  device table with the device index tensor ``i`` (``table_at``): no ``.item()``, no host sync, no Python
  branching on step values, so the whole denoise step can be captured in one CUDA graph.

This module imports torch only inside the table builders, so the CLI's ``--help`` and engine/png.py read
the records without loading torch.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Tables = dict[str, "torch.Tensor"]
TableBuilder = Callable[[Any, str, int], Tables]  # (scheduler setup, prediction type, start) -> tables
StepFn = Callable[..., tuple["torch.Tensor", "torch.Tensor"]]  # (tables, i, x, m, state, noise) -> (x', state')


@dataclass(frozen=True, eq=False)
class Sampler:
    """Everything the engine, the CLI, the server and the image writer know about one sampler."""

    name: str  # ours: --sampler / --scheduler, the server's `sampler`, Request.sampler
    a1111_name: str  # AUTOMATIC1111's infotext `Sampler:` value (engine/png.py)
    scheduler: str  # the diffusers scheduler class it reproduces (engine/schedulers.py sets it up)
    tables: TableBuilder  # its per-step coefficient tables, each [N] or [N+1]
    step: StepFn  # its update, graph-safe: no host sync
    # config values that make that class this sampler: from_config(cfg, **overrides)
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    draws_noise: bool = False  # step() takes fresh noise every step (ancestral / LCM)
    steps_key: str = "num_train_timesteps"  # the scheduler config value that bounds steps: 1..config[steps_key]
    takes_eta: bool = False  # DDIM's eta (its tables take it; eta > 0 draws noise every step)

    def max_steps(self, cfg: Mapping[str, Any]) -> tuple[int, str]:
        """The most steps this sampler runs with a resolved scheduler config, and the config key that sets it
        (LCM: original_inference_steps, the distilled steps it picks among, unless more than the training steps)."""
        n_train = cfg["num_train_timesteps"]
        limit = cfg.get(self.steps_key, n_train)
        return (limit, self.steps_key) if limit <= n_train else (n_train, "num_train_timesteps")


# ----------------------------------------------------------------------------- tables (host side)


def _x0_coeffs(pred: str, a: torch.Tensor, s: torch.Tensor, k: torch.Tensor | float = 1.0):
    """x0 = x0_x * x + x0_m * m for a sample x with x_vp = k * x = a * x0 + s * eps (all [N])."""
    import torch

    if pred == "epsilon":
        return k / a, -s / a
    if pred == "v_prediction":
        return a * k, -s
    return torch.zeros_like(a), torch.ones_like(a)  # "sample"


def _eps_coeffs(pred: str, a: torch.Tensor, s: torch.Tensor):
    """eps = eps_x * x + eps_m * m in VP space (what DDIM uses for its direction term)."""
    import torch

    if pred == "epsilon":
        return torch.zeros_like(a), torch.ones_like(a)
    if pred == "v_prediction":
        return s, a
    return 1.0 / s, -a / s  # "sample"


def _clip_table(cfg, n: int) -> Tables:
    """DDIM / LCM ``clip_sample``: clamp x0 to +-clip_sample_range (a table so it lives on device)."""
    import torch

    if not cfg.get("clip_sample", False):
        return {}
    return {"clip": torch.full((n,), float(cfg.clip_sample_range), dtype=torch.float64)}


def _ddim_tables(sched, pred: str, start: int, eta: float = 0.0) -> Tables:
    """DDIMScheduler.step: x' = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps + std * noise, with
    std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) (0 at eta 0: no noise table then).

    ``start`` is unused: DDIM's step depends only on the timestep (no first-executed-step special case).
    """
    import torch

    ac = sched.alphas_cumprod.double()  # [T]
    t = sched.timesteps.long()  # [N]
    n_train = sched.config.num_train_timesteps
    if int(t.max()) >= n_train:  # e.g. 1000 "leading" steps + steps_offset=1 -> t=1000
        raise ValueError(
            f"ddim with steps={len(t)}: timestep {int(t.max())} >= num_train_timesteps={n_train} "
            f"(steps_offset={sched.config.steps_offset}); allowed: fewer steps or steps_offset=0"
        )
    prev = t - n_train // sched.num_inference_steps  # diffusers' rule, not the next list entry
    final = sched.final_alpha_cumprod.double()
    a_t = ac[t]
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    a, s = a_t.sqrt(), (1 - a_t).sqrt()
    x0_x, x0_m = _x0_coeffs(pred, a, s)
    eps_x, eps_m = _eps_coeffs(pred, a, s)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    return {
        "x0_x": x0_x, "x0_m": x0_m, "eps_x": eps_x, "eps_m": eps_m,
        "c_x0": a_prev.sqrt(), "c_eps": (1 - a_prev - std**2).sqrt(),
        **({"noise_w": std} if eta else {}),
        **_clip_table(sched.config, len(t)),
    }


def _euler_base(sched, pred: str) -> tuple[Tables, torch.Tensor]:
    """Shared Euler-family tables: input scaling and x0 coefficients in sigma space."""
    s32 = sched.sigmas.float()  # [N+1], last is 0 (or sigma_min)
    sg = s32[:-1].double()
    a = 1.0 / (sg**2 + 1).sqrt()
    x0_x, x0_m = _x0_coeffs(pred, a, sg * a, k=a)
    # same float32 arithmetic as diffusers' scale_model_input: x / (sigma**2 + 1) ** 0.5
    in_div = (s32[:-1] ** 2 + 1) ** 0.5
    return {"in_div": in_div, "x0_x": x0_x, "x0_m": x0_m, "sigmas": s32.double()}, sg


def _euler_tables(sched, pred: str, start: int) -> Tables:
    """EulerDiscreteScheduler.step (s_churn=0): x' = x + (x - x0) / sigma * (sigma_next - sigma).

    ``start`` is unused: the step reads sigmas[step_index] only (step_index begins at begin_index = start).
    """
    tabs, sg = _euler_base(sched, pred)
    nxt = tabs["sigmas"][1:]
    return {**tabs, "d_scale": (nxt - sg) / sg}


def _euler_a_tables(sched, pred: str, start: int) -> Tables:
    """EulerAncestralDiscreteScheduler.step: Euler to sigma_down, then + noise * sigma_up.

    ``start`` is unused: like Euler, no history and no first-executed-step special case.
    """
    tabs, sg = _euler_base(sched, pred)
    s32 = sched.sigmas.float()
    s_from, s_to = s32[:-1], s32[1:]  # float32 like diffusers, which computes these on the fly
    s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    s_down = (s_to**2 - s_up**2) ** 0.5
    return {**tabs, "d_scale": (s_down.double() - sg) / sg, "noise_w": s_up.double()}


def _dpmpp_2m_tables(sched, pred: str, start: int) -> Tables:
    """DPMSolverMultistepScheduler (dpmsolver++, order 2): x' = a*x + b*x0 + w*(x0 - x0_prev).

    The first *executed* step (index ``start``) is first order: diffusers' lower_order_nums is 0 there.
    """
    import torch

    cfg = sched.config
    if cfg.get("use_flow_sigmas", False) or cfg.get("variance_type") in ("learned", "learned_range"):
        raise ValueError("dpmpp_2m: use_flow_sigmas / learned variance_type are not supported; allowed: false / None")
    sig = sched.sigmas.double()  # [N+1]
    n = len(sig) - 1
    alpha = 1.0 / (sig**2 + 1).sqrt()
    sigma = sig * alpha
    lam = alpha.log() - sigma.log()  # [N+1], +inf at a zero final sigma
    h = lam[1:] - lam[:-1]  # [N]
    em1 = torch.exp(-h) - 1.0
    h0 = torch.cat([h.new_ones(1), h[:-1]])  # lambda_s0 - lambda_s1 (unused at step 0)
    r0 = h0 / h
    a_t = alpha[1:]
    if cfg.solver_type == "heun":
        w = a_t * (em1 / h + 1.0) / r0
    else:  # midpoint
        w = -0.5 * a_t * em1 / r0
    second = torch.ones(n, dtype=torch.bool)
    second[: start + 1] = False  # no previous x0 before / at the first executed step: first order
    if cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero":
        second[-1] = False  # lower_order_final
    x0_x, x0_m = _x0_coeffs(pred, alpha[:-1], sigma[:-1])
    return {
        "x0_x": x0_x, "x0_m": x0_m,
        "c_x": sigma[1:] / sigma[:-1], "c_x0": -a_t * em1,
        "c_d1": torch.where(second, w, torch.zeros_like(w)),
    }


def _lcm_tables(sched, pred: str, start: int) -> Tables:
    """LCMScheduler.step: boundary-condition denoised, then re-noise to the next timestep (not at the last).

    ``start`` is unused: the step reads timesteps[step_index] / [step_index + 1] and the last index only.
    """
    import torch

    cfg = sched.config
    ac = sched.alphas_cumprod.double()
    t = sched.timesteps.long()  # [N]
    n = len(t)
    prev = torch.cat([t[1:], t[-1:]])  # next timestep in the list; the last step uses its own
    a_t = ac[t]
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], sched.final_alpha_cumprod.double())
    x0_x, x0_m = _x0_coeffs(pred, a_t.sqrt(), (1 - a_t).sqrt())
    scaled = t.double() * cfg.timestep_scaling
    sigma_data = 0.5
    last = torch.arange(n) == n - 1
    return {
        "x0_x": x0_x, "x0_m": x0_m,
        "c_skip": sigma_data**2 / (scaled**2 + sigma_data**2),
        "c_out": scaled / (scaled**2 + sigma_data**2) ** 0.5,
        "c_den": torch.where(last, torch.ones_like(a_prev), a_prev.sqrt()),
        "noise_w": torch.where(last, torch.zeros_like(a_prev), (1 - a_prev).sqrt()),
        **_clip_table(cfg, n),
    }


# ----------------------------------------------------------------------------- steps (device side)


def table_at(tabs: Tables, key: str, i: torch.Tensor) -> torch.Tensor:
    """tabs[key][i] read on device: a [1] tensor for one schedule's [N] table and a 0-d index, or [B, 1, 1, 1]
    for per-row tables [B, N] (`samplers.stack`) and per-row indices [B]; both broadcast against [B, C, H, W]."""
    table = tabs[key]
    if table.dim() == 2:
        return table.gather(1, i.reshape(-1, 1)).view(-1, 1, 1, 1)
    return table.index_select(0, i.reshape(1))


def pred_x0(tabs: Tables, i: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x0 = x0_x[i] * x + x0_m[i] * m, clamped where the config asks for clip_sample."""
    x0 = table_at(tabs, "x0_x", i) * x + table_at(tabs, "x0_m", i) * m  # [B, 4, H/8, W/8]
    if "clip" in tabs:  # static fact of the schedule
        c = table_at(tabs, "clip", i)
        x0 = x0.clamp(min=-c, max=c)
    return x0


def _ddim_step(tabs, i, x, m, state, noise):
    x0 = pred_x0(tabs, i, x, m)
    eps = table_at(tabs, "eps_x", i) * x + table_at(tabs, "eps_m", i) * m
    x_next = table_at(tabs, "c_x0", i) * x0 + table_at(tabs, "c_eps", i) * eps
    if "noise_w" in tabs:  # eta > 0, a static fact of the schedule
        x_next = x_next + table_at(tabs, "noise_w", i) * noise.float()
    return x_next, state


def _euler_step(tabs, i, x, m, state, noise):
    x0 = pred_x0(tabs, i, x, m)
    return x + (x - x0) * table_at(tabs, "d_scale", i), state


def _euler_a_step(tabs, i, x, m, state, noise):
    x0 = pred_x0(tabs, i, x, m)
    return x + (x - x0) * table_at(tabs, "d_scale", i) + noise.float() * table_at(tabs, "noise_w", i), state


def _dpmpp_2m_step(tabs, i, x, m, state, noise):
    x0 = pred_x0(tabs, i, x, m)  # state holds the previous step's x0 (zeros at step 0, weight 0)
    x_next = table_at(tabs, "c_x", i) * x + table_at(tabs, "c_x0", i) * x0 + table_at(tabs, "c_d1", i) * (x0 - state)
    return x_next, x0


def _lcm_step(tabs, i, x, m, state, noise):
    x0 = pred_x0(tabs, i, x, m)
    denoised = table_at(tabs, "c_out", i) * x0 + table_at(tabs, "c_skip", i) * x
    return table_at(tabs, "c_den", i) * denoised + table_at(tabs, "noise_w", i) * noise.float(), state


# ----------------------------------------------------------------------------- the registry

_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}
_KARRAS = {"use_karras_sigmas": True, "use_exponential_sigmas": False, "use_beta_sigmas": False}

REGISTRY: Mapping[str, Sampler] = MappingProxyType({s.name: s for s in (
    Sampler("ddim", "DDIM", "DDIMScheduler", _ddim_tables, _ddim_step, takes_eta=True),
    Sampler("euler", "Euler", "EulerDiscreteScheduler", _euler_tables, _euler_step),  # s_churn=0
    Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", _euler_a_tables, _euler_a_step,
            draws_noise=True),
    Sampler("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", _dpmpp_2m_tables, _dpmpp_2m_step,
            overrides=MappingProxyType(_DPMPP_2M)),
    Sampler("dpmpp_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler", _dpmpp_2m_tables, _dpmpp_2m_step,
            overrides=MappingProxyType({**_DPMPP_2M, **_KARRAS})),
    Sampler("lcm", "LCM", "LCMScheduler", _lcm_tables, _lcm_step, draws_noise=True,
            steps_key="original_inference_steps"),
)})
SAMPLERS: tuple[str, ...] = tuple(REGISTRY)  # the names, in the order the CLI and the server list them


def get(name: str) -> Sampler:
    """The record of sampler `name`; ValueError naming it and the allowed names."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return REGISTRY[name]
