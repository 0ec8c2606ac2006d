"""ControlNet at run time: what a request asks for (`Control`), its checks, and the residuals of one denoise step.

A request names the ControlNets it uses (built with `engine.build --controlnet PATH`, named by the path's stem),
each with its image, scale and the fraction of the steps it applies to, as diffusers' ControlNet pipelines take
them (`controlnet_conditioning_scale`, `control_guidance_start` / `control_guidance_end`, `guess_mode`):

    keep_i   = 0 if i / N < start or (i + 1) / N > end else 1        (N: the steps run; img2img: after strength)
    scale_ik = scale * keep_i * (guess mode: logspace(-1, 0, K)[k], else 1)   for residual k of K
    residual = sum over the request's nets of scale_ik * net(latents, t, text, image)_k

In guess mode with guidance the nets see the conditional rows only and the unconditional rows get no residual.
The scale table of each net is a device buffer [B, N] (per row: rows of one batch have their own scales and
windows), read by the step index (engine/tables.py; step batching passes each row's own step): no host sync,
CUDA-graph safe. A request without control on engines built with ControlNets gives the UNet zero residuals.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.tables import TABLE, table_value
from export.control import PREFIX, residual_names
from export.errors import RequestError

if TYPE_CHECKING:
    import torch

    from engine.backends.base import Runner
    from engine.images import ImageSource

FIELD = "controls"
PREPROCESS = ("canny",)  # engine/preprocess.py's PREPROCESSORS (named here: checks need no OpenCV)
MAX_SCALE = 2.0  # A1111's ControlNet weight range
IMAGE = "control.{}.image"  # a net's images [B, 3, H, W] in [0, 1], by its name
SCALE = TABLE + "control.{}.scale"  # its scale per row and step [B, N] (engine/denoise.py's tables)
GUESS_SCALE = TABLE + "control.{}.guess_scale"  # the same, in guess mode (the name says the mode)


@dataclass(frozen=True)
class Control:
    """One ControlNet a request uses: its name (the stem of the path it was built from), the control image, its
    scale and the fraction of the steps it applies to."""

    name: str
    image: ImageSource
    scale: float = 1.0
    start: float = 0.0  # diffusers' control_guidance_start
    end: float = 1.0  # diffusers' control_guidance_end
    preprocess: str | None = None  # make the map from an ordinary image first: "canny" (engine/preprocess.py)
    low: int = 100  # canny thresholds (engine.preprocess.CANNY_THRESHOLDS)
    high: int = 200

    def source(self) -> ImageSource:
        """The control image as the net sees it (before sizing): the image, or the map made from it."""
        if self.preprocess is None:
            return self.image
        from engine.preprocess import PREPROCESSORS

        return PREPROCESSORS[self.preprocess](self.image, self.low, self.high)


def check(controls: Sequence[Any], guess_mode: Any) -> None:
    """RequestError naming `controls` (or `guess_mode`) for anything no engine could run."""
    if not isinstance(guess_mode, bool):
        raise RequestError("guess_mode", f"guess_mode must be true or false, not {guess_mode!r}")
    if not isinstance(controls, (tuple, list)):
        raise RequestError(FIELD, f"controls must be a list of Control(name, image, scale, start, end), not "
                                  f"{type(controls).__name__}")
    seen = set()
    for c in controls:
        if not isinstance(c, Control):
            raise RequestError(FIELD, f"controls must be Control(name, image, scale, start, end) values, not {c!r}")
        if not isinstance(c.name, str) or not c.name:
            raise RequestError(FIELD, f"a control's name must be a ControlNet's name, not {c.name!r}")
        if c.name in seen:
            raise RequestError(FIELD, f"ControlNet {c.name!r} is named twice; name each once")
        seen.add(c.name)
        if c.image is None:
            raise RequestError(FIELD, f"ControlNet {c.name!r} has no control image")
        for what in ("scale", "start", "end"):
            v = getattr(c, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RequestError(FIELD, f"ControlNet {c.name!r}: {what} {v!r} is not a finite number")
        if not 0 <= c.scale <= MAX_SCALE:
            raise RequestError(FIELD, f"ControlNet {c.name!r}: scale {c.scale} is outside [0, {MAX_SCALE}]")
        if not 0 <= c.start < c.end <= 1:
            raise RequestError(FIELD, f"ControlNet {c.name!r}: start {c.start} and end {c.end} must satisfy "
                                      "0 <= start < end <= 1")
        if c.preprocess is not None and c.preprocess not in PREPROCESS:
            raise RequestError(FIELD, f"ControlNet {c.name!r}: preprocess {c.preprocess!r} is not one of "
                                      f"{', '.join(PREPROCESS)} (or none)")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (c.low, c.high)) \
                or not 0 <= c.low <= c.high <= 255:
            raise RequestError(FIELD, f"ControlNet {c.name!r}: canny thresholds low {c.low!r} and high {c.high!r} "
                                      "must be integers with 0 <= low <= high <= 255")


def check_names(controls: Sequence[Control], built: Sequence[str], model: Any) -> None:
    """RequestError naming `controls` for a ControlNet these engines were not built with."""
    for c in controls:
        if PREFIX + c.name not in built:
            have = ", ".join(n[len(PREFIX):] for n in built) or "none: build with engine.build --controlnet PATH"
            raise RequestError(FIELD, f"unknown ControlNet {c.name!r} for model {model!r}; its engines have {have}")


def keep_table(n: int, start: float, end: float) -> list[float]:
    """1.0 for each of `n` steps run inside [start, end], else 0.0, as diffusers' `controlnet_keep`."""
    return [1.0 - float(i / n < start or (i + 1) / n > end) for i in range(n)]


def scale_table(controls: Sequence[Control], num_steps: int, first: int) -> torch.Tensor:
    """[B, N] one net's scale per row and step (`controls`: that net's Control of each row), zero before `first`
    (img2img's skipped steps) and outside each row's window."""
    import torch

    run = num_steps - first
    rows = [[0.0] * first + [c.scale * k for k in keep_table(run, c.start, c.end)] for c in controls]
    return torch.tensor(rows, dtype=torch.float32)


def buffers(rows: Sequence[Any], num_steps: int, first: int, guess: bool) -> dict[str, torch.Tensor]:
    """The step buffers of a batch whose rows use the same nets in the same order: per net its images [B, 3, H, W]
    and its scale table [B, N] (named for guess mode when it is on)."""
    import torch

    out = {}
    for j, c in enumerate(rows[0].request.controls):
        out[IMAGE.format(c.name)] = torch.cat([row.controls[j] for row in rows])  # [B, 3, H, W] in [0, 1]
        table = (GUESS_SCALE if guess else SCALE).format(c.name)
        out[table] = scale_table([row.request.controls[j] for row in rows], num_steps, first)
    return out


def names_in(b: dict[str, Any]) -> list[str]:
    """The nets a step's buffers feed, in the request's order."""
    head, tail = IMAGE.split("{}")
    return [k[len(head):-len(tail)] for k in b if k.startswith(head) and k.endswith(tail)]


@dataclass(frozen=True)
class ControlStep:
    """The residuals the UNet takes at one step: from this batch's nets (in the request's order), or zeros."""

    nets: tuple[Runner, ...]
    channels: tuple[int, ...]  # each residual's channels and downscale (Dims.residual_channels / _scales)
    scales: tuple[int, ...]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 cfg: bool) -> dict[str, torch.Tensor]:
        """The UNet's residual inputs for its input rows `x` [2B or B, C, h, w] at timesteps `t`."""
        import torch

        names = residual_names(len(self.channels))
        if not self.nets:  # engines built with ControlNets, a request without: the UNet adds zeros
            n, _, h, w = x.shape
            return {k: torch.zeros((n, c, h // s, w // s), dtype=x.dtype, device=x.device)
                    for k, c, s in zip(names, self.channels, self.scales, strict=True)}
        nets = names_in(b)
        guess = GUESS_SCALE.format(nets[0]) in b
        half = guess and cfg  # guess mode: the nets see the conditional rows only
        xs, ts = (x.chunk(2)[1], t.chunk(2)[1]) if half else (x, t)
        cs = {k: v.chunk(2)[1] for k, v in cond.items()} if half else cond
        factors = _guess_factors(len(names), x.device) if guess else None
        total: list[torch.Tensor] | None = None
        for name, net in zip(nets, self.nets, strict=True):
            image = b[IMAGE.format(name)]  # [B, 3, H, W]
            image = torch.cat([image, image]) if cfg and not half else image  # the [uncond; cond] rows
            out = net(sample=xs, timestep=ts, controlnet_cond=image, **cs)
            scale = table_value(b[(GUESS_SCALE if guess else SCALE).format(name)], b["idx"])  # [B]
            scale = torch.cat([scale, scale]) if cfg and not half else scale  # [2B] or [B]
            res = [out[k].float() * scale.view(-1, 1, 1, 1) * (factors[k2] if factors is not None else 1.0)
                   for k2, k in enumerate(names)]
            total = res if total is None else [a + r for a, r in zip(total, res, strict=True)]
        assert total is not None
        if half:  # no residual for the unconditional rows
            total = [torch.cat([torch.zeros_like(r), r]) for r in total]
        return dict(zip(names, total, strict=True))


def _guess_factors(n: int, device: Any) -> torch.Tensor:
    """diffusers' guess-mode weights of the residuals: 0.1 .. 1.0, log-spaced, the mid residual's last."""
    import torch

    return torch.logspace(-1, 0, n, device=device)
