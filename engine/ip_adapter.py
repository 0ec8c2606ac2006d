"""IP-Adapter at run time: a request's image prompt, made into the image encoder's input, and the denoiser's image
embeddings and scales (export/ip_adapter.py builds the components).

As diffusers' pipelines with a plain IP-Adapter (`ip_adapter_image`, `set_ip_adapter_scale`): the image is
resized (shortest side, bicubic), centre-cropped and CLIP-normalised as its CLIPImageProcessor does; the encoder's
projected embedding conditions the guided rows and zeros the unguided ones, and the adapter's attention is weighted
by the scale. Per row: rows of one batch have their own image and scale; a row without an image prompt gets zero
embeddings and scale 0, which gives the text-only result exactly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from export.errors import RequestError
from export.ip_adapter import EMBEDS, SCALE

if TYPE_CHECKING:  # torch, numpy and PIL load with the first image prompt, not with the CLI's arguments
    import torch

    from engine.backends.base import Runner
    from engine.images import ImageSource

FIELD = "ip_image"
MAX_SCALE = 2.0  # the range A1111's ControlNet extension offers for an IP-Adapter unit's weight


def check(image: Any, scale: Any) -> None:
    """RequestError naming `ip_scale` for a scale no engine could run (the image is read by `pixels`)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise RequestError("ip_scale", f"ip_scale must be a number, not {scale!r}")
    if not 0 <= scale <= MAX_SCALE:
        raise RequestError("ip_scale", f"ip_scale {scale:g} is outside [0, {MAX_SCALE:g}] (0 = no image prompt)")


def request_pixels(source: ImageSource | None, built: dict[str, Any] | None, model: str | None) -> torch.Tensor | None:
    """A request's image prompt (None: none) as the image encoder's input; RequestError naming `ip_image` when the
    engines were built without an IP-Adapter (`built`: their record of it) or the image is not one."""
    if source is None:
        return None
    if built is None:
        raise RequestError(FIELD, f"model {model!r} was built without an IP-Adapter: rebuild with python -m "
                                  f"engine.build --model {model} --ip-adapter FILE")
    return pixels(source, built)


def pixels(source: ImageSource, prep: dict[str, Any]) -> torch.Tensor:
    """An image prompt -> the encoder's `pixel_values` [1, 3, S, S] float32, as CLIPImageProcessor makes them:
    RGB, shortest side resized to prep["resize"] (bicubic), centre crop prep["crop"], [0, 1], (x - mean) / std.
    RequestError naming `ip_image` when it is not an image."""
    import numpy as np
    import PIL.Image
    import torch

    from engine.images import open_image

    try:
        img = open_image(source, "IP-Adapter image").convert("RGB")
    except ValueError as exc:
        raise RequestError(FIELD, str(exc)) from None
    short, crop = int(prep["resize"]), int(prep["crop"])
    w, h = img.size
    size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)  # (height, width)
    img = img.resize((size[1], size[0]), resample=PIL.Image.Resampling.BICUBIC, reducing_gap=None)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    x = np.asarray(img, dtype=np.float32)[top:top + crop, left:left + crop] * np.float32(1 / 255)  # [S, S, 3]
    x = (x - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).unsqueeze(0)  # [1, 3, S, S]


def embeddings(encoder: Runner, rows: Sequence[Any], cfg: bool, width: int) -> dict[str, torch.Tensor]:
    """The denoiser's `image_embeds` [2B, D] ([B, D] without guidance; D = `width`) and `ip_scale` [2B]: each row's
    image prompt encoded (zeros for rows without one and for the unguided half) and its scale (0 without one)."""
    import torch

    embeds = torch.zeros(len(rows), width)  # [B, D]
    given = [k for k, row in enumerate(rows) if row.ip_image is not None]
    if given:
        batch = torch.cat([rows[k].ip_image for k in given]).to(encoder.device)  # [G, 3, S, S]
        embeds[given] = encoder(pixel_values=batch)[EMBEDS].float().cpu()  # a copy: runner outputs are borrowed
    scale = torch.tensor([float(row.request.ip_scale) if row.ip_image is not None else 0.0 for row in rows])  # [B]
    if cfg:
        embeds, scale = torch.cat([torch.zeros_like(embeds), embeds]), torch.cat([scale, scale])
    return {EMBEDS: embeds, SCALE: scale}
