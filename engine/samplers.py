"""Graph-safe samplers: precomputed per-step coefficient tables + pure step functions.

Each sampler matches one diffusers scheduler built with ``SchedulerClass.from_config(config)``:

    ddim            DDIMScheduler (eta=0)
    euler           EulerDiscreteScheduler (s_churn=0)
    euler_a         EulerAncestralDiscreteScheduler
    dpmpp_2m        DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
    dpmpp_2m_karras same, use_karras_sigmas=True
    lcm             LCMScheduler

``make_schedule`` reads timesteps / sigmas / alphas_cumprod from engine/schedulers.py, our own
bit-identical copy of the diffusers schedulers' setup (so generating never imports diffusers; the tests
compare both the tables and the sampling with diffusers).
``scale_model_input`` and ``step`` read every per-step scalar from a device table with the device
index tensor ``i`` (``index_select``): no ``.item()``, no host sync, no Python branching on step values,
so the whole denoise step can be captured in one CUDA graph. First/last-step special cases
(DPM++ 2M first order, lower_order_final, LCM's noise-free last step) are 0/1 weights in the tables.

img2img / inpainting (``strength < 1``): tables and timesteps stay full length [N]; the caller runs
``i = start .. N-1`` (``start`` as StableDiffusionImg2ImgPipeline.get_timesteps computes it) and noises the
image latents with ``add_noise`` at ``j = start`` (and at ``j = i + 1`` for the 4-channel inpainting blend).

Every sampler predicts x0 as ``x0_x[i] * x + x0_m[i] * model_output``: the prediction type
(epsilon / v_prediction / sample) is folded into those two tables.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from dataclasses import dataclass

import torch

from engine import schedulers
from engine.schedulers import SCHEDULER_CLASSES

SAMPLERS: tuple[str, ...] = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")

_DIFFUSERS = SCHEDULER_CLASSES  # sampler -> (diffusers scheduler class name, config overrides)


@dataclass(frozen=True, eq=False)
class Schedule:
    """Everything a sampler needs for one (sampler, config, steps): static facts + device tables."""

    name: str
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    timesteps: torch.Tensor  # [N] float32, the values fed to the UNet at each step
    init_noise_sigma: float  # initial latents = randn * init_noise_sigma
    needs_noise: bool  # True for euler_a and lcm: step() takes fresh noise each step
    tables: dict[str, torch.Tensor]  # per-step coefficient tables, each [N] or [N+1], float32
    start: int = 0  # first executed step index (img2img strength < 1); 0 = txt2img

    @property
    def num_steps(self) -> int:
        """N, the length of timesteps and of the per-step tables (not the number of steps run)."""
        return int(self.timesteps.shape[0])

    @property
    def run_steps(self) -> int:
        """Steps the caller actually runs: i = start .. N-1."""
        return self.num_steps - self.start

    def to(self, device, dtype=torch.float32) -> "Schedule":
        """Move tables (as ``dtype``) and timesteps (kept float32) to ``device`` once."""
        tables = {k: v.to(device=device, dtype=dtype) for k, v in self.tables.items()}
        return dataclasses.replace(self, timesteps=self.timesteps.to(device), tables=tables)


# ----------------------------------------------------------------------------- setup (host side)


def _x0_coeffs(pred: str, a: torch.Tensor, s: torch.Tensor, k: torch.Tensor | float = 1.0):
    """x0 = x0_x * x + x0_m * m for a sample x with x_vp = k * x = a * x0 + s * eps (all [N])."""
    if pred == "epsilon":
        return k / a, -s / a
    if pred == "v_prediction":
        return a * k, -s
    return torch.zeros_like(a), torch.ones_like(a)  # "sample"


def _eps_coeffs(pred: str, a: torch.Tensor, s: torch.Tensor):
    """eps = eps_x * x + eps_m * m in VP space (what DDIM uses for its direction term)."""
    if pred == "epsilon":
        return torch.zeros_like(a), torch.ones_like(a)
    if pred == "v_prediction":
        return s, a
    return 1.0 / s, -a / s  # "sample"


def _clip_table(cfg, n: int) -> dict[str, torch.Tensor]:
    """DDIM / LCM ``clip_sample``: clamp x0 to +-clip_sample_range (a table so it lives on device)."""
    if not cfg.get("clip_sample", False):
        return {}
    return {"clip": torch.full((n,), float(cfg.clip_sample_range), dtype=torch.float64)}


def _ddim_tables(sched, pred: str, start: int) -> dict[str, torch.Tensor]:
    """DDIMScheduler.step with eta=0: x' = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps.

    ``start`` is unused: DDIM's step depends only on the timestep (no first-executed-step special case).
    """
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
    return {
        "x0_x": x0_x, "x0_m": x0_m, "eps_x": eps_x, "eps_m": eps_m,
        "c_x0": a_prev.sqrt(), "c_eps": (1 - a_prev).sqrt(),
        **_clip_table(sched.config, len(t)),
    }


def _euler_base(sched, pred: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Shared Euler-family tables: input scaling and x0 coefficients in sigma space."""
    s32 = sched.sigmas.float()  # [N+1], last is 0 (or sigma_min)
    sg = s32[:-1].double()
    a = 1.0 / (sg**2 + 1).sqrt()
    x0_x, x0_m = _x0_coeffs(pred, a, sg * a, k=a)
    # same float32 arithmetic as diffusers' scale_model_input: x / (sigma**2 + 1) ** 0.5
    in_div = (s32[:-1] ** 2 + 1) ** 0.5
    return {"in_div": in_div, "x0_x": x0_x, "x0_m": x0_m, "sigmas": s32.double()}, sg


def _euler_tables(sched, pred: str, start: int) -> dict[str, torch.Tensor]:
    """EulerDiscreteScheduler.step (s_churn=0): x' = x + (x - x0) / sigma * (sigma_next - sigma).

    ``start`` is unused: the step reads sigmas[step_index] only (step_index begins at begin_index = start).
    """
    tabs, sg = _euler_base(sched, pred)
    nxt = tabs["sigmas"][1:]
    return {**tabs, "d_scale": (nxt - sg) / sg}


def _euler_a_tables(sched, pred: str, start: int) -> dict[str, torch.Tensor]:
    """EulerAncestralDiscreteScheduler.step: Euler to sigma_down, then + noise * sigma_up.

    ``start`` is unused: like Euler, no history and no first-executed-step special case.
    """
    tabs, sg = _euler_base(sched, pred)
    s32 = sched.sigmas.float()
    s_from, s_to = s32[:-1], s32[1:]  # float32 like diffusers, which computes these on the fly
    s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    s_down = (s_to**2 - s_up**2) ** 0.5
    return {**tabs, "d_scale": (s_down.double() - sg) / sg, "noise_w": s_up.double()}


def _dpmpp_2m_tables(sched, pred: str, start: int) -> dict[str, torch.Tensor]:
    """DPMSolverMultistepScheduler (dpmsolver++, order 2): x' = a*x + b*x0 + w*(x0 - x0_prev).

    The first *executed* step (index ``start``) is first order: diffusers' lower_order_nums is 0 there.
    """
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


def _lcm_tables(sched, pred: str, start: int) -> dict[str, torch.Tensor]:
    """LCMScheduler.step: boundary-condition denoised, then re-noise to the next timestep (not at the last).

    ``start`` is unused: the step reads timesteps[step_index] / [step_index + 1] and the last index only.
    """
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


def _first_step(strength, steps: int) -> int:
    """StableDiffusionImg2ImgPipeline.get_timesteps (scheduler.order == 1): index of the first executed step."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    if steps - t_start < 1:
        # smallest float s with int(steps * s) >= 1: 1 / steps itself is too small for e.g. steps=49
        s_min = 1.0 / steps
        while int(steps * s_min) < 1:
            s_min = math.nextafter(s_min, 2.0)
        raise ValueError(
            f"strength {strength!r} with steps={steps} runs 0 steps (int(steps * strength) = 0); "
            f"allowed: strength >= {s_min!r} (1/steps)"
        )
    return t_start


_TABLE_BUILDERS = {
    "ddim": _ddim_tables,
    "euler": _euler_tables,
    "euler_a": _euler_a_tables,
    "dpmpp_2m": _dpmpp_2m_tables,
    "dpmpp_2m_karras": _dpmpp_2m_tables,
    "lcm": _lcm_tables,
}


def diffusers_scheduler(name: str, scheduler_config: dict):
    """The diffusers scheduler object our sampler ``name`` reproduces: what the tests compare with (generating
    never calls this; engine/schedulers.py computes the same tables)."""
    import diffusers  # heavy import: tests and tools only

    cls_name, overrides = _DIFFUSERS[name]
    cls = getattr(diffusers, cls_name)
    # keys the class does not know are ignored by from_config anyway; dropping them first only
    # silences its "not expected and will be ignored" warning for e.g. PNDM's skip_prk_steps
    known = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in scheduler_config.items() if k in known or k.startswith("_")}
    return cls.from_config(config, **overrides)


def _max_steps(name: str, cfg: schedulers.Config) -> tuple[int, str]:
    """The most steps sampler ``name`` runs with this resolved scheduler config, and the config key that sets it."""
    n_train = cfg.num_train_timesteps
    if name == "lcm":  # LCM picks its steps among original_inference_steps distilled ones (diffusers' default 50)
        original = cfg.get("original_inference_steps", 50)
        if original <= n_train:
            return original, "original_inference_steps"
    return n_train, "num_train_timesteps"


def _steps_error(name: str, cfg: schedulers.Config, steps: int, err: ValueError) -> str:
    """Our message for a scheduler that refused ``steps``: the value, the flag and this sampler's range."""
    hi, key = _max_steps(name, cfg)
    if steps > hi:
        return (f"steps {steps} (--steps) is out of range for sampler {name}; "
                f"allowed: 1..{hi} ({key} in the model's scheduler config)")
    return f"sampler {name} cannot be set up for steps {steps} (--steps; allowed: 1..{hi}): {err}"


def _noise_tables(setup: schedulers.SchedulerSetup) -> dict[str, torch.Tensor]:
    """add_noise(x0, noise, j) = noise_a[j] * x0 + noise_b[j] * noise, each [N+1]; entry N is (1, 0).

    Entry j < N is the float32 scalar pair diffusers' ``add_noise`` multiplies by where the pipelines call it:
    sigma-indexed schedulers (Euler family, DPM-Solver) read ``sigmas[j]`` (``sigmas[begin_index]`` before the
    first step, ``sigmas[step_index]`` after step j - 1), DDIM / LCM read ``alphas_cumprod[timesteps[j]]``.
    After the last step the inpainting blend uses the clean image latents: (1, 0).
    """
    return {"noise_a": torch.cat([setup.noise_a.float(), torch.ones(1)]),
            "noise_b": torch.cat([setup.noise_b.float(), torch.zeros(1)])}


def make_schedule(name: str, scheduler_config: dict, steps: int, strength: float = 1.0) -> Schedule:
    """Build the coefficient tables of sampler ``name`` for ``steps`` steps (CPU, float32).

    ``strength`` in (0, 1] (img2img / inpainting) sets ``Schedule.start`` like diffusers' get_timesteps;
    1.0 is txt2img (start 0). Tables and timesteps are full length [N] either way.
    """
    ok = isinstance(strength, numbers.Real) and not isinstance(strength, bool) and math.isfinite(strength)
    if not (ok and 0 < strength <= 1):
        raise ValueError(f"strength {strength!r} is outside (0, 1]; allowed: a finite float in (0, 1]")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    pred = scheduler_config.get("prediction_type", "epsilon")  # the default of every class used
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {pred!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    cfg = schedulers.resolve_config(name, scheduler_config)
    n_train = cfg.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n_train:
        raise ValueError(f"steps={steps!r} is out of range; allowed: 1..{n_train} (num_train_timesteps)")
    if cfg.get("thresholding", False):
        raise ValueError(f"{name}: thresholding=True is not supported; allowed: false")
    try:
        sched = schedulers.setup(name, cfg, steps)
    except schedulers.StepsRefused as err:  # the scheduler's own limit on steps (LCM: original_inference_steps)
        raise ValueError(_steps_error(name, cfg, steps, err)) from None
    start = _first_step(strength, steps)
    tables = {**_TABLE_BUILDERS[name](sched, pred, start), **_noise_tables(sched)}
    tables = {k: v.to(torch.float32).contiguous() for k, v in tables.items()}
    bad = [k for k, v in tables.items() if not bool(torch.isfinite(v).all())]
    if bad:  # e.g. dpmpp_2m at 999-1000 steps: repeated timesteps give a zero step size (diffusers fails there too)
        raise ValueError(f"steps {steps} (--steps) is out of range for sampler {name}: its {bad[0]} coefficients "
                         "are not finite (repeated timesteps); use fewer steps")
    return Schedule(
        name=name,
        prediction_type=pred,
        timesteps=sched.timesteps.to(torch.float32),
        init_noise_sigma=float(sched.init_noise_sigma),
        needs_noise=name in ("euler_a", "lcm"),
        tables=tables,
        start=start,
    )


# ----------------------------------------------------------------------------- per step (device side)


def _at(tabs: dict[str, torch.Tensor], key: str, i: torch.Tensor) -> torch.Tensor:
    """tabs[key][i] read on device: a [1] tensor for one schedule's [N] table and a 0-d index, or [B, 1, 1, 1]
    for per-row tables [B, N] (`stack`) and per-row indices [B]; both broadcast against [B, C, H, W]."""
    table = tabs[key]
    if table.dim() == 2:
        return table.gather(1, i.reshape(-1, 1)).view(-1, 1, 1, 1)
    return table.index_select(0, i.reshape(1))


def stack(schedules: list[Schedule]) -> Schedule:
    """One schedule whose tables are per row ([B, N_max] / [B, N_max + 1]) for rows that run the same sampler with
    their own step counts and start steps (continuous batching: engine/continuous.py). Shorter tables are padded
    with their last value; a row never reads past its own N, since it leaves the batch when it is done. Read it
    with per-row step indices i [B]."""
    first = schedules[0]
    if any(s.name != first.name or s.prediction_type != first.prediction_type for s in schedules):
        raise ValueError(f"stack: one sampler per batch, got {sorted({s.name for s in schedules})}")

    def pad(ts: list[torch.Tensor]) -> torch.Tensor:  # [N_k] each -> [B, max N_k]
        n = max(t.shape[0] for t in ts)
        return torch.stack([torch.cat([t, t[-1:].expand(n - t.shape[0])]) for t in ts])

    tables = {k: pad([s.tables[k] for s in schedules]) for k in first.tables}
    return dataclasses.replace(first, timesteps=pad([s.timesteps for s in schedules]), tables=tables, start=0)


def _pred_x0(tabs, i, x, m) -> torch.Tensor:
    """x0 = x0_x[i] * x + x0_m[i] * m, clamped where the config asks for clip_sample."""
    x0 = _at(tabs, "x0_x", i) * x + _at(tabs, "x0_m", i) * m  # [B, 4, H/8, W/8]
    if "clip" in tabs:  # static fact of the schedule
        c = _at(tabs, "clip", i)
        x0 = torch.clamp(x0, min=-c, max=c)
    return x0


def _ddim_step(tabs, i, x, m, state, noise):
    x0 = _pred_x0(tabs, i, x, m)
    eps = _at(tabs, "eps_x", i) * x + _at(tabs, "eps_m", i) * m
    return _at(tabs, "c_x0", i) * x0 + _at(tabs, "c_eps", i) * eps, state


def _euler_step(tabs, i, x, m, state, noise):
    x0 = _pred_x0(tabs, i, x, m)
    return x + (x - x0) * _at(tabs, "d_scale", i), state


def _euler_a_step(tabs, i, x, m, state, noise):
    x0 = _pred_x0(tabs, i, x, m)
    return x + (x - x0) * _at(tabs, "d_scale", i) + noise.float() * _at(tabs, "noise_w", i), state


def _dpmpp_2m_step(tabs, i, x, m, state, noise):
    x0 = _pred_x0(tabs, i, x, m)  # state holds the previous step's x0 (zeros at step 0, weight 0)
    x_next = _at(tabs, "c_x", i) * x + _at(tabs, "c_x0", i) * x0 + _at(tabs, "c_d1", i) * (x0 - state)
    return x_next, x0


def _lcm_step(tabs, i, x, m, state, noise):
    x0 = _pred_x0(tabs, i, x, m)
    denoised = _at(tabs, "c_out", i) * x0 + _at(tabs, "c_skip", i) * x
    return _at(tabs, "c_den", i) * denoised + _at(tabs, "noise_w", i) * noise.float(), state


_STEPS = {
    "ddim": _ddim_step,
    "euler": _euler_step,
    "euler_a": _euler_a_step,
    "dpmpp_2m": _dpmpp_2m_step,
    "dpmpp_2m_karras": _dpmpp_2m_step,
    "lcm": _lcm_step,
}


def init_state(schedule: Schedule, latents: torch.Tensor) -> torch.Tensor:
    """Multistep state (DPM++ 2M: previous x0), float32 zeros of the latents' shape for every sampler."""
    return torch.zeros_like(latents, dtype=torch.float32)


def scale_model_input(schedule: Schedule, latents: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The UNet input at step ``i`` (0-d int64 device tensor): Euler family divides by sqrt(sigma^2 + 1)."""
    if "in_div" not in schedule.tables:
        return latents
    return (latents.float() / _at(schedule.tables, "in_div", i)).to(latents.dtype)


def add_noise(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``noise_a[j] * x0 + noise_b[j] * noise`` in float32, returned in x0's dtype; ``j`` a 0-d int64 device tensor.

    Equals diffusers' ``scheduler.add_noise(x0, noise, timesteps[j])`` where the pipelines call it:
    j = start for the img2img / inpainting initial latents (the inpainting pipeline at strength 1 starts
    from ``noise * init_noise_sigma`` instead, like txt2img), j = i + 1 after step i for the 4-channel
    inpainting blend, whose j = N gives x0 (the clean image latents).
    """
    tabs = schedule.tables
    x = _at(tabs, "noise_a", j) * x0.float() + _at(tabs, "noise_b", j) * noise.float()  # [B, 4, H/8, W/8]
    return x.to(x0.dtype)


def step(
    schedule: Schedule,
    i: torch.Tensor,
    latents: torch.Tensor,
    model_output: torch.Tensor,
    state: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampler update at step ``i``; returns (next latents in the latents' dtype, next state)."""
    if schedule.needs_noise and noise is None:
        raise ValueError(f"sampler {schedule.name!r} needs `noise` of the latents' shape at every step")
    x = latents.float()  # [B, 4, H/8, W/8]
    m = model_output.float()  # [B, 4, H/8, W/8]
    x_next, state_next = _STEPS[schedule.name](schedule.tables, i, x, m, state, noise)
    return x_next.to(latents.dtype), state_next
