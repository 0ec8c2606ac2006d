"""The torch wrapper export puts around the x4 upscaler's UNet (export/families/upscale.py); its text encoder and
VAE decoder take SD's (export/families/sd_wrappers.py)."""
from __future__ import annotations

import torch


class UpscaleUNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, class_labels):
        # [2B, 7, h, w] (latents, then the noised low-res image), [2B], [2B, 77, C], noise levels int32 [2B]
        return self.unet(sample, timestep, encoder_hidden_states, class_labels=class_labels.long(),
                         return_dict=False)[0]
