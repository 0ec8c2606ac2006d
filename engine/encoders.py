"""A family's condition encoders, found by role: the class-conditional LDM's class table (`context_encoder`: class
ids -> the denoiser's cross-attention context) and semantic synthesis's spatial rescaler (`map_encoder`: a label map
-> channels concatenated to the latents). Each runs once per batch, on the request-conditioning inputs its spec names
(`Family.request_conditioning`), and its outputs replace them."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

ROLES = ("context_encoder", "map_encoder")


def run(has_role: Callable[[str], bool], role: Callable[[str], Any], cond: dict[str, Any]) -> dict[str, Any]:
    """`cond` with each present encoder's inputs replaced by its outputs (copied: a runner may reuse its buffers)."""
    for name in ROLES:
        if has_role(name):
            encoder = role(name)
            inputs = {n: cond.pop(n).to(encoder.device) for n in encoder.spec.input_names}
            cond.update({k: v.clone() for k, v in encoder(**inputs).items()})
    return cond
