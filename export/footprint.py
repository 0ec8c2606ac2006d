"""What sets a model's activation memory, read from its folder's configs at build time and kept in build.json.

Shape facts (`Dims`) say what tensors the graphs take; these say how large the largest intermediate tensors grow
with the image size: the UNet's highest-resolution self-attention (tokens = pixels / attention_scale², and its heads;
the x4 upscaler's `only_cross_attention` blocks attend to the text only, N x 77, and do not count)
and the latent decoder's full-resolution convolutions and mid-block attention. engine/memory.py turns them into an
estimate per request. A build.json written before them reads the defaults (Stable Diffusion 1.x's values).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Footprint:
    attention_scale: int = 8  # pixels per token (each side) at the UNet's highest-resolution attention
    attention_heads: int = 8  # heads there
    decoder_channels: int = 128  # channels of the latent decoder's full-resolution blocks
    decoder_attention: bool = True  # the decoder's mid block has self-attention over every latent pixel


def folder_footprint(folder: Path) -> Footprint:
    """A diffusers model folder's footprint, from unet/config.json and vae/config.json (no weights read)."""
    vae_dir = folder / "vae" if (folder / "vae").is_dir() else folder / "vqvae"  # KL; the LDM paper's VQ models
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((vae_dir / "config.json").read_text())
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    levels = unet["down_block_types"]
    only_cross = unet.get("only_cross_attention") or False  # a block whose attention attends to the text only
    only_cross = only_cross if isinstance(only_cross, list) else [only_cross] * len(levels)
    first = next((i for i, kind in enumerate(levels) if "Attn" in kind and not only_cross[i]), None)
    # diffusers' UNet2DConditionModel reads attention_head_dim as the head count when num_attention_heads is unset
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
    heads = heads[first or 0] if isinstance(heads, list) else heads
    if unet.get("_class_name") == "UNet2DModel" and first is not None:  # its attention_head_dim is each head's width
        channels = unet["block_out_channels"][first]
        heads = channels // (unet.get("attention_head_dim") or channels)
    return Footprint(
        attention_scale=vae_scale * 2 ** first if first is not None else 0,  # 0: no self-attention in the UNet
        attention_heads=int(heads),
        decoder_channels=int(vae["block_out_channels"][0]),
        decoder_attention=bool(vae.get("mid_block_add_attention", True)),
    )
