"""The torch wrappers of feature caching (export/feature_cache.py): the UNet's forward, as diffusers'
UNet2DConditionModel runs it for SD and SDXL inputs, split at one skip branch as DeepCache's helper splits it.

`full_b<B>`: every layer, returning the latents' prediction and the cache of branch B (the deep feature entering the
partly run up block's first layer that a shallow step runs, then the skips it reads from skipped down blocks).
`shallow_b<B>`: the time embedding, conv_in, the down blocks above the branch, the partly run up block from that
layer on and the up blocks above it, reading the cache instead of the skipped part. The module attributes are made
on demand (`full_b0`, `shallow_b3`, ...), so a family's wrapper name says its branch.
"""
from __future__ import annotations

import functools

import torch

from export.families.sdxl_wrappers import CastOutput
from export.feature_cache import split


class CacheUNet(torch.nn.Module):
    def __init__(self, unet, branch: int, shallow: bool):
        super().__init__()
        self.unet, self.shallow = unet, shallow
        if unet.config.addition_embed_type == "text_time" and not isinstance(unet.add_time_proj, CastOutput):
            unet.add_time_proj = CastOutput(unet.add_time_proj)  # as XLUNetWrapper: a valid Concat in fp16 graphs
        downs = list(unet.down_blocks)
        self.split = split(branch, [len(b.resnets) for b in downs], [b.downsamplers is not None for b in downs],
                           [len(b.resnets) for b in unet.up_blocks])

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, cache=None):
        # [2B, 4, h, w], [2B], [2B, 77, C]; SDXL: [2B, P], [2B, 6]; shallow: the cache tuple (export/feature_cache.py)
        u, s = self.unet, self.split
        emb, ehs = self._embedding(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        factor = 2 ** u.num_upsamplers
        up_size = any(d % factor != 0 for d in sample.shape[-2:])  # diffusers' forward_upsample_size
        sample = u.conv_in(sample)
        skips: tuple = (sample,)
        for block in u.down_blocks[:s.down_run] if self.shallow else u.down_blocks:
            sample, res = _down(block, sample, emb, ehs)
            skips += res
        feature = None
        if self.shallow:  # down block c's first layers, then the cache where the skipped part would have put its own
            skips += _down_layers(u.down_blocks[s.down_run], sample, emb, ehs, s.down_layers)
            feature, cached = cache[0], dict(zip(s.cached_skips, cache[1:], strict=True))
            n = len(u.up_blocks[s.up_block].resnets)
            skips = tuple(cached.get(p, skips[p] if p < len(skips) else None) for p in range(s.skip_start + n))
            first = s.up_block
        else:
            sample = _mid(u.mid_block, sample, emb, ehs)
            first = 0
        out_cache: list = []
        for i in range(first, len(u.up_blocks)):
            block = u.up_blocks[i]
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if i < len(u.up_blocks) - 1 and up_size else None
            if i != s.up_block:
                sample = _up(block, sample, emb, ehs, res, size)
                continue
            j0 = s.first_layer
            if self.shallow:
                sample = feature
            else:
                sample = _up_layers(block, sample, emb, ehs, res, 0, j0)
                out_cache = [sample] + [res[p - s.skip_start] for p in s.cached_skips]
            sample = _up_layers(block, sample, emb, ehs, res, j0, n)
            if block.upsamplers is not None:
                for upsampler in block.upsamplers:
                    sample = upsampler(sample, size)
        if u.conv_norm_out:
            sample = u.conv_act(u.conv_norm_out(sample))
        sample = u.conv_out(sample)
        return sample if self.shallow else (sample, *out_cache)

    def _embedding(self, sample, timestep, ehs, text_embeds, time_ids):
        """(the time embedding, the cross-attention context), as diffusers' forward makes them."""
        u = self.unet
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        if text_embeds is not None:
            u.add_time_proj.dtype = text_embeds.dtype
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            emb = emb + u.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        return emb, u.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=None)


def _down(block, sample, emb, ehs):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
    return block(hidden_states=sample, temb=emb)


def _down_layers(block, sample, emb, ehs, count: int) -> tuple:
    """The skips of a down block's first `count` resnets (and attentions), as its forward makes them."""
    attentions = getattr(block, "attentions", None)
    out: tuple = ()
    for j in range(count):
        sample = block.resnets[j](sample, emb)
        if attentions is not None:
            sample = attentions[j](sample, encoder_hidden_states=ehs, return_dict=False)[0]
        out += (sample,)
    return out


def _mid(block, sample, emb, ehs):
    if block is None:
        return sample
    if getattr(block, "has_cross_attention", False):
        return block(sample, emb, encoder_hidden_states=ehs)
    return block(sample, emb)


def _up(block, sample, emb, ehs, res, size):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs,
                     upsample_size=size)
    return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=size)


def _up_layers(block, sample, emb, ehs, res, start: int, stop: int):
    """Resnets (and attentions) start .. stop - 1 of an up block, each taking its skip as the block's forward does
    (resnet j takes res[-1 - j]); no upsampler."""
    attentions = getattr(block, "attentions", None)
    for j in range(start, stop):
        sample = block.resnets[j](torch.cat([sample, res[-1 - j]], dim=1), emb)
        if attentions is not None:
            sample = attentions[j](sample, encoder_hidden_states=ehs, return_dict=False)[0]
    return sample


def __getattr__(name: str):
    kind, _, branch = name.partition("_b")
    if kind in ("full", "shallow") and branch.isdigit():
        return functools.partial(CacheUNet, branch=int(branch), shallow=kind == "shallow")
    raise AttributeError(name)
