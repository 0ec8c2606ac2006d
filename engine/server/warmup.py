"""The server's warm-up request: one short generation before /readyz says ready, so the first client does not pay
for the engines' first run (ONNX Runtime's and TensorRT's lazy set-up, CUDA graph capture)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import PIL.Image

from engine.request import Request

if TYPE_CHECKING:
    from engine.pipeline import Pipeline

WARMUP_STEPS = 2


def warmup_request(pipe: Pipeline) -> Request:
    """A short request the engines take: txt2img; for a model that takes images only (the SDXL refiner, the x4
    upscaler), img2img of a gray image at the engine's default size (the upscaler's: that size / its VAE's scale)."""
    prompt = "warm-up" if pipe.family.roles.text_encoders else None  # a model without text takes none
    if pipe.family.txt2img:  # with what else the family needs (a semantic map)
        opt, fields = pipe.profile.opt, pipe.family.warmup_fields
        return Request(prompt=prompt, steps=WARMUP_STEPS, **(fields(opt.height, opt.width) if fields else {}))
    opt, scale = pipe.profile.opt, pipe.dims.vae_scale if pipe.family.low_res else 1
    gray = PIL.Image.new("RGB", (opt.width // scale, opt.height // scale), (128, 128, 128))
    return Request(prompt=prompt, steps=WARMUP_STEPS, init_image=gray, height=opt.height, width=opt.width)
