"""The torch wrappers export puts around SDXL sub-models (the VAE's are SD's: export/families/sd_wrappers.py).
Kept apart from export/families/sdxl.py so that reading a family does not load torch."""
from __future__ import annotations

import torch

from export.families.token_embedding import text_encoder_call, with_token_inputs


class XLClipWrapper(torch.nn.Module):
    """SDXL's first text encoder: the penultimate hidden state, as StableDiffusionXLPipeline.encode_prompt."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = with_token_inputs(text_encoder)

    def forward(self, input_ids, token_embeds):  # [B, 77] int32, [B, 77, C1] -> [B, 77, C1]
        return text_encoder_call(self.text_encoder, input_ids, token_embeds).hidden_states[-2]


class XLClip2Wrapper(torch.nn.Module):
    """SDXL's second text encoder (with projection): penultimate hidden state and pooled projection."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = with_token_inputs(text_encoder)

    def forward(self, input_ids, token_embeds):  # [B, 77] int32, [B, 77, C2] -> [B, 77, C2], [B, P]
        out = text_encoder_call(self.text_encoder, input_ids, token_embeds)
        return out.hidden_states[-2], out.text_embeds


class CastOutput(torch.nn.Module):
    """`module` with its output cast to `dtype` (set per call by the wrapper that owns it)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module, self.dtype = module, torch.float32

    def forward(self, x):
        return self.module(x).to(self.dtype)


class XLUNetWrapper(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        # diffusers concatenates the float32 time-id embedding with text_embeds; in an fp16 model torch promotes
        # and casts the result to fp16, but the exported ONNX Concat gets mixed types (invalid). Casting the
        # embedding to text_embeds' dtype first gives the same values and a valid graph.
        if not isinstance(unet.add_time_proj, CastOutput):
            unet.add_time_proj = CastOutput(unet.add_time_proj)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, down_residuals=None,
                mid_residual=None, image_embeds=None, ip_scale=None):
        # [2B, 4, h, w], [2B], [2B, 77, C1+C2], [2B, P], [2B, 6] float32; ControlNet residuals when built with them;
        # IP-Adapter image embeddings [2B, D] and scales [2B] when built with one
        from export.families.sd_wrappers import image_prompt

        self.unet.add_time_proj.dtype = text_embeds.dtype
        image, kwargs = image_prompt(image_embeds, ip_scale)
        added = {"text_embeds": text_embeds, "time_ids": time_ids, **(image or {})}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, cross_attention_kwargs=kwargs,
                         down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual,
                         return_dict=False)[0]
