"""Admission by cost: a request that would hold the engine past --timeout-s is refused before it runs.

A request's cost is its denoising work: steps it runs x megapixels x UNet rows (images, twice with guidance). The
server learns what one unit costs here from its own runs (the warm-up first): each batch's mean step time over its
megapixels and rows, smoothed. A request whose estimated denoising time alone is over --timeout-s is a 400 naming
`steps` with the figures, at once, instead of a 504 after the timeout (before, it then kept computing). The
estimate leaves out text encoding, decoding and queueing, and is taken at the measured sizes (attention grows
faster than the pixels), so it errs towards admitting (an img2img request without a strength is counted at 1, an
overestimate of at most 1 / 0.8 there).
`--max-cost` adds a fixed cap in megapixel-steps, for operators who would rather state it.
"""
from __future__ import annotations

import math

from engine.request import TIMING_STEP, Generated, Request
from engine.server.schemas import ApiError

RATE_WEIGHT = 0.2  # weight of the newest batch in the moving average of seconds per megapixel-row-step


def rows(request: Request) -> int:
    return request.images * (2 if request.guidance_scale > 1.0 else 1)


def megapixels(request: Request, height: int, width: int) -> float:
    return (request.height or height) * (request.width or width) / 1e6


def run_steps(request: Request) -> int:
    """Steps the request runs: img2img and inpainting run the last `strength` of them (the family's default strength
    when none is given is below 1: counting 1 only overestimates)."""
    if request.kind == "txt2img" or request.strength is None:
        return request.steps
    return max(1, math.ceil(request.steps * request.strength))


def check_max_size(asked: Request, made: Request | None, max_size: int, params: dict[str, str]) -> None:
    """ApiError 400 for a side over --max-size: of the request as asked (`made` None: before any work), or of what
    the engine made of it (a size it chose: the x4 upscaler's is 4x its image, named as init_image)."""
    for side in ("height", "width"):
        value = getattr(made or asked, side)
        if value is not None and value > max_size:
            chosen = made is not None and getattr(asked, side) is None and asked.init_image is not None
            field, what = ("init_image", " (what this request makes)") if chosen else (side, "")
            raise ApiError(400, f"{side} {value}{what} is over this server's limit (--max-size {max_size})",
                           params.get(field, field))


def cost(request: Request, height: int, width: int) -> float:
    """Megapixel-steps of one request (per image; guidance's second row counted in `estimate_s`, not here); the
    hires fix's second pass counted at its size."""
    total = run_steps(request) * megapixels(request, height, width)
    if request.hires_scale is not None:
        second = math.ceil((request.hires_steps or request.steps) * request.hires_strength)
        total += second * megapixels(request, height, width) * request.hires_scale ** 2
    return total * request.images


class CostMeter:
    """Seconds per megapixel-row-step, learned from runs; refuses what cannot finish within the timeout."""

    def __init__(self, timeout_s: float, max_cost: float | None, enabled: bool = True):
        self.timeout_s, self.max_cost, self.enabled = timeout_s, max_cost, enabled
        self.rate_s: float | None = None  # None until a run was measured

    def observe(self, images: list[Generated], batch_images: int) -> None:
        """Learn from a finished batch: its mean step time over its megapixels and rows."""
        if not images:
            return
        params, timings = images[0].params, images[0].timings_ms
        step_ms = timings.get(TIMING_STEP)
        if step_ms is None and timings.get("steps"):  # step batching: time in flight over steps run
            step_ms = timings["in_flight"] / timings["steps"]
        try:
            mpx = int(params["height"]) * int(params["width"]) / 1e6
            guided = float(params["guidance_scale"]) > 1.0
        except (KeyError, TypeError, ValueError):
            return  # an image without its size in its parameters: nothing to learn from it
        if not step_ms or mpx <= 0:
            return
        sample = step_ms / 1e3 / (mpx * batch_images * (2 if guided else 1))
        self.rate_s = sample if self.rate_s is None else self.rate_s + RATE_WEIGHT * (sample - self.rate_s)

    def estimate_s(self, request: Request, height: int, width: int) -> float | None:
        """Seconds the request's denoising would take here alone, or None before any measurement."""
        if self.rate_s is None:
            return None
        return self.rate_s * run_steps(request) * megapixels(request, height, width) * rows(request)

    def check(self, request: Request, height: int, width: int, steps_field: str = "steps") -> None:
        """ApiError 400 naming `steps_field` when the request is over --max-cost or cannot finish in time."""
        if not self.enabled:
            return
        units = cost(request, height, width)
        shape = (f"{request.width or width}x{request.height or height}, {run_steps(request)} steps, "
                 f"{request.images} image(s)")
        if self.max_cost is not None and units > self.max_cost:
            raise ApiError(400, f"this request ({shape}: {units:.1f} megapixel-steps) is over this server's "
                                f"--max-cost {self.max_cost:g}: ask for fewer steps, a smaller size or fewer images",
                           steps_field)
        seconds = self.estimate_s(request, height, width)
        if seconds is not None and seconds > self.timeout_s:
            raise ApiError(400, f"this request ({shape}) would denoise for about {seconds:.0f} s here, over "
                                f"--timeout-s {self.timeout_s:g}: ask for fewer steps, a smaller size or fewer "
                                "images", steps_field)
