"""Live previews of a run, and the choice of decoder (the model's VAE, or the tiny one: export/tiny_vae.py).

`Previews(every=K, emit=fn)` given to `Pipeline.run` calls `emit(step, total, rows, pixels)` after every step: the
steps done of the batch's `total`, its rows (`Row.req` indexes the run's requests, `Row.k` the image of one) and,
every K steps (not after the last: that is the image), their pixels [B, H, W, 3] uint8 (else None; K = 0: progress
only). Previews decode
with the tiny decoder where the engines have one (`engine.build --tiny-vae DIR`), else with the VAE. The decode runs
on the host between two steps, after the step loop has written the latents (never inside a captured step), so a
preview costs the step loop its decode and nothing else; a run without previews does no extra work.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.request import Request, RequestError

Emit = Callable[[int, int, list, "np.ndarray | None"], None]  # (steps done, total, rows, pixels [B, H, W, 3] or None)


@dataclass(frozen=True)
class Previews:
    every: int  # steps between decoded previews, >= 0 (0: progress only)
    emit: Emit

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"previews every {self.every!r} steps: must be an integer >= 0")

    def due(self, done: int, total: int) -> bool:
        """Whether a decoded preview follows step `done` (1-based) of `total`: every K steps, never after the last."""
        return self.every > 0 and done % self.every == 0 and done < total


def decoder_role(r: Request | None) -> str:
    """The family role that decodes a request's final images."""
    return "preview_decoder" if r is not None and r.decoder == "tiny" else "latent_decoder"


def check(r: Request, has_tiny: bool, model: Any) -> None:
    """RequestError naming `decoder`, before any work, for the tiny decoder on engines built without one."""
    if r.decoder == "tiny" and not has_tiny:
        raise RequestError("decoder", f"decoder 'tiny' needs engines built with a tiny VAE: python -m engine.build "
                                      f"--model {model or 'MODEL'} --tiny-vae TAESD_DIR")


def writer(folder: Path) -> Emit:
    """An `emit` that writes each preview as `<folder>/step-<NNNN>-<request>-<image>.png` (the CLI's)."""
    from PIL import Image

    def emit(done: int, total: int, rows: list, pixels: np.ndarray | None) -> None:
        if pixels is None:  # a step without a preview
            return
        folder.mkdir(parents=True, exist_ok=True)
        for row, px in zip(rows, pixels, strict=False):
            path = folder / f"step-{done:04d}-{row.req}-{row.k}.png"
            tmp = path.with_suffix(".tmp")
            Image.fromarray(px).save(tmp, format="PNG")
            tmp.replace(path)  # atomic: a viewer never reads half a file

    return emit
