"""Requests in, images out, over any backend and family: text encoders -> [unet -> CFG -> sampler] x steps -> VAE.

The pipeline loads everything from a self-contained engine directory (`python -m engine.build` output):
runners, tokenizers, scheduler config, family, dims and profile. It never reads the source model.
`run` takes a list of `Request`s, checks them all before any work, splits them into image rows, groups
rows that can share a UNet batch (same size, steps, sampler, strength, kind, guidance on/off), runs each
group in batches and returns one `Generated` per image, in request order. Per-row seeds, guidance and
noise make an image's pixels independent of its batch-mates.

The denoise step (engine/denoise.py) reads per-step values from device tables indexed by a device
step counter, so it has no host sync; with graph-safe runners on CUDA it is captured once per key
(shape, sampler, steps, strength, guidance on/off, kind) and replayed on every later call.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import cache, graphs, images, samplers
from engine.backends.base import Runner, get_backend
from engine.config import Profile
from engine.denoise import COND, Buffers, denoise_step, randn_rows, sample_latents, step_noise
from engine.request import Generated, Request, image_params, time_ids_of, with_time_ids
from export.families import Family, TimeIds, get_family
from export.specs import Dims, check_size

MAX_GRAPHS = 8  # captured step graphs kept (each holds its static buffers); the oldest goes first


@dataclass(frozen=True)
class Row:
    """One image to make: request `req` (resolved), image `k` of it."""

    req: int
    k: int
    request: Request
    image: torch.Tensor | None  # [1, 3, H, W] in [-1, 1]
    mask: torch.Tensor | None  # [1, 1, H, W] in {0, 1}

    @property
    def seed(self) -> int:
        return self.request.seed + self.k

    def group(self, cfg_on: bool) -> tuple:
        r = self.request
        return (r.loras, r.kind, r.height, r.width, r.steps, r.sampler, r.strength, cfg_on)


class Pipeline:
    def __init__(self, runners: dict[str, Runner], tokenizers: list, scheduler_config: dict, family: Family,
                 dims: Dims, profile: Profile, info: dict[str, Any] | None = None, batch_size: int | None = None):
        self.runners = runners
        self.tokenizers = tokenizers  # one per family.text_encoders entry
        self.scheduler_config = scheduler_config
        self.family = family
        self.dims = dims
        self.profile = profile
        self.info = info or {}
        self.batch_size = batch_size or profile.opt.batch  # images denoised together
        self.device = runners["unet"].device
        self._schedules: dict[tuple, samplers.Schedule] = {}
        self._graphs: dict[tuple, graphs.StepGraph | None] = {}  # insertion order = age, at most MAX_GRAPHS
        self._loras: dict[tuple[str, float], Any] = {}  # (path, mtime) -> engine.lora.LoraWeights, loaded once
        self._applied: tuple = ()  # the adapters merged into the runners now
        self._applied_info: list[dict] = []

    # ---- loading ----

    @classmethod
    def load(cls, engine_dir: str | Path, model: str | None = None, device: str = "auto",
             batch_size: int | None = None, verify: bool = False) -> "Pipeline":
        """The pipeline of one model in an engine dir (`model` may be omitted when it holds one).

        Every artifact is checked against its manifest (sizes; hashes of files whose mtime changed) and
        CorruptArtifact names the first bad file. `verify` re-hashes every file: slower (reads all the
        engines), but it also finds bytes altered with their mtime put back. Tokenizers load with the
        `tokenizers` library where the tokenizer folder allows (engine/tokenizer.py): no transformers."""
        from engine.tokenizer import load_tokenizer

        model_dir = find_model_dir(Path(engine_dir), model)
        record_path = model_dir / cache.BUILD_RECORD
        record = cache.read_record(record_path)
        family, dims = get_family(record["family"]), Dims(**record["dims"])
        backend = get_backend(record["backend"])
        runners = {}
        for name, entry in record["components"].items():
            art = model_dir / entry["dir"]
            runners[name] = backend.load(family.spec(name), art, cache.verify(art, full=verify), device)
        missing = [n for n in family.default_components(dims) if n not in runners]
        if missing:
            raise ValueError(f"{record_path} has no {', '.join(missing)}: rebuild with python -m engine.build "
                             f"--model {record['model']} --components {','.join(family.default_components(dims))}")
        files = model_dir / record["model_files"]
        cache.verify(files, full=verify)
        tokenizers = [load_tokenizer(files / sub) for sub in family.tokenizers]
        scheduler_config = cache.read_json(files / family.scheduler_config)
        info = {**record, "engine_dir": str(model_dir)}
        return cls(runners, tokenizers, scheduler_config, family, dims, Profile.from_json(record["profile"]), info,
                   batch_size)

    def close(self) -> None:
        self._graphs.clear()
        for runner in self.runners.values():
            runner.close()

    # ---- checks (before any work) ----

    def schedule(self, sampler: str, steps: int, strength: float | None) -> samplers.Schedule:
        """The sampler's device tables, built once per (sampler, steps, strength) and kept."""
        key = (sampler, steps, strength)
        if key not in self._schedules:
            s = samplers.make_schedule(sampler, self.scheduler_config, steps, 1.0 if strength is None else strength)
            self._schedules[key] = s.to(self.device)
        return self._schedules[key]

    def prepare(self, request: Request) -> list[Row]:
        """Check one request against this engine and load its images; ValueError names what is wrong."""
        request.check()
        r = request.resolved(self.family.default_strength)
        h, w = r.height or self.profile.opt.height, r.width or self.profile.opt.width
        check_size(self.dims, h, w, self.profile.lo, self.profile.hi)
        r.height, r.width = h, w
        r = with_time_ids(r, self.family)  # SDXL: diffusers' defaults filled in; other models refuse them
        if r.kind == "txt2img" and not self.family.txt2img:
            raise ValueError(f"model {self.info.get('model')!r} is an SDXL refiner ({self.family.name}): "
                             "img2img only: give an init image")
        self.schedule(r.sampler, r.steps, r.strength)  # unknown sampler, steps or strength out of range
        if r.kind != "txt2img" and "vae_encoder" not in self.runners:
            model_dir = Path(self.info.get("engine_dir", "."))
            wanted = ",".join(dict.fromkeys(self.family.default_components(self.dims) + ("vae_encoder",)))
            raise ValueError(f"{r.kind} needs the vae_encoder engine, which {model_dir} lacks: rebuild with "
                             f"python -m engine.build --model {self.info.get('model')} --engine-dir {model_dir.parent} "
                             f"--components {wanted}")
        if r.kind == "inpaint" and not self.family.can_inpaint(self.dims):
            raise ValueError(f"model {self.info.get('model')!r} cannot inpaint: its UNet takes "
                             f"{self.dims.unet_in_channels} channels (4 blends latents, 9 is an inpainting UNet)")
        if self.dims.inpainting_unet and r.kind != "inpaint":
            raise ValueError(f"model {self.info.get('model')!r} is an inpainting model (9-channel UNet): "
                             "give an init image and a mask")
        image = images.load_image(r.init_image, h, w, r.resize) if r.init_image is not None else None
        mask = images.load_mask(r.mask, h, w, r.resize) if r.mask is not None else None
        return [Row(-1, k, r, image, mask) for k in range(r.images)]

    # ---- running ----

    def run(self, requests: Request | list[Request], progress: bool = True, cuda_graph: bool = True,
            batch_size: int | None = None) -> list[Generated]:
        """One `Generated` per image, in request order (image k of request j after image k-1)."""
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        rows = [Row(j, row.k, row.request, row.image, row.mask) for j, r in enumerate(reqs) for row in self.prepare(r)]
        size = batch_size or self.batch_size
        if not self.profile.lo.batch <= min(size, self.profile.hi.batch):
            raise ValueError(f"batch size {size} is outside the built profile "
                             f"[{self.profile.lo.batch}, {self.profile.hi.batch}]")
        size = min(size, self.profile.hi.batch)
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            groups.setdefault(row.group(row.request.guidance_scale > 1.0), []).append(row)
        results: dict[tuple[int, int], Generated] = {}
        for key, members in groups.items():
            self.use_adapters(key[0])
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                pixels, timings, graphed = self._run_batch(chunk, key[-1], progress, cuda_graph)
                for row, px in zip(chunk, pixels):
                    params = {**image_params(row.request, row.k), **self._engine_params(), "cuda_graph": graphed}
                    if self._applied_info:
                        params["loras"] = self._applied_info
                    results[(row.req, row.k)] = Generated(px, params, timings)
        return [results[(row.req, row.k)] for row in rows]

    def use_adapters(self, adapters: tuple = ()) -> None:
        """Merge these LoRA adapters (engine.lora.Adapter) into the runners' weights, replacing any merged before;
        () puts the built weights back exactly. Every adapter is loaded and checked against every runner before
        any runner changes, so a bad adapter leaves the pipeline as it was. No re-export, no rebuild."""
        from engine import lora

        if tuple(adapters) == self._applied:
            return
        loaded = [(self._lora(a.path), float(a.scale)) for a in adapters]
        folders = {self.family.spec(name).model_folder: name for name in self.runners}
        merged: dict[str, dict[str, torch.Tensor] | None] = {}
        for target in lora.TARGETS:
            parts = lora.parts_for(loaded, target)
            if parts and target not in folders:
                raise ValueError(f"LoRA {parts[0][0].adapter!r} has {target} weights, which model "
                                 f"{self.info.get('model')!r} has no engine for")
            if target in folders:
                runner = self.runners[folders[target]]
                if not hasattr(runner, "set_weights"):
                    raise ValueError(f"backend {self.info.get('backend')!r} cannot merge LoRA adapters yet "
                                     "(onnxruntime, torch and openvino can)")
                merged[target] = lora.merged_tensors(runner.base_weights(), parts, target) if parts else None
        for target, tensors in merged.items():
            if tensors is not None or self._applied:
                self.runners[folders[target]].set_weights(tensors)
        self._graphs.clear()  # captured steps read the old weights' buffers
        self._applied, self._applied_info = tuple(adapters), lora.adapter_params(loaded)

    def _lora(self, path) -> Any:
        from engine import lora

        key = (str(Path(path).resolve()), Path(path).stat().st_mtime)
        if key not in self._loras:
            self._loras[key] = lora.load_lora(path)
        return self._loras[key]

    def _engine_params(self) -> dict[str, Any]:
        return {k: self.info.get(k) for k in ("model", "backend", "precision")}

    def _run_batch(self, rows: list[Row], cfg: bool, progress: bool,
                   cuda_graph: bool) -> tuple[np.ndarray, dict[str, float], bool]:
        from tqdm import tqdm

        n_real = len(rows)
        rows = rows + [rows[-1]] * max(0, self.profile.lo.batch - n_real)  # pad a static profile's batch
        r = rows[0].request
        schedule = self.schedule(r.sampler, r.steps, r.strength)
        timings: dict[str, float] = {}
        t_start = t = self._now()
        buffers = {"idx": torch.tensor(schedule.start, dtype=torch.long)}
        buffers.update(self.encode([x.request.prompt for x in rows],
                                   [x.request.negative_prompt for x in rows] if cfg else None,
                                   [time_ids_of(x.request) for x in rows] if self.family.time_ids else None))
        t = self._lap(timings, "clip", t)
        buffers.update(self._start_latents(rows, schedule, cfg))
        if cfg:
            buffers["guidance"] = torch.tensor([x.request.guidance_scale for x in rows]).view(-1, 1, 1, 1)
        buffers = {k: v.to(self.device) for k, v in buffers.items()}
        t = self._lap(timings, "encode", t)
        step_key = (len(rows), r.height, r.width, r.sampler, r.steps, r.strength, cfg, r.kind)
        latents, graphed = self._denoise(step_key, schedule, cfg, buffers, cuda_graph, progress and tqdm)
        t = self._lap(timings, "unet", t)
        timings["unet_per_step"] = timings["unet"] / schedule.run_steps
        pixels = self.decode(latents)[:n_real]
        self._lap(timings, "vae", t)
        timings["total"] = (self._now() - t_start) * 1e3
        return pixels, timings, graphed

    def _denoise(self, key: tuple, schedule: samplers.Schedule, cfg: bool, buffers: Buffers, cuda_graph: bool,
                 bar) -> tuple[torch.Tensor, bool]:
        """The final latents, and whether a (new or cached) CUDA graph ran the steps."""
        unet = self.runners["unet"]

        def step(b: Buffers) -> tuple[torch.Tensor, torch.Tensor]:
            return denoise_step(unet, schedule, cfg, b)

        graph = None
        if cuda_graph and unet.graph_safe and buffers["latents"].is_cuda:
            if key not in self._graphs:
                if len(self._graphs) >= MAX_GRAPHS:
                    self._graphs.pop(next(iter(self._graphs)))
                self._graphs[key] = graphs.try_capture(step, buffers)
            graph = self._graphs[key]
        steps = range(schedule.start, schedule.num_steps)
        if bar:
            steps = bar(steps, desc=f"denoise ({schedule.name})", unit="step")
        if graph is not None:
            graph.load(buffers)
            for _ in steps:
                graph.replay()  # updates latents, state and idx in place
            return graph.buffers["latents"].clone(), True
        b = dict(buffers)
        for _ in steps:
            b["latents"], b["state"] = step(b)
            b["idx"] = b["idx"] + 1
        return b["latents"], False

    # ---- stages ----

    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        tokenizer = tokenizer or self.tokenizers[0]
        n = self.dims.text_len
        for p in set(prompts):
            if len(tokenizer(p).input_ids) > n:
                warnings.warn(f"prompt longer than {n} tokens was truncated: {p[:60]!r}...", stacklevel=3)
        ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
        return ids.input_ids.to(torch.int32)  # [B, 77]

    def encode(self, prompts: list[str], negative: list[str] | None, time_ids: list[TimeIds] | None = None) -> Buffers:
        """The family's UNet conditioning; with CFG [uncond; cond] in one batch of 2B, as `cond.*` buffers.
        `time_ids`: one per prompt, for a family with size conditioning (SDXL)."""
        texts = prompts if negative is None else negative + prompts
        outs = {}
        for name, tokenizer in zip(self.family.text_encoders, self.tokenizers):
            out = self.runners[name](input_ids=self.tokenize(texts, tokenizer).to(self.device))
            outs[name] = {k: v.clone() for k, v in out.items()}  # outputs are valid until the runner's next call
        cond = self.family.conditioning(outs)
        if negative is not None and self.family.zero_empty_negative:  # SDXL: no negative prompt = zero rows
            empty = torch.tensor([not n for n in negative] + [False] * len(prompts), device=self.device)
            cond = {k: torch.where(empty.view(-1, *[1] * (v.dim() - 1)), torch.zeros_like(v), v)
                    for k, v in cond.items()}
        if self.family.size_conditioning is not None:  # SDXL: time ids from each row's sizes (and scores)
            extra = self.family.size_conditioning(time_ids, negative is not None)
            cond.update({k: v.to(self.device) for k, v in extra.items()})
        return {COND + k: v for k, v in cond.items()}

    def _start_latents(self, rows: list[Row], schedule: samplers.Schedule, cfg: bool) -> Buffers:
        """Initial latents, sampler state, per-step noise and inpainting inputs, from per-row generators."""
        r = rows[0].request
        gens = [torch.Generator("cpu").manual_seed(row.seed) for row in rows]
        shape = (1, self.dims.latent_channels, r.height // self.dims.vae_scale, r.width // self.dims.vae_scale)
        inpaint_9 = r.kind == "inpaint" and self.dims.inpainting_unet
        pure_noise = r.kind == "txt2img" or (r.kind == "inpaint" and r.strength == 1.0)
        out: Buffers = {}
        image = torch.cat([row.image for row in rows]) if r.kind != "txt2img" else None  # [B, 3, H, W]
        image_latents = None
        if image is not None and not (inpaint_9 and pure_noise):
            image_latents = sample_latents(self.runners["vae_encoder"], image, gens)  # [B, 4, h, w]
        noise = randn_rows(gens, shape)  # [B, 4, h, w]
        if pure_noise:
            latents = noise * schedule.init_noise_sigma
        else:  # the schedule's tables live on the device
            start = torch.tensor(schedule.start, device=self.device)
            latents = samplers.add_noise(schedule, image_latents.to(self.device), noise.to(self.device), start)
        if r.kind == "inpaint":
            mask = torch.cat([row.mask for row in rows])  # [B, 1, H, W]
            mask_lat = images.mask_latents(mask, self.dims.vae_scale)  # [B, 1, h, w]
            if inpaint_9:
                masked = sample_latents(self.runners["vae_encoder"], images.masked_image(image, mask), gens)
                concat = torch.cat([mask_lat, masked], dim=1)  # [B, 5, h, w]
                out["concat"] = torch.cat([concat, concat]) if cfg else concat
            else:
                randn_rows(gens, shape)  # diffusers samples the masked image's latents here too: keep the streams
                out.update(image_latents=image_latents, init_noise=noise, mask=mask_lat)
        if schedule.needs_noise:
            out["noise"] = step_noise(schedule, gens, shape)
        out.update(latents=latents, state=samplers.init_state(schedule, latents))
        return out

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        _check_finite(latents, "the denoise loop (unet)", self.info.get("precision"))
        pixels = self.runners["vae_decoder"](latent=latents)["images"].float()  # [B, 3, H, W] in [-1, 1]
        _check_finite(pixels, "vae_decoder", self.info.get("precision"))
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return (pixels * 255).round().astype(np.uint8)  # [B, H, W, 3]

    def _now(self) -> float:
        if self.device.type == "cuda":  # stage boundaries only, never inside the denoise step
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _lap(self, timings: dict[str, float], name: str, t: float) -> float:
        now = self._now()
        timings[name] = (now - t) * 1e3
        return now


def find_model_dir(engine_dir: Path, model: str | None) -> Path:
    """<engine_dir>/<model_id> for a model id, the name or path given to build, or the only model there."""
    found = {p.parent.name: p.parent for p in sorted(engine_dir.glob(f"*/{cache.BUILD_RECORD}"))}
    hint = f"run python -m engine.build --engine-dir {engine_dir}" + (f" --model {model}" if model else "")
    if not found:
        raise ValueError(f"no engines in {engine_dir}: {hint}")
    if model is None:
        if len(found) > 1:
            raise ValueError(f"{engine_dir} holds several models ({', '.join(found)}): pass --model with one of them")
        return next(iter(found.values()))
    if model in found:
        return found[model]
    wanted = str(Path(model).expanduser().resolve())
    for model_dir in found.values():
        record = cache.read_record(model_dir / cache.BUILD_RECORD)
        if model in (record.get("model"), record.get("model_id")) or wanted == record.get("source"):
            return model_dir
    raise ValueError(f"no engines for model {model!r} in {engine_dir} (it holds {', '.join(found)}): {hint}")


def _check_finite(t: torch.Tensor, stage: str, precision: str | None) -> None:
    """Once per batch, after the loop (never inside the denoise step): NaN/Inf is an error, not black pixels."""
    if not bool(torch.isfinite(t).all()):
        hint = " (fp16 overflow? rebuild with --precision fp32)" if precision == "fp16" else ""
        raise RuntimeError(f"{stage} produced NaN/Inf values{hint}")
