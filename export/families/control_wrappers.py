"""The torch wrapper export puts around a diffusers ControlNetModel (export/control.py): unscaled residuals as a
flat tuple, down path then mid. SDXL's ControlNets also take the UNet's added conditioning (text_embeds, time_ids).
Kept apart so that reading a family does not load torch."""
from __future__ import annotations

import torch

from export.families.sdxl_wrappers import CastOutput


class ControlNetWrapper(torch.nn.Module):
    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet
        self.pooled = bool(controlnet.config.get("global_pool_conditions", False))
        proj = getattr(controlnet, "add_time_proj", None)
        if proj is not None and not isinstance(proj, CastOutput):  # as XLUNetWrapper: a valid fp16 graph
            controlnet.add_time_proj = CastOutput(proj)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, text_embeds=None, time_ids=None):
        # [2B, 4, h, w], [2B], [2B, 77, C], [2B, 3, H, W] in [0, 1] (SDXL: [2B, P], [2B, 6]) -> residuals
        added = None
        if text_embeds is not None:
            self.controlnet.add_time_proj.dtype = text_embeds.dtype
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, added_cond_kwargs=added,
                                    return_dict=False)
        out = (*down, mid)
        if self.pooled:  # diffusers' global pooling (shuffle ControlNets), broadcast back: the same sums in the UNet
            out = tuple(r.mean(dim=(2, 3), keepdim=True).expand_as(r) for r in out)
        return out
