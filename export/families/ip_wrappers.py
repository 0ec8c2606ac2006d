"""The torch side of the IP-Adapter (export/ip_adapter.py): the image encoder's wrapper, the adapter converted to the
UNet's module names (by diffusers' own converters), and the adapter's modules attached to a loaded UNet.

Where the adapter's tensors live in the UNet (the names `unet/ip_adapter.safetensors` stores them under):
    encoder_hid_proj.image_projection_layers.0.*   diffusers' ImageProjection (image_embeds -> T tokens, LayerNorm)
    <cross-attention block>.to_k_ip.weight         the adapter's key / value projections of the image tokens, on
    <cross-attention block>.to_v_ip.weight         the diffusers Attention block (read by export/attention.py)
Kept apart so that reading a family does not load torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

PROJECTION = "encoder_hid_proj.image_projection_layers.0."


class ImageEncoderWrapper(torch.nn.Module):
    def __init__(self, image_encoder):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, pixel_values):  # [B, 3, S, S] CLIP-normalised -> [B, D], as diffusers' encode_image
        return self.image_encoder(pixel_values).image_embeds


def _meta_unet(config: dict[str, Any]) -> Any:
    """A UNet2DConditionModel built from `config` on the meta device: its structure, no weight allocated."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def cross_attention_widths(unet_config: dict[str, Any]) -> list[int]:
    """The hidden width of each cross-attention block, in the order the published layout numbers them (the
    UNet's attention processors, every second one): what a random adapter for this UNet must have."""
    unet = _meta_unet(unet_config)
    return [int(unet.get_submodule(name.removesuffix(".processor")).to_q.out_features)
            for name in unet.attn_processors if name.endswith("attn2.processor")]


def convert_adapter(parts: dict[str, dict[str, Any]], unet_config: dict[str, Any], out: Path) -> None:
    """Write the adapter (`parts`: {"image_proj": ..., "ip_adapter": ...}, export.ip_adapter.read_adapter) as
    safetensors `out` in the UNet's module names, converted by diffusers' IP-Adapter converters on a UNet built
    from `unet_config` on the meta device (no UNet weight loaded). ValueError naming a tensor the UNet's
    cross-attention blocks need and the file lacks, or one of another shape (an adapter for another UNet)."""
    from safetensors.torch import save_file

    unet = _meta_unet(unet_config)
    try:
        procs = unet._convert_ip_adapter_attn_to_diffusers([parts], low_cpu_mem_usage=False)
    except KeyError as exc:
        raise ValueError(f"the IP-Adapter lacks ip_adapter.{exc.args[0]}: it was made for a UNet with other "
                         "cross-attention blocks") from None
    except RuntimeError as exc:  # load_state_dict: a size mismatch
        raise ValueError(f"the IP-Adapter's key/value projections do not fit this UNet: {exc}") from None
    used = 2 * sum(1 for p in procs.values() if hasattr(p, "to_k_ip"))
    if len(parts["ip_adapter"]) != used:
        raise ValueError(f"the IP-Adapter has {len(parts['ip_adapter'])} key/value tensors, this UNet's "
                         f"cross-attention blocks take {used}: it was made for another UNet")
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(parts["image_proj"], low_cpu_mem_usage=False)
    tensors = {PROJECTION + k: v for k, v in projection.state_dict().items()}
    for name, proc in procs.items():
        if hasattr(proc, "to_k_ip"):
            block = name.removesuffix(".processor")
            tensors[f"{block}.to_k_ip.weight"] = proc.to_k_ip[0].weight
            tensors[f"{block}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out))


def attach(unet: Any, file: Path) -> Any:
    """`unet` with the adapter's modules (shapes from `file`'s header): the image projection as its
    `encoder_hid_proj` (diffusers' "ip_image_proj", so its forward takes added_cond_kwargs["image_embeds"]) and
    the key/value projections on its cross-attention blocks. On the meta device the modules stay empty (export
    streams their weights from `file`); otherwise `file`'s tensors are loaded, every one of them."""
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
    from safetensors import safe_open

    param = next(unet.parameters())
    with safe_open(str(file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    rows, embed = shapes[PROJECTION + "image_embeds.weight"]
    cross = shapes[PROJECTION + "norm.weight"][0]
    with torch.device(param.device):
        projection = ImageProjection(image_embed_dim=embed, cross_attention_dim=cross,
                                     num_image_text_embeds=rows // cross)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection]).to(param.dtype)
        for key, shape in shapes.items():
            if key.endswith(".to_k_ip.weight"):
                width, c = shape
                block = unet.get_submodule(key.removesuffix(".to_k_ip.weight"))
                block.to_k_ip = torch.nn.Linear(c, width, bias=False, dtype=param.dtype)
                block.to_v_ip = torch.nn.Linear(c, width, bias=False, dtype=param.dtype)
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    if not param.is_meta:
        from safetensors.torch import load_file

        missing, unexpected = unet.load_state_dict(load_file(str(file)), strict=False)
        wanted = [k for k in missing if k.startswith(PROJECTION) or k.endswith(("to_k_ip.weight", "to_v_ip.weight"))]
        if wanted or unexpected:
            raise ValueError(f"{file}: the IP-Adapter tensors do not fit the UNet (missing {wanted[:3]}, "
                             f"unexpected {unexpected[:3]})")
    return unet
