"""Test helper: write a diffusers folder's weights as ONE single-file LDM/CompVis `.safetensors`.

The inverse of diffusers' LDM -> diffusers conversion (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` in diffusers/loaders/single_file_utils.py),
for SD 1.x-style models (UNet2DConditionModel, AutoencoderKL, CLIPTextModel), any number of blocks and
layers per block, any UNet input channels (4, or 9 for inpainting). Our own mapping, so a round trip through diffusers' conversion tests both directions.

LDM layout:
    model.diffusion_model.*               UNet: input_blocks / middle_block / output_blocks / time_embed / out
    first_stage_model.*                   VAE: encoder.down.{i}.block.{j}, decoder.up.{n-1-i}..., mid.attn_1
                                          (q/k/v/proj_out as 1x1 conv weights [C, C, 1, 1])
    cond_stage_model.transformer.*        CLIP text encoder (transformers' text_model.* names)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D names -> LDM ResBlock names (UNet)
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_FIXED = {"conv_norm_out": "norm_out"}  # conv_in, conv_out, (post_)quant_conv keep their names
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{UNET_RESNET[head]}.{tail}"


def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> LDM `model.diffusion_model.*` keys."""
    per = layers_per_block + 1  # LDM input/output slots per block: the layers + a down/upsampler slot
    up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in sd.items():
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = 1 + b * per + j
            new = f"input_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + layers_per_block}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = b * per + j
            new = f"output_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            slot = 2 if b in up_has_attn else 1  # after the attention, if the block has one
            new = f"output_blocks.{b * per + layers_per_block}.{slot}.conv.{m[2]}"
        else:
            module, _, param = key.rpartition(".")
            if module not in UNET_FIXED:
                raise KeyError(f"no LDM name for UNet key {key!r}")
            new = f"{UNET_FIXED[module]}.{param}"
        out[UNET_PREFIX + new] = value
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM `first_stage_model.*` keys (mid attention as 1x1 convs)."""
    out = {}
    for key, value in sd.items():
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            if m[2] not in VAE_ATTN:
                raise KeyError(f"no LDM name for VAE key {key!r}")
            new = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        else:
            module, _, param = key.rpartition(".")
            side, _, name = module.partition(".")
            if name in VAE_FIXED:
                module = f"{side}.{VAE_FIXED[name]}"
            elif module not in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                "quant_conv", "post_quant_conv"):
                raise KeyError(f"no LDM name for VAE key {key!r}")
            new = f"{module}.{param}"
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[VAE_PREFIX + new] = value.contiguous()
    return out


def clip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys (flat `embeddings.*`, or `text_model.*`) -> `cond_stage_model.transformer.text_model.*`."""
    return {CLIP_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()}


def to_ldm(unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor], text: dict[str, torch.Tensor],
           layers_per_block: int, vae_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers UNet, VAE and CLIP state dicts -> one LDM-layout state dict (works on meta tensors too)."""
    return {**unet_to_ldm(unet, layers_per_block), **vae_to_ldm(vae, vae_blocks), **clip_to_ldm(text)}


def write_ldm_checkpoint(folder: Path, out: Path) -> Path:
    """Write the diffusers folder's UNet, VAE and text encoder as one LDM-layout .safetensors file."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    state = to_ldm(
        load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
        load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
        load_file(folder / "text_encoder" / "model.safetensors"),
        unet_cfg["layers_per_block"],
        len(vae_cfg["block_out_channels"]),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out


# ---- SDXL (Stability's sgm layout, as ComfyUI / A1111 save it) ----
#     model.diffusion_model.*               UNet as above, + label_emb.0.{0,2} (the "text_time" embedding MLP)
#     first_stage_model.*                   VAE as above
#     conditioner.embedders.0.transformer.* CLIP ViT-L (transformers' text_model.* names)
#     conditioner.embedders.1.model.*       OpenCLIP ViT-bigG in open_clip names (refiner: embedders.0.model.*):
#         token_embedding.weight, positional_embedding, ln_final.*, text_projection [width, proj] (transposed
#         Linear), logit_scale, transformer.resblocks.{i}.{ln_1, ln_2, attn.in_proj_{weight,bias} (q;k;v stacked),
#         attn.out_proj, mlp.c_fc, mlp.c_proj}
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."
UNET_ADDED = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def unet_xl_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """An SDXL UNet2DConditionModel's keys -> `model.diffusion_model.*` (label_emb for add_embedding)."""
    added = {}
    for key in [k for k in sd if k.startswith("add_embedding.")]:
        module, _, param = key.rpartition(".")
        added[f"{UNET_PREFIX}{UNET_ADDED[module]}.{param}"] = sd[key]
    rest = {k: v for k, v in sd.items() if not k.startswith("add_embedding.")}
    return {**unet_to_ldm(rest, layers_per_block), **added}


def _open_clip_layer(sd: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Encoder layer i (transformers names) -> open_clip `transformer.resblocks.{i}.*` (q, k, v stacked)."""
    src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
    out = {}
    for param in ("weight", "bias"):
        qkv = [sd[f"{src}self_attn.{p}_proj.{param}"] for p in "qkv"]
        out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv, dim=0)
        for ours, theirs in OPEN_CLIP_LAYER.items():
            out[f"{dst}{theirs}.{param}"] = sd[f"{src}{ours}.{param}"]
    return out


def open_clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str = XL_OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection keys -> open_clip's text tower under `prefix` (the inverse of diffusers'
    `convert_open_clip_checkpoint`), with open_clip's logit_scale, which the conversion drops."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    layers = {int(m[1]) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    out = {theirs: sd[ours] for ours, theirs in OPEN_CLIP_FIXED.items()}
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()  # Linear [proj, width] -> [width, proj]
    out["logit_scale"] = torch.tensor(4.6052)  # ln(100), as open_clip saves it
    for i in sorted(layers):
        out.update(_open_clip_layer(sd, i))
    mapped = set(OPEN_CLIP_FIXED) | {"text_projection.weight"} | {
        k for k in sd if re.match(r"text_model\.encoder\.layers\.\d+\.", k)}
    if unknown := sorted(set(sd) - mapped):
        raise KeyError(f"no open_clip name for text encoder key {unknown[0]!r}")
    return {prefix + k: v for k, v in out.items()}


def xl_clip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys -> `conditioner.embedders.0.transformer.text_model.*`."""
    return {XL_CLIP_PREFIX + k.removeprefix(CLIP_PREFIX): v for k, v in clip_to_ldm(sd).items()}


def to_sgm(unet: dict, vae: dict, text: dict | None, text_2: dict, layers_per_block: int,
           vae_blocks: int) -> dict[str, torch.Tensor]:
    """SDXL state dicts -> one sgm-layout state dict; `text` None is a refiner (OpenCLIP as embedders.0)."""
    state = {**unet_xl_to_ldm(unet, layers_per_block), **vae_to_ldm(vae, vae_blocks)}
    if text is None:
        return state | open_clip_to_ldm(text_2, REFINER_OPEN_CLIP_PREFIX)
    return state | xl_clip_to_ldm(text) | open_clip_to_ldm(text_2)


def write_sgm_checkpoint(folder: Path, out: Path) -> Path:
    """Write an SDXL (or refiner) diffusers folder's UNet, VAE and text encoders as one sgm-layout .safetensors."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    text = folder / "text_encoder" / "model.safetensors"
    state = to_sgm(
        load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
        load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
        load_file(text) if text.is_file() else None,
        load_file(folder / "text_encoder_2" / "model.safetensors"),
        unet_cfg["layers_per_block"],
        len(vae_cfg["block_out_channels"]),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out
