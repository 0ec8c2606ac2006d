"""Control-image preprocessors: an ordinary photo -> the map a ControlNet was trained on. Only those that need no
model of their own: `canny` (OpenCV's Canny edges, white on black, as the canny ControlNets were trained on and as
diffusers' ControlNet guide makes them). Other maps (depth, pose) come preprocessed."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.images import ImageSource, open_image

CANNY_THRESHOLDS = (100, 200)  # low, high: diffusers' ControlNet guide and A1111's defaults


def canny(source: ImageSource, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1],
          what: str = "control image") -> np.ndarray:
    """Canny edges of an image: uint8 [H, W, 3], 255 on edges (the same map in each channel)."""
    import cv2

    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high <= 255):
        raise ValueError(f"canny thresholds {low!r}, {high!r} must be integers with 0 <= low <= high <= 255")
    rgb = np.asarray(open_image(source, what).convert("RGB"))
    edges = cv2.Canny(rgb, low, high)  # [H, W] uint8
    return np.repeat(edges[:, :, None], 3, axis=2)


PREPROCESSORS: dict[str, Callable[..., np.ndarray]] = {"canny": canny}
