"""Continuous (step-level) batching: images join and leave the running UNet batch at every step boundary.

A `Flight` holds the images in flight on one pipeline. Each image (a `Slot`) keeps its own buffers, its own
schedule and its own step index, so rows with different step counts (and img2img start steps) share one
UNet call per step; `step()` runs that call for every slot: the per-row step indices i [B] read per-row
tables (`samplers.stack`) and the UNet gets each row's own timestep (engine/denoise.py). A slot whose
last step ran is `done`; `finish` decodes the done slots together and hands back their images.

What may share a batch (`flex_key`, engine/request.py): the same adapters, kind, size, sampler and guidance
on/off; the step count and strength may differ. One sampler per batch because the sampler's update is one function of
the tables (`samplers.step`): mixing Euler and DPM++ 2M rows would need both updates in every step.

Parity: a slot starts from exactly the buffers `Pipeline.run` would give it (the same per-image generators,
drawn in the same order), and every per-row quantity is per row, so an image equals the same request run
alone (up to the UNet's own batch-size numerics). Randomness per step (ancestral samplers) is drawn up
front per row, as in `Pipeline.run`; the step's draw is picked per row on the host, which knows each
row's step: no host sync inside the step.

Buckets and CUDA graphs: with `buckets` on (the default on CUDA, opt-in on CPU) the n live rows are padded to
the smallest batch-size bucket >= n (`buckets(max_batch)`: 1, 2, 4, ... and max_batch itself) with copies of
the first live row (its buffers, step index, schedule row and step draw: finite values, thrown away after
the step), and the stacked tables to a static width (`table_width`: the next power of two >= N_max + 1, at
least 8, so [N] and [N + 1] tables share it; a row never reads past its own N). Every input of that step,
the tables and timesteps included (`sched.*` buffers), then lives in one dict of static shapes, so the
step (`bucket_step`) is one function of its buffers: with a graph-safe UNet on CUDA it is captured once per
key (bucket, table width, buffer names/shapes/dtypes: latent size, guidance on/off, paired buffers, noise;
sampler and prediction type) in the session's bounded graph cache (`Pipeline.graphs`) and replayed at every
later step of that key, the live rows copied in and their latents/state read back; the session drops its
graphs when its adapters change (LoRA swaps move the UNet's weights). A capture that fails warns once for its key, which then runs eagerly. On CPU the step runs
eager, padded or not; `Finished` images say in params["cuda_graph"] whether all their steps ran in a graph.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine import feature_cache, passes, samplers
from engine.denoise import CACHE, COND
from engine.graphs import Buffers, StepFn, StepGraph, StepGraphCache
from engine.pipeline import Pipeline
from engine.request import Generated, Row, flex_key, row_key
from engine.tables import TABLE

__all__ = ["Finished", "Flight", "Slot", "flex_key"]

PAIRED = ("concat",)  # besides cond.*: buffers laid out [uncond rows; cond rows] (2B) with guidance
SCHED = "sched."  # the stacked schedule as step buffers: sched.timesteps [B, W], sched.<table> [B, W]
MIN_WIDTH = 8  # narrowest padded table width


def _paired(name: str, cfg: bool) -> bool:
    return cfg and (name.startswith((COND, CACHE)) or name in PAIRED)


# ---- buckets: static shapes for one graph per key ----


def buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a padded step runs at: the powers of two below max_batch, then max_batch (6 -> 1, 2, 4, 6)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out: list[int] = []
    size = 1
    while size < max_batch:
        out.append(size)
        size *= 2
    return (*out, max_batch)


def bucket_for(n: int, max_batch: int) -> int:
    """The smallest bucket that holds n rows (1 <= n <= max_batch)."""
    if not 1 <= n <= max_batch:
        raise ValueError(f"bucket_for: {n} rows, max_batch {max_batch}")
    return next(b for b in buckets(max_batch) if b >= n)


def table_width(n_max: int) -> int:
    """Static width of the padded per-row tables: the next power of two >= n_max + 1 (room for the [N + 1]
    tables), at least MIN_WIDTH."""
    width = MIN_WIDTH
    while width < n_max + 1:
        width *= 2
    return width


def _widen(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, n] -> [B, width], repeating the last column (n <= width)."""
    return torch.cat([t, t[:, -1:].expand(-1, width - t.shape[1])], dim=1)


def schedule_buffers(stacked: samplers.Schedule, width: int) -> Buffers:
    """A stacked schedule's timesteps and tables as `sched.*` step buffers, each [B, width]."""
    out = {SCHED + "timesteps": _widen(stacked.timesteps, width)}
    out.update({SCHED + k: _widen(v, width) for k, v in stacked.tables.items()})
    return out


def bucket_step(pipe: Pipeline, template: samplers.Schedule, cfg: bool, shallow: bool = False) -> StepFn:
    """The step as one function of its buffers, tables included: `template` gives only the sampler's static
    facts (name, prediction type, noise); timesteps and tables are read from the `sched.*` buffers. `shallow`: the
    UNet's shallow graph (feature caching)."""

    def step(b: Buffers) -> tuple[torch.Tensor, torch.Tensor]:
        tables = {k[len(SCHED):]: v for k, v in b.items() if k.startswith(SCHED)}
        schedule = dataclasses.replace(template, timesteps=tables.pop("timesteps"), tables=tables, start=0)
        return pipe.step(schedule, cfg, {k: v for k, v in b.items() if not k.startswith(SCHED)}, shallow)

    return step


def graph_key(template: samplers.Schedule, cfg: bool, b: Buffers, shallow: bool = False) -> tuple:
    """What a captured step is specific to: the sampler, guidance on/off, full or shallow UNet and every buffer's
    name, shape (bucket, table width, latent size, ...) and dtype."""
    shapes = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(b.items()))
    return (template.name, template.prediction_type, template.needs_noise, cfg, shallow, shapes)


@dataclass(eq=False)
class Slot:
    """One image in flight."""
    row: Row
    owner: Any  # the caller's handle (e.g. a server job); `drop` removes an owner's slots
    schedule: samplers.Schedule  # this row's own, on the device
    idx: int  # the next step to run
    bufs: Buffers  # batch dim 1; paired buffers hold [uncond; cond] (2 rows)
    noise: torch.Tensor | None  # [N, 1, 4, h, w] per-step draws (ancestral samplers)
    full: tuple[bool, ...] | None = None  # feature caching: per step, full UNet or shallow graph (None: all full)
    joined: float = field(default_factory=time.perf_counter)
    steps_run: int = 0
    graph_steps: int = 0  # steps of steps_run that ran in a CUDA graph

    @property
    def done(self) -> bool:
        return self.idx >= self.schedule.num_steps

    @property
    def shallow(self) -> bool:
        """Whether its next step runs the UNet's shallow graph (feature caching)."""
        return self.full is not None and not self.full[self.idx]


@dataclass
class Finished:
    owner: Any
    row: Row
    image: Generated | None  # None when `error` says why not
    error: str | None = None


class Flight:
    """The images in flight on one pipeline, at most `max_batch`. `buckets`: pad each step's batch to a
    batch-size bucket and its tables to a static width (default: on CUDA); `cuda_graph`: capture and replay
    the padded step where the UNet is graph-safe and the buffers are on CUDA."""

    def __init__(self, pipe: Pipeline, max_batch: int, buckets: bool | None = None, cuda_graph: bool = True):
        self.pipe, self.max_batch = pipe, max_batch
        self.buckets = pipe.device.type == "cuda" if buckets is None else buckets
        self.cuda_graph = cuda_graph
        self.slots: list[Slot] = []
        self.key: tuple | None = None  # flex key of the rows in flight
        self.cfg = False  # guidance on for the rows in flight (part of their key)
        self._stacked: tuple[tuple, samplers.Schedule] | None = None
        self._padded: tuple[tuple, samplers.Schedule, Buffers] | None = None  # (ids, stacked, sched.* [B, W])

    @property
    def graphs(self) -> StepGraphCache:
        """The session's captured steps (dropped by the session when its adapters change)."""
        return self.pipe.graphs

    @property
    def free(self) -> int:
        return self.max_batch - len(self.slots)

    def accepts(self, row: Row) -> bool:
        return self.key is None or (row_key(row) == self.key and self.free > 0)

    # ---- join ----

    def admit(self, rows: list[Row], owners: list[Any]) -> list[Slot]:
        """Rows (of one flex key; `owners[k]` is row k's) join the batch: text encoding and start latents now,
        their first step with the next `step()`. Raises ValueError if they do not fit."""
        if not rows:
            return []
        key = row_key(rows[0])
        if any(row_key(r) != key for r in rows) or (self.key is not None and key != self.key):
            raise ValueError("admit: rows of another flex key than the batch in flight")
        if len(rows) > self.free:
            raise ValueError(f"admit: {len(rows)} rows, {self.free} free slots")
        plan = passes.of(rows[0].request)
        if plan is not None:  # a second pass would need the first's latents: Pipeline.run runs both
            raise ValueError(f"admit: a request with {plan.FIELD} runs two passes, which a flight does not take "
                             "(run it with Pipeline.run)")
        cfg = rows[0].request.guidance_scale > 1.0  # one value per flight: guidance on/off is in the key
        if self.key is None:
            self.pipe.use_adapters(key[0])
            self.key, self.cfg = key, cfg
        p = self.pipe
        cond = p.encode(rows, cfg)
        n = len(rows)
        new: list[Slot] = []
        groups: dict[tuple, list[int]] = {}  # rows that share a schedule start together, as Pipeline.run would
        for k, row in enumerate(rows):
            groups.setdefault((row.request.steps, row.request.strength), []).append(k)
        for members in groups.values():
            r = rows[members[0]].request
            schedule = p.schedule(r.sampler, r.steps, r.strength, r.eta)
            start = p.start_latents([rows[k] for k in members], schedule, cfg)
            start.update(p.conditions([rows[k] for k in members], schedule, cfg))  # ControlNet images, tables
            noise = start.pop("noise", None)  # [N, b, 4, h, w]
            full = feature_cache.full_steps(r, schedule.start, schedule.stop)
            start.update(feature_cache.buffers(p.runners, p.dims, full, start["latents"], cfg))  # [2b, C, h', w']
            for j, k in enumerate(members):
                bufs = {name: self._row_of(v, k, n, _paired(name, cfg)) for name, v in cond.items()}
                bufs.update({name: self._row_of(v, j, len(members), _paired(name, cfg)) for name, v in start.items()})
                bufs = {name: v.to(p.device) for name, v in bufs.items()}
                row_noise = noise[:, j:j + 1].to(p.device) if noise is not None else None
                new.append(Slot(rows[k], owners[k], schedule, schedule.start, bufs, row_noise, full))
        order = {id(r): k for k, r in enumerate(rows)}
        new.sort(key=lambda s: order[id(s.row)])
        self.slots.extend(new)
        return new

    @staticmethod
    def _row_of(v: torch.Tensor, k: int, n: int, paired: bool) -> torch.Tensor:
        """Row k of a batch buffer of n rows; a paired one ([uncond n; cond n]) gives [uncond k; cond k]."""
        if paired:
            return torch.cat([v[k:k + 1], v[n + k:n + k + 1]])
        return v[k:k + 1]

    # ---- one step ----

    def step(self) -> None:
        """One denoising step for every slot in flight (each at its own step index); with feature caching, the rows
        at a full step and those at a shallow one run apart."""
        slots = [s for s in self.slots if not s.done]
        groups = {shallow: [s for s in slots if s.shallow == shallow] for shallow in (False, True)}  # before either runs
        for shallow, group in groups.items():
            if group:
                self._step(group, shallow)

    def _step(self, slots: list[Slot], shallow: bool) -> None:
        cfg = self.cfg
        if self.buckets:
            rows = slots + [slots[0]] * (bucket_for(len(slots), self.max_batch) - len(slots))  # padding: row 0
            out, graphed = self._bucket_step(rows, cfg, self._batch(rows, cfg), shallow)
        else:
            out = self._batch(slots, cfg)
            out["latents"], out["state"] = self.pipe.step(self._schedule(slots), cfg, out, shallow)
            graphed = False
        n = len(out["latents"])
        for k, s in enumerate(slots):  # padded rows (k >= len(slots)) are dropped here
            s.bufs["latents"], s.bufs["state"] = out["latents"][k:k + 1].clone(), out["state"][k:k + 1].clone()
            for name in s.bufs:
                if name.startswith(CACHE) and not shallow:  # what the full step wrote, for this row's shallow steps
                    s.bufs[name] = self._row_of(out[name], k, n, _paired(name, cfg)).clone()
            s.idx += 1
            s.steps_run += 1
            s.graph_steps += int(graphed)

    def _batch(self, rows: list[Slot], cfg: bool) -> Buffers:
        """The step's buffers for these rows: idx [B], per-row buffers concatenated (paired ones as [uncond rows;
        cond rows]) and this step's draw per row (ancestral samplers)."""
        b: Buffers = {"idx": torch.tensor([s.idx for s in rows], dtype=torch.long, device=self.pipe.device)}
        for name in rows[0].bufs:
            parts = [s.bufs[name] for s in rows]
            if name.startswith(TABLE):  # each row's value at its own step: [B]
                b[name] = torch.cat([s.bufs[name][:, s.idx] for s in rows])
            elif _paired(name, cfg):  # [uncond rows; cond rows]
                b[name] = torch.cat([p[:1] for p in parts] + [p[1:] for p in parts])
            else:
                b[name] = torch.cat(parts)
        if rows[0].noise is not None:
            b["noise"] = torch.cat([s.noise[s.idx] for s in rows if s.noise is not None])  # [B, 4, h, w]
        return b

    def _schedule(self, slots: list[Slot]) -> samplers.Schedule:
        ids = tuple(id(s.schedule) for s in slots)
        if self._stacked is None or self._stacked[0] != ids:
            self._stacked = (ids, samplers.stack([s.schedule for s in slots]))
        return self._stacked[1]

    # ---- the padded step: static shapes, eager or in a CUDA graph ----

    def _bucket_step(self, rows: list[Slot], cfg: bool, b: Buffers, shallow: bool) -> tuple[Buffers, bool]:
        """(the buffers holding the step's results: latents and state [B, 4, h, w], the cache; graphed) of the padded
        batch `rows` (B = its bucket)."""
        template, tables = self._padded_schedule(rows)
        b.update(tables)
        step = bucket_step(self.pipe, template, cfg, shallow)
        graph = self._graph(graph_key(template, cfg, b, shallow), step, b)
        if graph is None:
            b["latents"], b["state"] = step(b)
            return b, False
        graph.load(b)
        graph.replay()  # writes the static latents/state and cache (and advances its idx, reloaded next step)
        return graph.buffers, True  # the rows copy what they keep: the next replay overwrites

    def _padded_schedule(self, rows: list[Slot]) -> tuple[samplers.Schedule, Buffers]:
        """The rows' stacked schedule (static facts) and its tables as sched.* buffers [B, table_width]."""
        ids = tuple(id(s.schedule) for s in rows)
        if self._padded is None or self._padded[0] != ids:
            stacked = samplers.stack([s.schedule for s in rows])
            width = table_width(stacked.num_steps)  # stacked: N_max wide
            self._padded = (ids, stacked, schedule_buffers(stacked, width))
        return self._padded[1], self._padded[2]

    def _graph(self, key: tuple, step: StepFn, b: Buffers) -> StepGraph | None:
        """The captured step of this key (captured now if new), or None: eager (CPU, a UNet that is not
        graph-safe, graphs off, or a capture that failed for this key)."""
        if not (self.cuda_graph and self.pipe.graph_safe(b)):
            return None
        return self.graphs.get_or_capture(key, step, b)

    # ---- leave ----

    def drop(self, owner: Any) -> int:
        """Remove an owner's slots (a cancelled request): they free their places at this step boundary."""
        before = len(self.slots)
        self.slots = [s for s in self.slots if s.owner is not owner]
        self._idle_check()
        return before - len(self.slots)

    def finish(self) -> list[Finished]:
        """Decode the slots that ran their last step, together; they leave the batch. A row whose latents are
        not finite fails alone (its request gets the error); the others are decoded."""
        done = [s for s in self.slots if s.done]
        if not done:
            return []
        self.slots = [s for s in self.slots if not s.done]
        out: list[Finished] = []
        ok = []
        for s in done:
            try:
                self.pipe.check_latents(s.bufs["latents"])
            except RuntimeError as e:
                out.append(Finished(s.owner, s.row, None, str(e)))
            else:
                ok.append(s)
        if ok:
            try:
                latents = torch.cat([s.bufs["latents"] for s in ok])  # rows of one flight share their tiling
                pixels = self.pipe.decode(latents, ok[0].row.request)  # [n, H, W, 3]
            except RuntimeError as e:
                out += [Finished(s.owner, s.row, None, str(e)) for s in ok]
            else:
                out += [Finished(s.owner, s.row, self._generated(s, px)) for s, px in zip(ok, pixels, strict=True)]
        self._idle_check()
        return out

    def _generated(self, s: Slot, px: np.ndarray) -> Generated:
        graphed = s.steps_run > 0 and s.graph_steps == s.steps_run  # every step of this image in a graph
        timings = {"in_flight": (time.perf_counter() - s.joined) * 1e3, "steps": float(s.steps_run)}
        return self.pipe.result(s.row, px, graphed, timings)

    def _idle_check(self) -> None:
        if not self.slots:
            self.key = None
            self._stacked = None
            self._padded = None  # graphs stay: the next rows of the same shapes replay them
