"""Graph-safe samplers: precomputed per-step coefficient tables + pure step functions.

Each sampler matches one diffusers scheduler built with ``SchedulerClass.from_config(config, **overrides)``;
its record in engine/sampler_registry.py (`REGISTRY`) names the class and overrides, its table builder and
its step function.

``make_schedule`` reads timesteps / sigmas / alphas_cumprod from engine/schedulers.py, our own
bit-identical copy of the diffusers schedulers' setup (so generating never imports diffusers; the tests
compare both the tables and the sampling with diffusers).
``scale_model_input`` and ``step`` read every per-step scalar from a device table with the device
index tensor ``i`` (``index_select``): no ``.item()``, no host sync, no Python branching on step values,
so the whole denoise step can be captured in one CUDA graph.

img2img / inpainting (``strength < 1``): tables and timesteps stay full length [N]; the caller runs
``i = start .. N-1`` (``start`` as StableDiffusionImg2ImgPipeline.get_timesteps computes it) and noises the
image latents with ``add_noise`` at ``j = start`` (and at ``j = i + 1`` for the 4-channel inpainting blend).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from engine import sampler_registry, schedulers
from engine.sampler_registry import table_at

SAMPLERS: tuple[str, ...] = sampler_registry.SAMPLERS  # the registry's names (callers import them from here too)
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True, eq=False)
class Schedule:
    """Everything a sampler needs for one (sampler, config, steps): static facts + device tables."""

    name: str
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    timesteps: torch.Tensor  # [N] float32, the values fed to the UNet at each step
    init_noise_sigma: float  # initial latents = randn * init_noise_sigma
    needs_noise: bool  # the record's draws_noise (euler_a, lcm): step() takes fresh noise each step
    tables: dict[str, torch.Tensor]  # per-step coefficient tables, each [N] or [N+1], float32
    start: int = 0  # first executed step index (img2img strength < 1); 0 = txt2img
    end: int | None = None  # the step index the run stops before (a base model handing over); None = N

    @property
    def num_steps(self) -> int:
        """N, the length of timesteps and of the per-step tables (not the number of steps run)."""
        return int(self.timesteps.shape[0])

    @property
    def stop(self) -> int:
        """The index after the last executed step: N, or `end` for a pass that hands over before the end."""
        return self.num_steps if self.end is None else self.end

    @property
    def run_steps(self) -> int:
        """Steps the caller actually runs: i = start .. stop-1."""
        return self.stop - self.start

    def to(self, device, dtype=torch.float32) -> Schedule:
        """Move tables (as ``dtype``) and timesteps (kept float32) to ``device`` once."""
        tables = {k: v.to(device=device, dtype=dtype) for k, v in self.tables.items()}
        return dataclasses.replace(self, timesteps=self.timesteps.to(device), tables=tables)


# ----------------------------------------------------------------------------- setup (host side)


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


def _steps_error(name: str, cfg: schedulers.Config, steps: int, err: ValueError) -> str:
    """Our message for a scheduler that refused ``steps``: the value and this sampler's range."""
    hi, key = sampler_registry.get(name).max_steps(cfg)
    if steps > hi:
        return (f"steps {steps} is out of range for sampler {name}; "
                f"allowed: 1..{hi} ({key} in the model's scheduler config)")
    return f"sampler {name} cannot be set up for steps {steps} (allowed: 1..{hi}): {err}"


def _noise_tables(setup: schedulers.SchedulerSetup) -> dict[str, torch.Tensor]:
    """add_noise(x0, noise, j) = noise_a[j] * x0 + noise_b[j] * noise, each [N+1]; entry N is (1, 0).

    Entry j < N is the float32 scalar pair diffusers' ``add_noise`` multiplies by where the pipelines call it:
    sigma-indexed schedulers (Euler family, DPM-Solver) read ``sigmas[j]`` (``sigmas[begin_index]`` before the
    first step, ``sigmas[step_index]`` after step j - 1), DDIM / LCM read ``alphas_cumprod[timesteps[j]]``.
    After the last step the inpainting blend uses the clean image latents: (1, 0).
    """
    return {"noise_a": torch.cat([setup.noise_a.float(), torch.ones(1)]),
            "noise_b": torch.cat([setup.noise_b.float(), torch.zeros(1)])}


def make_schedule(name: str, scheduler_config: dict, steps: int, strength: float = 1.0,
                  start: int | None = None, eta: float = 0.0) -> Schedule:
    """Build the coefficient tables of sampler ``name`` for ``steps`` steps (CPU, float32).

    ``strength`` in (0, 1] (img2img / inpainting) sets ``Schedule.start`` like diffusers' get_timesteps;
    1.0 is txt2img (start 0). ``start``, when given, is the first executed step itself (a model taking over
    another's latents mid-schedule, as diffusers' ``denoising_start``). Tables and timesteps are full length [N].
    ``eta``: DDIM's (its step then takes noise); ValueError for another sampler's non-zero eta.
    """
    ok = isinstance(strength, numbers.Real) and not isinstance(strength, bool) and math.isfinite(strength)
    if not (ok and 0 < strength <= 1):
        raise ValueError(f"strength {strength!r} is outside (0, 1]; allowed: a finite float in (0, 1]")
    sampler = sampler_registry.get(name)  # ValueError for an unknown name, listing the registry's
    if eta and not sampler.takes_eta:
        raise ValueError(f"sampler {name} takes no eta (eta {eta!r}); allowed: eta 0, or a sampler that takes it "
                         f"({', '.join(s.name for s in sampler_registry.REGISTRY.values() if s.takes_eta)})")
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
    if start is None:
        start = _first_step(strength, steps)
    elif isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < steps:
        raise ValueError(f"start {start!r} must be a step index in [0, {steps - 1}]")
    tables = {**sampler.tables(sched, pred, start, **({"eta": eta} if eta else {})), **_noise_tables(sched)}
    tables = {k: v.to(torch.float32).contiguous() for k, v in tables.items()}
    bad = [k for k, v in tables.items() if not bool(torch.isfinite(v).all())]
    if bad:  # e.g. dpmpp_2m at 999-1000 steps: repeated timesteps give a zero step size (diffusers fails there too)
        raise ValueError(f"steps {steps} is out of range for sampler {name}: its {bad[0]} coefficients "
                         "are not finite (repeated timesteps); use fewer steps")
    return Schedule(
        name=name,
        prediction_type=pred,
        timesteps=sched.timesteps.to(torch.float32),
        init_noise_sigma=float(sched.init_noise_sigma),
        needs_noise=sampler.draws_noise or bool(eta),
        tables=tables,
        start=start,
    )


def switch_step(schedule: Schedule, switch: float, num_train_timesteps: int) -> int:
    """The step index where a run of `schedule` hands over at the fraction `switch` of the noise schedule: the
    first step whose timestep is below round(T * (1 - switch)), as diffusers computes both `denoising_end` (the
    base runs the steps before it) and `denoising_start` (the refiner runs from it)."""
    cutoff = int(round(num_train_timesteps - switch * num_train_timesteps))
    return int((schedule.timesteps.cpu() >= cutoff).sum())


# ----------------------------------------------------------------------------- per step (device side)


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


def init_state(schedule: Schedule, latents: torch.Tensor) -> torch.Tensor:
    """Multistep state (DPM++ 2M: previous x0), float32 zeros of the latents' shape for every sampler."""
    return torch.zeros_like(latents, dtype=torch.float32)


def scale_model_input(schedule: Schedule, latents: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The UNet input at step ``i`` (0-d int64 device tensor): Euler family divides by sqrt(sigma^2 + 1)."""
    if "in_div" not in schedule.tables:
        return latents
    return (latents.float() / table_at(schedule.tables, "in_div", i)).to(latents.dtype)


def add_noise(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``noise_a[j] * x0 + noise_b[j] * noise`` in float32, returned in x0's dtype; ``j`` a 0-d int64 device tensor.

    Equals diffusers' ``scheduler.add_noise(x0, noise, timesteps[j])`` where the pipelines call it:
    j = start for the img2img / inpainting initial latents (the inpainting pipeline at strength 1 starts
    from ``noise * init_noise_sigma`` instead, like txt2img), j = i + 1 after step i for the 4-channel
    inpainting blend, whose j = N gives x0 (the clean image latents).
    """
    tabs = schedule.tables
    x = table_at(tabs, "noise_a", j) * x0.float() + table_at(tabs, "noise_b", j) * noise.float()  # [B, 4, H/8, W/8]
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
    x_next, state_next = sampler_registry.REGISTRY[schedule.name].step(schedule.tables, i, x, m, state, noise)
    return x_next.to(latents.dtype), state_next
