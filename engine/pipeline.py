"""One engine session: requests in, images out, over any backend and family.

The session loads everything from a self-contained engine directory (`python -m engine.build` output):
runners, tokenizers, scheduler config, family, dims and profile; it never reads the source model. Its
public API is what both drivers use, the static batch (`run`, here) and the continuous flight
(engine/continuous.py):

    prepare(request)              -> PreparedRequest (checked once, before any work; RequestError names the field)
    use_adapters(adapters)        LoRA merged into the runners (graphs of the old weights dropped)
    encode(rows, cfg)             the denoiser's conditioning buffers (`cond.*`) from the family
    start_latents(rows, sched, cfg)  initial latents, sampler state, per-step noise, inpainting inputs, guidance
    step(sched, cfg, buffers)     one denoise step (engine/denoise.py): no host sync, CUDA-graph safe
    decode(latents)               pixels, NaN/Inf refused
    result(row, pixels, ...)      one `Generated` with its A1111-style parameters

Components are found by their family role (`family.roles`), never by name. `run` takes requests (or prepared
requests), groups rows that can share a denoiser batch (`PreparedRequest.batch_key`), runs each group in
batches and returns one `Generated` per image, in request order. Per-row seeds, guidance and noise make an
image's pixels independent of its batch-mates. With graph-safe runners on CUDA the step is captured once per
key (shape, sampler, steps, strength, guidance on/off, kind) in the session's bounded graph cache.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import (
    cache,
    control,
    encoders,
    feature_cache,
    graphs,
    images,
    ip_adapter,
    memory,
    passes,
    previews,
    samplers,
    shape_state,
)
from engine import request as T  # the timing keys, StopFn, Stopped
from engine.backends.base import Runner, get_backend
from engine.cache import find_model_dir  # engine.serve and tests look it up here too
from engine.config import Profile
from engine.denoise import COND, Buffers, denoise_step, start_latents
from engine.embeddings import Embedding, encoder_widths, load_embeddings
from engine.kinds import check_kind
from engine.lora_cache import Lru
from engine.request import (
    Generated,
    PreparedRequest,
    Request,
    RequestError,
    Row,
    cache_key,
    control_key,
    image_params,
    with_family_fields,
)
from engine.text import TextEncoders
from engine.tiling import Tiling
from engine.tiling import resolve as resolve_tiling
from engine.upscale import LowResImage
from export.control import PREFIX, with_controls
from export.families import Family, get_family
from export.feature_cache import with_feature_cache
from export.footprint import Footprint
from export.ip_adapter import with_ip_adapter
from export.specs import Dims, check_size
from export.tiny_vae import with_tiny_vae

MAX_SCHEDULES = 64  # sampler tables kept on the device, least recently used out (a client's strength is any float)
MAX_GRAPHS = 8  # captured step graphs kept (each holds its static buffers); the least recently used goes first
ENGINE_PARAMS = ("model", "backend", "precision")  # what every image records of the engines that made it


class Pipeline:
    def __init__(self, runners: dict[str, Runner], tokenizers: list, scheduler_config: dict, family: Family,
                 dims: Dims, profile: Profile, info: dict[str, Any] | None = None, batch_size: int | None = None,
                 embeddings: Mapping[str, Embedding] | None = None):
        self.runners = runners  # component name -> runner; found by role (self.role)
        self.tokenizers = tokenizers  # one per family.roles.text_encoders entry
        self.scheduler_config = scheduler_config
        self.family = family
        self.dims = dims
        self.profile = profile
        self.info = info or {}
        self.batch_size = batch_size or profile.opt.batch  # images denoised together
        self.device = self.role("denoiser").device
        self.graphs = graphs.StepGraphCache(MAX_GRAPHS)  # both drivers' captured steps
        # by (sampler, steps, strength); bounded; prepare (a server thread) and run (the batch thread) both read it
        self._schedules: Lru[tuple, samplers.Schedule] = Lru(max_entries=MAX_SCHEDULES)
        self._applied: tuple = ()  # the adapters merged into the runners now
        self.adapter_params: list[dict] = []  # what images record of them; a new list at every change
        self.text = TextEncoders(family, runners, tokenizers, dims, self.max_chunks, embeddings)  # engine/text.py
        self.embeddings_dir: Path | None = None  # where `embeddings` were read (a companion reads it too)
        self._companions: dict[str, Pipeline] = {}  # other models of its engine dir, by family (self.companion)
        self._companions_lock = threading.Lock()
        self.low_res: LowResImage | None = None  # a low-res image the UNet takes (engine/upscale.py)

    def role(self, role: str) -> Runner:
        """The runner playing a family role: "denoiser", "latent_decoder", "latent_encoder"."""
        return self.runners[getattr(self.family.roles, role)]

    def has_role(self, role: str) -> bool:
        return getattr(self.family.roles, role) in self.runners

    # ---- loading ----

    @classmethod
    def load(cls, engine_dir: str | Path, model: str | None = None, device: str = "auto",
             batch_size: int | None = None, verify: bool = False, embeddings: Path | None = None) -> Pipeline:
        """The pipeline of one model in an engine dir (`model` may be omitted when it holds one).

        Every artifact is checked against its manifest (sizes; hashes of files whose mtime changed) and
        CorruptArtifact names the first bad file. `verify` re-hashes every file: slower (reads all the
        engines), but it also finds bytes altered with their mtime put back. Tokenizers load with the
        `tokenizers` library where the tokenizer folder allows (engine/tokenizer.py): no transformers."""
        from engine.tokenizer import load_tokenizer

        model_dir = find_model_dir(Path(engine_dir), model)
        record_path = model_dir / cache.BUILD_RECORD
        record = cache.read_record(record_path)
        dims = Dims(**record["dims"])
        family = with_controls(get_family(record["family"]), tuple(record.get("controls", ())), dims)
        family = with_ip_adapter(family, dims)  # an image encoder and image inputs, when built with an IP-Adapter
        family = with_feature_cache(family, record.get("feature_cache"))  # + the shallow graph (DeepCache)
        family = with_tiny_vae(family, "tiny_vae" in record)  # + a tiny decoder (TAESD): previews
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
        found = None if embeddings is None else load_embeddings(embeddings, encoder_widths(family, dims),
                                                                family.embedding_keys)
        pipe = cls(runners, tokenizers, scheduler_config, family, dims, Profile.from_json(record["profile"]), info,
                   batch_size, found)
        pipe.embeddings_dir = embeddings
        pipe.low_res = LowResImage.load(files, family.low_res) if family.low_res else None
        return pipe

    def companion(self, family: str) -> Pipeline:
        """The pipeline of the one other model of `family` in this model's engine dir (the SDXL refiner), loaded on
        first use, on this device; LookupError naming what the dir holds when it has none or several."""
        with self._companions_lock:
            found = self._companions.get(family)
            if found is None:
                root = Path(self.info["engine_dir"]).parent
                model_dir = cache.find_family_dir(root, family)
                found = Pipeline.load(root, model_dir.name, device=str(self.device), embeddings=self.embeddings_dir)
                self._companions[family] = found
            return found

    def close(self) -> None:
        self.graphs.clear()
        for other in self._companions.values():
            other.close()
        for runner in self.runners.values():
            runner.close()

    # ---- checks (before any work) ----

    def schedule(self, sampler: str, steps: int, strength: float | None, eta: float = 0.0) -> samplers.Schedule:
        """The sampler's device tables for (sampler, steps, strength, eta), kept in a bounded LRU (MAX_SCHEDULES)."""
        key = (sampler, steps, strength, eta)
        found = self._schedules.get(key)
        if found is None:
            found = self._make_schedule(*key).to(self.device)
            self._schedules.put(key, found)
        return found

    def _make_schedule(self, sampler: str, steps: int, strength: float | None, eta: float = 0.0) -> samplers.Schedule:
        return samplers.make_schedule(sampler, self.scheduler_config, steps, 1.0 if strength is None else strength,
                                      eta=eta)

    def prepare(self, request: Request) -> PreparedRequest:
        """Check one request against this engine and load its images, once; RequestError names the field."""
        request.check()
        r = request.resolved(self.family.default_strength)
        out = self.low_res.size(r, self.dims, self.profile.hi) if self.low_res else None  # the upscaler's: 4x its image
        h, w = out or (r.height or self.profile.opt.height, r.width or self.profile.opt.width)
        check_size(self.dims, h, w, self.profile.lo, self.profile.hi)
        r.height, r.width = h, w
        r = self.with_tiling(r)  # a later pass resolves its own (engine/hires.py)
        tile = self.tiling(r)
        self.check_memory(h, w, r.images, r.guidance_scale > 1, (min(tile.tile, h), min(tile.tile, w)) if tile else None)
        r = with_family_fields(r, self.family, self.dims, passes.later_fields(r))  # e.g. SDXL's time ids: diffusers' defaults
        model = self.info.get("model")
        check_kind(r, self.family, self.dims, self.has_role("latent_encoder"), model,
                   Path(self.info.get("engine_dir", ".")))  # engine/kinds.py
        schedule = self._check_schedule(r)
        s = schedule or self._schedules.get(key := (r.sampler, r.steps, r.strength, r.eta)) or self._make_schedule(*key)
        feature_cache.check(r, self.runners, self.info.get("model"), s.start, s.stop)  # before any work
        previews.check(r, self.has_role("preview_decoder"), self.info.get("model"))
        texts = self.text.read(r)  # each text encoder's chunks (engine/text.py)
        if (r.clip_skip or 1) > max(self.dims.text_layers, 1):
            raise RequestError("clip_skip", f"clip_skip {r.clip_skip} is past the text encoder's "
                                            f"{self.dims.text_layers} layers" + ("" if self.dims.text_layers else
                                            " (engines built before clip skip: rebuild them)"))
        control.check_names(r.controls, self.family.roles.conditions, model)
        image = (self.low_res.image(r, self.dims) if self.low_res else
                 images.load_field(images.load_image, "init_image", r.init_image, h, w, r.resize))
        mask = images.load_field(images.load_mask, "mask", r.mask, h, w, r.resize)
        controls = tuple(images.load_field(images.load_control_image, control.FIELD, c.source, h, w, r.resize)
                         for c in r.controls)
        ip_image = ip_adapter.request_pixels(r.ip_image, self.info.get("ip_adapter"), self.info.get("model"))
        plan = passes.of(r)
        if plan is not None:
            plan.prepare(self, r, request)  # the later pass's size, memory and engines (engine/passes.py)
        if schedule is not None:  # the request passed every check: its tables are worth keeping
            self._schedules.put((r.sampler, r.steps, r.strength, r.eta), schedule.to(self.device))
        return PreparedRequest(r, image, mask, controls, ip_image, texts, given=request)

    def check_memory(self, height: int, width: int, images: int, cfg: bool,
                     decode: tuple[int, int] | None = None) -> memory.Estimate:
        """RequestError naming `height` when the run's largest activations would not fit in the memory available
        now (engine/memory.py: the CLI and the server refuse with this one estimate); `decode`: the decoder's tile."""
        return memory.check(*self._memory_args(height, width, images, cfg), str(self.device), decode)

    def _memory_args(self, height: int, width: int, images: int, cfg: bool) -> tuple:
        return (Footprint(**self.info.get("footprint", {})), height, width, images, cfg,
                self.info.get("precision", "fp32"), self.info.get("attention", "decomposed"), self.dims.vae_scale)

    def with_tiling(self, r: Request) -> Request:
        """`r` (its size known) with `vae_tiling` resolved to "on" or "off" and its tile size filled in
        (engine/tiling.py's `resolve`: "auto" tiles where the untiled decode would not fit in memory now)."""
        def too_big() -> bool:
            untiled = memory.estimate(*self._memory_args(r.height, r.width, r.images, r.guidance_scale > 1))
            return untiled.decoder_bytes > memory.available_bytes(str(self.device))

        bounds = (self.profile.lo, self.profile.hi) if self.info.get("static_shapes") else None
        plan, on = resolve_tiling(r, self.dims.vae_scale, self.dims.vae_sample_size, too_big, bounds)
        return replace(r, vae_tiling="on" if on else "off", vae_tile_size=plan.tile)

    def tiling(self, r: Request) -> Tiling | None:
        """How a prepared request's latents are decoded (and its images encoded): in tiles, or None (whole)."""
        return Tiling(r.vae_tile_size, r.vae_tile_overlap, self.dims.vae_scale) if r.vae_tiling == "on" else None

    def _check_schedule(self, r: Request) -> samplers.Schedule | None:
        """RequestError naming `sampler` for an unknown one, else `steps` (or `strength`) the sampler refuses; the
        tables built to check them (None when cached already), kept by `prepare` only once every check passed."""
        if (r.sampler, r.steps, r.strength, r.eta) in self._schedules:  # built before, so valid
            return None
        try:
            return self._make_schedule(r.sampler, r.steps, r.strength, r.eta)
        except ValueError as exc:
            if isinstance(exc, RequestError):
                raise
            field = "sampler" if r.sampler not in samplers.SAMPLERS else "steps"
            raise RequestError(field, str(exc)) from None

    # ---- the static batch: the first driver ----

    def run(self, requests: Request | PreparedRequest | list[Request | PreparedRequest], progress: bool = True,
            cuda_graph: bool = True, batch_size: int | None = None, stop: T.StopFn | None = None,
            preview: previews.Previews | None = None) -> list[Generated]:
        """One `Generated` per image, in request order (image k of request j after image k-1). Every request is
        prepared (checked) before any work; prepared ones are taken as they are. `stop`, asked on the host before
        every step (no device sync), ends the run with `Stopped` when it answers True. `preview`: live previews of
        each batch every K steps (engine/previews.py; not of a two-pass request's passes)."""
        reqs = requests if isinstance(requests, list) else [requests]
        prepared = [r if isinstance(r, PreparedRequest) else self.prepare(r) for r in reqs]
        size = batch_size or self.batch_size
        if not self.profile.lo.batch <= min(size, self.profile.hi.batch):
            raise RequestError("batch_size", f"batch size {size} is outside the built profile "
                                             f"[{self.profile.lo.batch}, {self.profile.hi.batch}]")
        size = min(size, self.profile.hi.batch)
        groups: dict[tuple, list[Row]] = {}
        results: dict[tuple[int, int], Generated] = {}
        for j, p in enumerate(prepared):
            plan = passes.of(p.request)
            if plan is not None:  # two passes (engine/passes.py)
                self.use_adapters(p.request.loras)
                done = plan.run(self, p, j, size, progress=progress, cuda_graph=cuda_graph, stop=stop)
                results.update(((j, k), g) for k, g in enumerate(done))
            else:
                groups.setdefault(p.batch_key, []).extend(p.rows(j))
        for members in groups.values():
            self.use_adapters(members[0].request.loras)
            cfg = prepared[members[0].req].cfg
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                pixels, timings, graphed = self.run_batch(chunk, cfg, progress, cuda_graph, stop, preview=preview)
                for row, px in zip(chunk, pixels, strict=True):
                    results[(row.req, row.k)] = self.result(row, px, graphed, timings)
        return [results[(j, k)] for j, p in enumerate(prepared) for k in range(p.request.images)]

    def run_batch(self, rows: list[Row], cfg: bool, progress: bool = True, cuda_graph: bool = True,
                  stop: T.StopFn | None = None, decode: bool = True, schedule: samplers.Schedule | None = None,
                  preview: previews.Previews | None = None) -> tuple[Any, dict[str, float], bool]:
        """One batch of rows that share a batch key: (pixels [B, H, W, 3] uint8, or the latents [B, C, h, w] when
        not `decode`), the stage timings (ms) and whether the steps ran in a CUDA graph. `schedule`: the steps to
        run when they are not the request's own (a pass of a handoff, engine/refiner.py)."""
        from tqdm import tqdm

        n_real = len(rows)
        rows = rows + [rows[-1]] * max(0, self.profile.lo.batch - n_real)  # pad a static profile's batch
        r = rows[0].request
        schedule = schedule or self.schedule(r.sampler, r.steps, r.strength, r.eta)
        timings: dict[str, float] = {}
        t_start = t = self._now()
        buffers = {"idx": torch.tensor(schedule.start, dtype=torch.long)}
        buffers.update(self.encode(rows, cfg))
        t = self._lap(timings, T.TIMING_TEXT, t)
        buffers.update(self.start_latents(rows, schedule, cfg))
        buffers.update(self.conditions(rows, schedule, cfg))
        buffers = {k: v.to(self.device) for k, v in buffers.items()}
        t = self._lap(timings, T.TIMING_START, t)
        full = feature_cache.full_steps(r, schedule.start, schedule.stop)  # None: every step in full
        buffers.update(feature_cache.buffers(self.runners, self.dims, full, buffers["latents"], cfg))
        step_key = (len(rows), r.height, r.width, r.sampler, r.eta, r.steps, r.strength, schedule.start, schedule.stop, cfg,
                    r.kind, control_key(r), rows[0].chunks, cache_key(r))
        show = None if preview is None else self._previewer(preview, rows[:n_real], schedule)
        latents, graphed = self._denoise(step_key, schedule, cfg, buffers, cuda_graph, progress and tqdm, stop, full,
                                         show)
        t = self._lap(timings, T.TIMING_DENOISE, t)
        timings[T.TIMING_STEP] = timings[T.TIMING_DENOISE] / schedule.run_steps
        if not decode:
            return latents[:n_real], timings, graphed
        pixels = self.decode(latents, r)[:n_real]
        self._lap(timings, T.TIMING_DECODE, t)
        timings[T.TIMING_TOTAL] = (self._now() - t_start) * 1e3
        return pixels, timings, graphed

    def _denoise(self, key: tuple, schedule: samplers.Schedule, cfg: bool, buffers: Buffers, cuda_graph: bool,
                 bar, stop: T.StopFn | None = None, full: tuple[bool, ...] | None = None,
                 show=None) -> tuple[torch.Tensor, bool]:
        """The final latents, and whether a (new or cached) CUDA graph ran the steps; `Stopped` when `stop` says so
        before a step. `full`: per step, whether it runs the full UNet or the shallow graph (feature caching)."""
        steps_of = (False,) if full is None else (False, True)  # shallow or not: one step function (and graph) each
        fns = [lambda b, shallow=s: self.step(schedule, cfg, b, shallow) for s in steps_of]
        graph = None
        if cuda_graph and self.graph_safe(buffers):
            graph = self.graphs.get_or_capture(key, fns, buffers)
        steps = range(schedule.start, schedule.stop)
        if bar:
            steps = bar(steps, desc=f"denoise ({schedule.name})", unit="step")
        b = graph.buffers if graph is not None else dict(buffers)
        if graph is not None:
            graph.load(buffers)
        for i in steps:
            T.check_stop(stop, i)
            k = int(full is not None and not full[i])  # the host knows each step's kind: no device sync
            if graph is not None:
                graph.replay(k)  # updates latents, state, the cache and idx in place
            else:
                b["latents"], b["state"] = fns[k](b)
                b["idx"] = b["idx"] + 1
            if show is not None:
                show(i + 1, b["latents"])  # between steps: a preview costs its decode only
        return (b["latents"].clone() if graph is not None else b["latents"]), graph is not None

    def _previewer(self, preview: previews.Previews, rows: list[Row], schedule: samplers.Schedule):
        """(step index + 1, latents) -> emits the rows' preview when one is due (engine/previews.py)."""
        tiny = replace(rows[0].request, decoder="tiny" if self.has_role("preview_decoder") else "full",
                       vae_tiling="off")

        def show(i: int, latents: torch.Tensor) -> None:
            done, total = i - schedule.start, schedule.run_steps
            due = preview.due(done, total)
            preview.emit(done, total, rows, self.decode(latents[:len(rows)], tiny) if due else None)

        return show

    # ---- the session's stages (what both drivers call) ----

    def graph_safe(self, buffers: Buffers) -> bool:
        """Whether a step on these buffers may be captured in a CUDA graph (a graph-safe denoiser, on CUDA)."""
        return self.role("denoiser").graph_safe and buffers["latents"].is_cuda

    def use_adapters(self, adapters: tuple = ()) -> None:
        """Merge these LoRA adapters (engine.lora.Adapter) into the runners' weights, replacing any merged before;
        () puts the built weights back exactly. Every adapter is loaded and checked against every runner before
        any runner changes, so a bad adapter leaves the pipeline as it was. No re-export, no rebuild."""
        from engine import lora

        forgot = shape_state.over_budget(self.runners)  # runners holding state for too many sizes compile again
        if forgot:
            shape_state.forget(self.runners)  # back to the built weights: every runner is set below
        elif tuple(adapters) == self._applied:
            return
        merged, loaded = lora.merged_runners(adapters, self.runners, self.family.spec, self.info.get("model"))
        for name, tensors in merged.items():
            if tensors is not None or self._applied or forgot:
                self.runners[name].set_weights(tensors)
        self.graphs.clear()  # captured steps read the old weights' buffers
        self._applied, self.adapter_params = tuple(adapters), lora.adapter_params(loaded)

    def tokenize(self, texts: list[str], tokenizer=None) -> torch.Tensor:
        """Plain token ids [B, 77], as `plain` prompt syntax encodes them (engine/text.py)."""
        return self.text.tokenize(texts, tokenizer)

    @property
    def max_chunks(self) -> int:
        """Chunks of 77 tokens the denoiser's text input takes: what its graphs were exported for (1 for engines
        built before prompts had chunks), within a static-shape backend's profile."""
        built = int(self.info.get("text_chunks", 1))
        return min(built, self.profile.hi.chunks) if self.info.get("static_shapes") else built

    def encode(self, rows: list[Row], cfg: bool) -> Buffers:
        """The denoiser's conditioning for these rows as `cond.*` buffers (and a map's `concat_scaled`), from the
        family: with CFG [uncond; cond] in one batch of 2B. Each text encoder runs once per chunk (engine/prompts.py); weighted chunks get A1111's
        emphasis; the chunks' hidden states are concatenated on the token axis, other outputs (SDXL's pooled
        embedding) are the first chunk's."""
        negative = [x.request.negative_prompt for x in rows] if cfg else None
        cond = self.family.denoiser_inputs(self.text.encode(rows, cfg), rows, negative)
        cond = encoders.run(self.has_role, self.role, cond)  # class ids, label maps (engine/encoders.py)
        if self.has_role("image_encoder"):  # image prompts (IP-Adapter): per row, zeros and scale 0 without one
            cond.update(ip_adapter.embeddings(self.role("image_encoder"), rows, cfg, self.dims.ip_embed_dim))
        takes = self.role("denoiser").spec.input_names  # the rest are the step's own (a map's concat_scaled)
        return {(COND + k if k in takes else k): v.to(self.device) for k, v in cond.items()}

    def start_latents(self, rows: list[Row], schedule: samplers.Schedule, cfg: bool) -> Buffers:
        """Initial latents, sampler state, per-step noise, inpainting inputs and (with CFG) the per-row guidance,
        from per-row generators (engine/denoise.py)."""
        return start_latents(self, rows, schedule, cfg)

    def conditions(self, rows: list[Row], schedule: samplers.Schedule, cfg: bool) -> Buffers:
        """The step buffers of the rows' condition components (ControlNets: images and scale tables)."""
        r = rows[0].request
        if not r.controls:
            return {}
        return control.buffers(rows, schedule.num_steps, schedule.start, r.guess_mode)

    def step(self, schedule: samplers.Schedule, cfg: bool, buffers: Buffers,
             shallow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One denoise step of the session's denoiser (or its shallow graph: feature caching): (next latents, next
        sampler state); no host sync."""
        unet = feature_cache.denoiser(self.runners, self.family.roles.denoiser, shallow)
        return denoise_step(unet, schedule, cfg, buffers, self._residuals(buffers))

    def _residuals(self, buffers: Buffers) -> control.ControlStep | None:
        """What gives the denoiser its ControlNet residuals for a step on `buffers` (None: built without)."""
        if not self.family.roles.conditions:
            return None
        nets = tuple(self.runners[PREFIX + n] for n in control.names_in(buffers))
        return control.ControlStep(nets, self.dims.residual_channels, self.dims.residual_scales)

    def decode(self, latents: torch.Tensor, r: Request | None = None) -> np.ndarray:
        """Pixels [B, H, W, 3] uint8 of latents [B, C, h, w], in tiles where the rows' request `r` says so."""
        self.check_latents(latents)
        decoder, tiling = self.role(previews.decoder_role(r)), self.tiling(r) if r is not None else None
        if tiling is None:
            pixels = decoder(latent=latents)["images"].float()  # [B, 3, H, W] in [-1, 1]
        else:  # each tile's output copied: the next call may reuse its buffer
            pixels = tiling.decode(lambda t: decoder(latent=t)["images"].float().clone(), latents)
        self.check_finite(pixels, self.family.roles.latent_decoder)
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return (pixels * 255).round().astype(np.uint8)  # [B, H, W, 3]

    def check_latents(self, latents: torch.Tensor) -> None:
        """RuntimeError when the denoise loop's latents are not finite."""
        self.check_finite(latents, f"the denoise loop ({self.family.roles.denoiser})")

    def check_finite(self, t: torch.Tensor, stage: str) -> None:
        """Once per batch, after the loop (never inside the denoise step): NaN/Inf is an error, not black pixels."""
        if not bool(torch.isfinite(t).all()):
            hint = " (fp16 overflow? rebuild with --precision fp32)" if self.info.get("precision") == "fp16" else ""
            raise RuntimeError(f"{stage} produced NaN/Inf values{hint}")

    def result(self, row: Row, pixels: np.ndarray, graphed: bool, timings: dict[str, float]) -> Generated:
        """One image with everything needed to make it again: its request, seed, engines and adapters."""
        params = {**image_params(row.request, row.k), **{k: self.info.get(k) for k in ENGINE_PARAMS},
                  "cuda_graph": graphed}
        if self.adapter_params:
            params["loras"] = self.adapter_params
        if row.ip_image is not None:
            params["ip_adapter"] = self.info["ip_adapter"]["name"]
        if row.request.decoder == "tiny":  # A1111's `VAE`: the tiny decoder's folder name
            params["vae"] = self.info.get("tiny_vae")
        if any(t.embeddings for t in row.texts):  # textual inversion: A1111's `TI hashes`
            params["embeddings"] = self.text.hashes(row.texts)
        return Generated(pixels, params, timings)

    def _now(self) -> float:
        if self.device.type == "cuda":  # stage boundaries only, never inside the denoise step
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _lap(self, timings: dict[str, float], name: str, t: float) -> float:
        now = self._now()
        timings[name] = (now - t) * 1e3
        return now
