"""The torch wrapper export puts around a diffusers ControlNetModel (export/control.py): unscaled residuals as a
flat tuple, down path then mid. Kept apart so that reading a family does not load torch."""
from __future__ import annotations

import torch


class ControlNetWrapper(torch.nn.Module):
    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet
        self.pooled = bool(controlnet.config.get("global_pool_conditions", False))

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        # [2B, 4, h, w], [2B], [2B, 77, C], [2B, 3, H, W] in [0, 1] -> residuals, each [2B, C_k, h_k, w_k]
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, return_dict=False)
        out = (*down, mid)
        if self.pooled:  # diffusers' global pooling (shuffle ControlNets), broadcast back: the same sums in the UNet
            out = tuple(r.mean(dim=(2, 3), keepdim=True).expand_as(r) for r in out)
        return out
