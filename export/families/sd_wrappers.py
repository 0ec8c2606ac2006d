"""The torch wrappers export puts around Stable Diffusion 1.x / 2.x sub-models: each gives a component the
input/output conventions of export/specs.py. Kept apart from export/families/sd.py so that reading a family
(the CLI, the server's request checks) does not load torch."""
from __future__ import annotations

import torch

from export.families.token_embedding import text_encoder_call, with_token_inputs


class ClipWrapper(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = with_token_inputs(text_encoder)

    def forward(self, input_ids, token_embeds):  # [B, 77] int32, [B, 77, C] -> [B, 77, C], [B, L, 77, C]
        out = text_encoder_call(self.text_encoder, input_ids, token_embeds)
        norm = self.text_encoder.get_submodule("final_layer_norm")
        layers = torch.stack(out.hidden_states[1:], dim=1)  # [B, L, 77, C]: each layer's output
        return out.last_hidden_state, norm(layers)  # A1111's clip skip N: layers[:, L - N], through the final norm


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, down_residuals=None, mid_residual=None,
                image_embeds=None, ip_scale=None):
        # [2B, 4, h, w], [2B], [2B, 77, C]; ControlNet residuals (export/control.py) when built with ControlNets;
        # IP-Adapter image embeddings [2B, D] and scales [2B] (export/ip_adapter.py) when built with one
        added, kwargs = image_prompt(image_embeds, ip_scale)
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, cross_attention_kwargs=kwargs,
                         down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual,
                         return_dict=False)[0]


def image_prompt(image_embeds, ip_scale) -> tuple[dict | None, dict | None]:
    """(added_cond_kwargs, cross_attention_kwargs) of an IP-Adapter UNet's call: diffusers' one-adapter, one-image
    list [[2B, 1, D]], and the per-row scale our attention processor reads; (None, None) without them."""
    if image_embeds is None:
        return None, None
    return {"image_embeds": [image_embeds.unsqueeze(1)]}, {"ip_scale": ip_scale}


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.inv_scale = 1.0 / vae.config.scaling_factor

    def forward(self, latent):  # raw latents [B, 4, h, w] -> images [B, 3, H, W] in [-1, 1]
        return self.vae.decode(latent * self.inv_scale, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = vae.config.scaling_factor

    def forward(self, images):  # [B, 3, H, W] in [-1, 1] -> scaled latent mean and std [B, 4, h, w] each
        dist = self.vae.encode(images).latent_dist
        return dist.mean * self.scale, dist.std * self.scale
