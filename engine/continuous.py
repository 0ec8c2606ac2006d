"""Continuous (step-level) batching: images join and leave the running UNet batch at every step boundary.

A `Flight` holds the images in flight on one pipeline. Each image (a `Slot`) keeps its own buffers, its own
schedule and its own step index, so rows with different step counts (and img2img start steps) share one
UNet call per step; `step()` runs that call for every slot: the per-row step indices i [B] read per-row
tables (`samplers.stack`) and the UNet gets each row's own timestep (engine/denoise.py). A slot whose
last step ran is `done`; `finish` decodes the done slots together and hands back their images.

What may share a batch (`flex_key`): the same adapters, kind, size, sampler and guidance on/off; the step
count and strength may differ. One sampler per batch because the sampler's update is one function of
the tables (`samplers.step`): mixing Euler and DPM++ 2M rows would need both updates in every step.

Parity: a slot starts from exactly the buffers `Pipeline.run` would give it (the same per-image generators,
drawn in the same order), and every per-row quantity is per row, so an image equals the same request run
alone (up to the UNet's own batch-size numerics). Randomness per step (ancestral samplers) is drawn up
front per row, as in `Pipeline.run`; the step's draw is picked per row on the host, which knows each
row's step: no host sync inside the step.

On CPU the step runs eager. (CUDA graphs per batch-size bucket are not captured here yet: see the README.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine import samplers
from engine.denoise import COND, denoise_step
from engine.graphs import Buffers
from engine.pipeline import Pipeline, Row
from engine.request import Generated, Request, image_params, time_ids_of

PAIRED = ("concat",)  # besides cond.*: buffers laid out [uncond rows; cond rows] (2B) with guidance


def flex_key(r: Request) -> tuple:
    """What the rows of resolved requests must share to run in one batch (steps and strength may differ)."""
    return (r.loras, r.kind, r.height, r.width, r.sampler, r.guidance_scale > 1.0)


def _paired(name: str, cfg: bool) -> bool:
    return cfg and (name.startswith(COND) or name in PAIRED)


@dataclass(eq=False)
class Slot:
    """One image in flight."""
    row: Row
    owner: Any  # the caller's handle (e.g. a server job); `drop` removes an owner's slots
    schedule: samplers.Schedule  # this row's own, on the device
    idx: int  # the next step to run
    bufs: Buffers  # batch dim 1; paired buffers hold [uncond; cond] (2 rows)
    noise: torch.Tensor | None  # [N, 1, 4, h, w] per-step draws (ancestral samplers)
    joined: float = field(default_factory=time.perf_counter)
    steps_run: int = 0

    @property
    def done(self) -> bool:
        return self.idx >= self.schedule.num_steps


@dataclass
class Finished:
    owner: Any
    row: Row
    image: Generated | None
    error: str | None = None


class Flight:
    def __init__(self, pipe: Pipeline, max_batch: int):
        self.pipe, self.max_batch = pipe, max_batch
        self.slots: list[Slot] = []
        self.key: tuple | None = None  # flex key of the rows in flight
        self._stacked: tuple[tuple, samplers.Schedule] | None = None

    @property
    def free(self) -> int:
        return self.max_batch - len(self.slots)

    def accepts(self, row: Row) -> bool:
        return self.key is None or (flex_key(row.request) == self.key and self.free > 0)

    # ---- join ----

    def admit(self, rows: list[Row], owners: list[Any]) -> list[Slot]:
        """Rows (of one flex key; `owners[k]` is row k's) join the batch: text encoding and start latents now,
        their first step with the next `step()`. Raises ValueError if they do not fit."""
        if not rows:
            return []
        key = flex_key(rows[0].request)
        if any(flex_key(r.request) != key for r in rows) or (self.key is not None and key != self.key):
            raise ValueError("admit: rows of another flex key than the batch in flight")
        if len(rows) > self.free:
            raise ValueError(f"admit: {len(rows)} rows, {self.free} free slots")
        if self.key is None:
            self.pipe.use_adapters(key[0])
            self.key = key
        cfg = key[-1]
        p = self.pipe
        cond = p.encode([x.request.prompt for x in rows], [x.request.negative_prompt for x in rows] if cfg else None,
                        [time_ids_of(x.request) for x in rows] if p.family.time_ids else None)
        n = len(rows)
        new: list[Slot] = []
        groups: dict[tuple, list[int]] = {}  # rows that share a schedule start together, as Pipeline.run would
        for k, row in enumerate(rows):
            groups.setdefault((row.request.steps, row.request.strength), []).append(k)
        for members in groups.values():
            r = rows[members[0]].request
            schedule = p.schedule(r.sampler, r.steps, r.strength)
            start = p._start_latents([rows[k] for k in members], schedule, cfg)
            if cfg:
                start["guidance"] = torch.tensor([rows[k].request.guidance_scale for k in members]).view(-1, 1, 1, 1)
            noise = start.pop("noise", None)  # [N, b, 4, h, w]
            for j, k in enumerate(members):
                bufs = {name: self._row_of(v, k, n, _paired(name, cfg)) for name, v in cond.items()}
                bufs.update({name: self._row_of(v, j, len(members), _paired(name, cfg)) for name, v in start.items()})
                bufs = {name: v.to(p.device) for name, v in bufs.items()}
                row_noise = noise[:, j:j + 1].to(p.device) if noise is not None else None
                new.append(Slot(rows[k], owners[k], schedule, schedule.start, bufs, row_noise))
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
        """One denoising step for every slot in flight (each at its own step index)."""
        slots = [s for s in self.slots if not s.done]
        if not slots:
            return
        cfg = bool(self.key and self.key[-1])
        dev = self.pipe.device
        b: Buffers = {"idx": torch.tensor([s.idx for s in slots], dtype=torch.long, device=dev)}
        for name in slots[0].bufs:
            parts = [s.bufs[name] for s in slots]
            if _paired(name, cfg):  # [uncond rows; cond rows]
                b[name] = torch.cat([p[:1] for p in parts] + [p[1:] for p in parts])
            else:
                b[name] = torch.cat(parts)
        if slots[0].noise is not None:
            b["noise"] = torch.cat([s.noise[s.idx] for s in slots])  # this step's draw per row [B, 4, h, w]
        latents, state = denoise_step(self.pipe.runners["unet"], self._schedule(slots), cfg, b)
        for k, s in enumerate(slots):
            s.bufs["latents"], s.bufs["state"] = latents[k:k + 1], state[k:k + 1]
            s.idx += 1
            s.steps_run += 1

    def _schedule(self, slots: list[Slot]) -> samplers.Schedule:
        ids = tuple(id(s.schedule) for s in slots)
        if self._stacked is None or self._stacked[0] != ids:
            self._stacked = (ids, samplers.stack([s.schedule for s in slots]))
        return self._stacked[1]

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
            if bool(torch.isfinite(s.bufs["latents"]).all()):
                ok.append(s)
            else:
                precision = self.pipe.info.get("precision")
                hint = " (fp16 overflow? rebuild with --precision fp32)" if precision == "fp16" else ""
                out.append(Finished(s.owner, s.row, None, f"the denoise loop (unet) produced NaN/Inf values{hint}"))
        if ok:
            try:
                pixels = self.pipe.decode(torch.cat([s.bufs["latents"] for s in ok]))  # [n, H, W, 3]
            except RuntimeError as e:
                out += [Finished(s.owner, s.row, None, str(e)) for s in ok]
            else:
                out += [Finished(s.owner, s.row, self._generated(s, px)) for s, px in zip(ok, pixels)]
        self._idle_check()
        return out

    def _generated(self, s: Slot, px: np.ndarray) -> Generated:
        p = self.pipe
        params = {**image_params(s.row.request, s.row.k), **p._engine_params(), "cuda_graph": False}
        if p._applied_info:
            params["loras"] = p._applied_info
        timings = {"in_flight": (time.perf_counter() - s.joined) * 1e3, "steps": float(s.steps_run)}
        return Generated(px, params, timings)

    def _idle_check(self) -> None:
        if not self.slots:
            self.key = None
            self._stacked = None
