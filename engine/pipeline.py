"""txt2img over any backend: tokenizer -> clip -> [unet -> CFG -> sampler] x steps -> vae_decoder.

The pipeline only sees runners (engine/backends/base.py): torch tensors in, torch tensors out. The
denoise step reads per-step values from device tables indexed by a device step counter, so it has no
host sync and can be captured in one CUDA graph (engine/graphs.py) when every runner is graph-safe.
Seeds follow diffusers: latents = randn(shape, generator=torch.Generator("cpu").manual_seed(seed)),
then per-step noise (euler_a, lcm) from the same generator, so a seed gives diffusers' image.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import graphs, samplers
from engine.backends.base import Runner, get_backend
from engine.config import GenerateConfig, Profile
from export.specs import Dims, check_size, get_spec

MAX_STEPS = 1000
_D = GenerateConfig()  # the one place generation defaults live


@dataclass
class Result:
    images: np.ndarray  # [B, H, W, 3] uint8
    timings_ms: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    def __init__(self, runners: dict[str, Runner], tokenizer, scheduler_config: dict, dims: Dims,
                 profile: Profile | None = None, info: dict[str, Any] | None = None):
        self.runners = runners
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.dims = dims
        self.profile = profile
        self.info = info or {}
        self.device = runners["unet"].device

    @classmethod
    def from_engines(cls, engine_dir: Path, model: str = "tiny", device: str = "auto") -> "Pipeline":
        """Load what `python -m engine.build` wrote for `model` (artifacts verified against their hashes)."""
        from transformers import CLIPTokenizer

        from engine import cache
        from export.models import resolve_model

        _, model_id = resolve_model(model)
        record_path = Path(engine_dir) / model_id / cache.BUILD_RECORD
        if not record_path.is_file():
            raise ValueError(f"no engines for model {model!r} in {engine_dir}: run python -m engine.build "
                             f"--model {model} --engine-dir {engine_dir}")
        record = cache.read_json(record_path)
        backend = get_backend(record["backend"])
        runners = {}
        for name in ("clip", "unet", "vae_decoder"):
            if name not in record["components"]:
                raise ValueError(f"{record_path} has no {name!r}: rebuild with python -m engine.build")
            art = Path(engine_dir) / record["components"][name]["dir"]
            runners[name] = backend.load(get_spec(name), art, cache.verify(art), device)
        folder = Path(record["model_path"])
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        scheduler_config = cache.read_json(folder / "scheduler" / "scheduler_config.json")
        return cls(runners, tokenizer, scheduler_config, Dims(**record["dims"]),
                   Profile.from_json(record["profile"]), record)

    # ---- stages ----

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        n = self.dims.text_len
        for p in prompts:
            if len(self.tokenizer(p).input_ids) > n:
                warnings.warn(f"prompt longer than {n} tokens was truncated: {p[:60]!r}...", stacklevel=3)
        ids = self.tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
        return ids.input_ids.to(torch.int32)  # [B, 77]

    def encode(self, prompts: list[str], negative: list[str] | None) -> torch.Tensor:
        """Text embeddings; with CFG [uncond; cond] in one batch of 2B."""
        ids = self.tokenize(prompts if negative is None else negative + prompts)
        return self.runners["clip"](input_ids=ids.to(self.device))["text_embeddings"]  # [2B, 77, C]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        _check_finite(latents, "the denoise loop (unet)", self.info.get("precision"))
        images = self.runners["vae_decoder"](latent=latents)["images"].float()  # [B, 3, H, W] in [-1, 1]
        _check_finite(images, "vae_decoder", self.info.get("precision"))
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return (images * 255).round().astype(np.uint8)  # [B, H, W, 3]

    def check(self, batch: int, height: int, width: int, steps: int, guidance_scale: float) -> None:
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps {steps} must be in [1, {MAX_STEPS}]")
        if guidance_scale < 0 or not np.isfinite(guidance_scale):
            raise ValueError(f"guidance scale {guidance_scale} must be a finite number >= 0")
        p = self.profile
        check_size(self.dims, height, width, p.lo if p else None, p.hi if p else None)
        if p and not p.lo.batch <= batch <= p.hi.batch:
            raise ValueError(f"batch size {batch} is outside the built profile [{p.lo.batch}, {p.hi.batch}]; "
                             f"rebuild with --batch-size {batch}")

    def default_size(self) -> tuple[int, int]:
        if self.profile:
            return self.profile.opt.height, self.profile.opt.width
        return 8 * self.dims.size_multiple, 8 * self.dims.size_multiple

    def __call__(self, prompt: str | list[str], negative_prompt: str = _D.negative_prompt, steps: int = _D.steps,
                 guidance_scale: float = _D.guidance_scale, scheduler: str = _D.scheduler, seed: int = _D.seed,
                 height: int | None = None, width: int | None = None, batch_size: int = _D.batch_size,
                 progress: bool = True, cuda_graph: bool = True) -> Result:
        from tqdm import tqdm

        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        dh, dw = self.default_size()
        height, width = height or dh, width or dw
        self.check(b, height, width, steps, guidance_scale)
        schedule = samplers.make_schedule(scheduler, self.scheduler_config, steps).to(self.device)
        cfg = guidance_scale > 1.0  # as diffusers: guidance <= 1 runs the UNet once per step
        timings: dict[str, float] = {}
        t_start = t = self._now()

        text = self.encode(prompts, [negative_prompt] * b if cfg else None)
        t = self._lap(timings, "clip", t)

        g = torch.Generator("cpu").manual_seed(seed)
        shape = (b, self.dims.latent_channels, height // self.dims.vae_scale, width // self.dims.vae_scale)
        latents = torch.randn(shape, generator=g, dtype=torch.float32) * schedule.init_noise_sigma
        noise = None
        if schedule.needs_noise:  # [N, B, 4, h, w], drawn in diffusers' order
            noise = torch.stack([torch.randn(shape, generator=g) for _ in range(steps)]).to(self.device)
        latents = latents.to(self.device)  # [B, 4, H/8, W/8], fp32 across the loop
        state = samplers.init_state(schedule, latents)
        idx = torch.zeros((), dtype=torch.long, device=self.device)  # device step counter
        gs = torch.tensor(guidance_scale, dtype=torch.float32, device=self.device)
        def one_step(i: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return denoise_step(self.runners["unet"], schedule, i, x, s, text, gs, cfg, noise)

        graph = None
        if cuda_graph and getattr(self.runners["unet"], "graph_safe", False):
            graph = graphs.try_capture(one_step, idx, latents, state)
        for _ in tqdm(range(steps), desc=f"denoise ({scheduler})", unit="step", disable=not progress):
            if graph is not None:
                graph.replay()  # updates latents, state and idx in place
            else:
                latents, state = one_step(idx, latents, state)
                idx += 1
        t = self._lap(timings, "unet", t)
        timings["unet_per_step"] = timings["unet"] / steps

        images = self.decode(latents)
        self._lap(timings, "vae", t)
        timings["total"] = (self._now() - t_start) * 1e3
        params = dict(prompt=prompts, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                      scheduler=scheduler, seed=seed, height=height, width=width,
                      model=self.info.get("model"), backend=self.info.get("backend"),
                      precision=self.info.get("precision"), cuda_graph=graph is not None)
        return Result(images, timings, params)

    def _now(self) -> float:
        if self.device.type == "cuda":  # stage boundaries only, never inside the denoise step
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _lap(self, timings: dict[str, float], name: str, t: float) -> float:
        now = self._now()
        timings[name] = (now - t) * 1e3
        return now


def denoise_step(unet: Runner, schedule: samplers.Schedule, i: torch.Tensor, latents: torch.Tensor,
                 state: torch.Tensor, text: torch.Tensor, guidance: torch.Tensor, cfg: bool,
                 noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet + classifier-free guidance + sampler update, with no host sync (i is a device tensor)."""
    x = torch.cat([latents, latents]) if cfg else latents  # [2B, 4, H/8, W/8]
    x = samplers.scale_model_input(schedule, x, i)
    t = schedule.timesteps.index_select(0, i.view(1)).expand(x.shape[0])  # [2B]
    out = unet(sample=x, timestep=t, encoder_hidden_states=text)["latent"].float()
    if cfg:
        uncond, cond = out.chunk(2)
        out = uncond + guidance * (cond - uncond)
    n = None if noise is None else noise.index_select(0, i.view(1))[0]
    return samplers.step(schedule, i, latents, out, state, n)


def _check_finite(t: torch.Tensor, stage: str, precision: str | None) -> None:
    """Once per image, after the loop (never inside the denoise step): NaN/Inf is an error, not black pixels."""
    if not bool(torch.isfinite(t).all()):
        hint = " (fp16 overflow? rebuild with --precision fp32)" if precision == "fp16" else ""
        raise RuntimeError(f"{stage} produced NaN/Inf values{hint}")
