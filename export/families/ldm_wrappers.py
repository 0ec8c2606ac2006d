"""The torch wrappers export puts around the Latent Diffusion paper's models (export/families/ldm.py)."""
from __future__ import annotations

import torch


class Unet2DWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):  # [B, C (+ condition), h, w], [B] -> [B, C, h, w]
        return self.unet(sample, timestep, return_dict=False)[0]


def quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each latent vector [B, C, h, w] replaced by its nearest codebook entry [K, C]: argmin of |z|^2 + |e|^2 - 2 z.e
    (MatMul + ArgMin + Gather in ONNX; the same argmin as VectorQuantizer's cdist)."""
    b, c, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # [B*h*w, C]
    dist = (flat * flat).sum(1, keepdim=True) + (codebook * codebook).sum(1)[None] - 2 * flat @ codebook.t()
    chosen = codebook[dist.argmin(dim=1)]  # [B*h*w, C]
    return chosen.reshape(b, h, w, c).permute(0, 3, 1, 2)


class VqDecoderWrapper(torch.nn.Module):
    """VQModel.decode(latent) with its default quantisation: latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1]."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, latent):
        vq = self.vqvae
        quant = quantize(latent, vq.quantize.embedding.weight)
        return vq.decoder(vq.post_quant_conv(quant), quant if vq.config.norm_type == "spatial" else None)


class VqEncoderWrapper(torch.nn.Module):
    """VQModel.encode: images -> latents before quantisation, and a zero std (a VQ latent is no distribution)."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, images):
        latent = self.vqvae.encode(images, return_dict=False)[0]
        return latent, torch.zeros_like(latent)
