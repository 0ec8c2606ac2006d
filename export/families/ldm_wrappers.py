"""The torch wrappers export puts around the Latent Diffusion paper's models (export/families/ldm.py)."""
from __future__ import annotations

import torch

from export.families.token_embedding import text_encoder_call, with_token_inputs


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


class VqDecoderScaled(VqDecoderWrapper):
    """As VqDecoderWrapper, after dividing by the autoencoder's scaling factor (LDMPipeline's and
    LDMTextToImagePipeline's decode; the spec's convention: raw latents, the scaling inside the graph)."""

    def forward(self, latent):
        return super().forward(latent / self.vqvae.config.scaling_factor)


class VqEncoderWrapper(torch.nn.Module):
    """VQModel.encode: images -> latents before quantisation, and a zero std (a VQ latent is no distribution)."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, images):
        latent = self.vqvae.encode(images, return_dict=False)[0]
        return latent, torch.zeros_like(latent)


class VqEncoderScaled(VqEncoderWrapper):
    """As VqEncoderWrapper, times the scaling factor (the latents VqDecoderScaled takes)."""

    def forward(self, images):
        latent = self.vqvae.encode(images, return_dict=False)[0] * self.vqvae.config.scaling_factor
        return latent, torch.zeros_like(latent)


class ClassEmbedderWrapper(torch.nn.Module):
    """The class-conditional LDM's embedding table: class ids [2B] int32 -> context [2B, 1, D]."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, class_ids):  # -1 (a guidance row) -> the table's last row, the unconditional class
        last = torch.full_like(class_ids, self.embedder.config.n_classes - 1)
        return self.embedder(torch.where(class_ids < 0, last, class_ids))


class LdmBertWrapper(torch.nn.Module):
    """LDMBert (the text LDM's encoder): token ids [B, 77] int32 (negative: `token_embeds`' row, textual inversion)
    -> its last hidden state [B, 77, C], as LDMTextToImagePipeline reads `bert(ids)[0]` (no attention mask)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert  # parameter names as stored: model.*
        with_token_inputs(bert.model)  # LDMBertModel's LDMBertEncoder: what its forward calls

    def forward(self, input_ids, token_embeds):
        return text_encoder_call(self.bert.model, input_ids, token_embeds).last_hidden_state


class SemanticEncoderWrapper(torch.nn.Module):
    """The spatial rescaler on a label map: labels [B, 1, H, W] int32 -> the condition [B, C, H/f, W/f]. The 1x1
    convolution and the bilinear resizing are both linear, so they commute: each pixel's class picks its column of the
    convolution's weight (a Gather; no [B, classes, H, W] one-hot), then the resizing, then the bias (the same values
    as SpatialRescaler.forward on the one-hot map, to rounding)."""

    def __init__(self, rescaler):
        super().__init__()
        self.rescaler = rescaler

    def forward(self, labels):
        conv = self.rescaler.channel_mapper
        columns = conv.weight[:, :, 0, 0].t()  # [classes, C]
        x = columns[labels[:, 0].long()].permute(0, 3, 1, 2)  # [B, C, H, W]
        for _ in range(self.rescaler.config.n_stages):
            x = torch.nn.functional.interpolate(x, scale_factor=self.rescaler.config.multiplier, mode="bilinear")
        return x if conv.bias is None else x + conv.bias.view(1, -1, 1, 1)


class LayoutEncoderWrapper(torch.nn.Module):
    """The layout model's transformer (LDMBert's encoder, no tokenizer): tokens [B, 92] int32 -> [B, 92, D]."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, layout_tokens):
        return self.bert(layout_tokens.long(), return_dict=False)[0]
