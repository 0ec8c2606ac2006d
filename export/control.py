"""ControlNet as components: the residual layout, the specs, the family extension and the ControlNet folders.

A ControlNet (diffusers `ControlNetModel`) reads the same inputs as the UNet plus a control image and returns one
residual per UNet skip connection and one for the mid block; the UNet adds them to its own. So a build with
ControlNets (`engine.build --controlnet PATH`, repeatable) has:

- one `controlnet.<name>` component per ControlNet: latents [2B, 4, h, w], timestep [2B], text [2B, 77, C] and
  the control image [2B, 3, H, W] in [0, 1] -> `down_residual_<k>` ... and `mid_residual`, unscaled (the runtime
  scales them per row and step: the request's scale, its start/end window, guess mode);
- a `unet` that takes those residuals as inputs (`down_residual_<k>`, `mid_residual`; zeros when a request has
  no control).

The residual shapes follow the UNet's down path (`residual_layout`, kept in `Dims`). A model folder and its
ControlNets are seen by export and the backends as one folder (`control_folder`: links, each ControlNet as
sub-folder `controlnet.<name>`), so export, caching and loading treat a ControlNet like any component. A
single-file `.safetensors` ControlNet in the original layout is converted to such a folder first
(export/control_single_file.py's `prepare_controlnet`). Torch-free: the CLI and the server read this module.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from export.errors import PICKLE_SUFFIXES
from export.families.base import Family
from export.specs import ComponentSpec, Dims, TensorSpec

PREFIX = "controlnet."  # component and sub-folder name of a ControlNet: controlnet.<name>
DOWN, MID = "down_residual_", "mid_residual"
PACKED = "down_residuals"  # the UNet wrappers' keyword for the down residuals, as one tuple
WRAPPER = "export.families.control_wrappers:ControlNetWrapper"
MODEL_CLASS = ("diffusers", "ControlNetModel")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MATCHING = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",  # as the UNet's
            "addition_embed_type", "projection_class_embeddings_input_dim")


def residual_layout(unet: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channels, downscale) of each residual a ControlNet adds to this UNet config, down path then mid: conv_in's
    output, each down block's resnet outputs and its downsampler's (all but the last block), the mid block."""
    chans = list(unet["block_out_channels"])
    layers = unet.get("layers_per_block", 2)
    layers = [layers] * len(chans) if isinstance(layers, int) else list(layers)
    channels, scales = [chans[0]], [1]
    for i, (c, n) in enumerate(zip(chans, layers, strict=True)):
        channels += [c] * n
        scales += [2 ** i] * n
        if i < len(chans) - 1:
            channels.append(c)
            scales.append(2 ** (i + 1))
    channels.append(chans[-1])
    scales.append(2 ** (len(chans) - 1))
    return tuple(channels), tuple(scales)


def _residual_shape(k: int):
    def shape(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
        s = d.vae_scale * d.residual_scales[k]
        return (b, d.residual_channels[k], h // s, w // s)  # [2B, C_k, H/8/s_k, W/8/s_k]
    return shape


def residual_names(n: int) -> list[str]:
    """The residual tensors' names, down path then mid, for a UNet with `n` residuals (mid included)."""
    return [f"{DOWN}{k}" for k in range(n - 1)] + [MID]


def residual_specs(n: int) -> tuple[TensorSpec, ...]:
    spatial = {0: "batch", 2: "height", 3: "width"}
    return tuple(TensorSpec(name, "model", _residual_shape(k), spatial) for k, name in enumerate(residual_names(n)))


def _control_image(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, 3, h, w)  # [2B, 3, H, W] in [0, 1]


def controlnet_spec(name: str, unet: ComponentSpec, n: int) -> ComponentSpec:
    """The spec of ControlNet `name`: the UNet's inputs (4 latent channels) and the control image -> residuals."""
    sample = replace(unet.inputs[0], shape=lambda d, b, h, w: (b, d.latent_channels, h // d.vae_scale,
                                                                 w // d.vae_scale))  # [2B, 4, h, w]
    return ComponentSpec(
        name=PREFIX + name,
        inputs=(sample, *unet.inputs[1:], TensorSpec("controlnet_cond", "model", _control_image,
                                                      {0: "batch", 2: "height", 3: "width"})),
        outputs=residual_specs(n),
        batch_factor=2,
        model_folder=PREFIX + name,
        description=f"ControlNet {name}: the UNet's inputs and a control image [2B, 3, H, W] in [0, 1] -> "
                    f"{n} unscaled residuals",
        per_step=True,
    )


def with_residuals(unet: ComponentSpec, n: int) -> ComponentSpec:
    """The denoiser spec that also takes `n` ControlNet residuals."""
    return replace(unet, inputs=unet.inputs + residual_specs(n),
                   description=unet.description + f"; + {n} ControlNet residuals")


def with_controls(family: Family, names: tuple[str, ...], dims: Dims) -> Family:
    """`family` with ControlNets `names` as condition components and a denoiser that takes their residuals."""
    if not names:
        return family
    n = len(dims.residual_channels)
    denoiser = family.roles.denoiser
    base = family.specs[denoiser]
    nets = {PREFIX + x: controlnet_spec(x, base, n) for x in names}
    unet = with_residuals(base, n)
    return replace(
        family,
        specs={**family.specs, denoiser: unet, **nets},
        roles=replace(family.roles, conditions=tuple(nets)),
        wrappers={**family.wrappers, **dict.fromkeys(nets, WRAPPER)},
        model_classes={**family.model_classes, **dict.fromkeys(nets, MODEL_CLASS)},
    )


def for_component(family: Family, name: str) -> Family:
    """`family`, with ControlNet component `name` added when it is one the family lacks (what loading one
    component from an engine artifact needs: its wrapper and model class; its residual count does not matter)."""
    if not name.startswith(PREFIX) or name in family.specs:
        return family
    return with_controls(family, (name[len(PREFIX):],), Dims())


def pack(inputs: dict[str, Any]) -> dict[str, Any]:
    """Inputs by spec name -> the UNet wrappers' keywords: the down residuals as one tuple `down_residuals`
    (in order); anything else as it is. The identity for inputs without residuals."""
    downs = sorted((k for k in inputs if k.startswith(DOWN)), key=lambda k: int(k[len(DOWN):]))
    if not downs:
        return inputs
    out: dict[str, Any] = {}
    for k, v in inputs.items():  # the tuple where the first down residual was: exporters flatten in this order
        if k == downs[0]:
            out[PACKED] = tuple(inputs[d] for d in downs)
        elif not k.startswith(DOWN):
            out[k] = v
    return out


def controlnet_name(path: Path) -> str:
    """The name a ControlNet is used by: its folder's or file's stem (ValueError when not a usable name)."""
    name = path.stem if path.is_file() else path.name
    if not NAME.fullmatch(name):
        raise ValueError(f"ControlNet {str(path)!r}: its name {name!r} (the folder's or file's stem) must be 1-64 "
                         "letters, digits, '_', '.' or '-', starting with a letter or digit")
    return name


def check_controlnet(path: Path, unet: dict[str, Any], model: str) -> dict[str, Any]:
    """A diffusers ControlNetModel folder's config, checked against the base model's UNet config; ValueError
    naming both when they differ (a ControlNet made for another base model) or when the folder is not one."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"refusing to load ControlNet {path}: pickled files ({', '.join(PICKLE_SUFFIXES)}) can run "
                         "code; convert it to .safetensors")
    if not path.is_dir():
        raise ValueError(f"ControlNet {path}: not a diffusers ControlNetModel folder (config.json and "
                         "diffusion_pytorch_model.safetensors) nor a single-file .safetensors ControlNet"
                         + ("" if path.exists() else "; no such path"))
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"ControlNet {path}: cannot read config.json ({exc})") from None
    if config.get("_class_name") != MODEL_CLASS[1]:
        raise ValueError(f"ControlNet {path}: config.json is a {config.get('_class_name')!r}, not a ControlNetModel")
    weights = path / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"ControlNet {path}: no diffusion_pytorch_model.safetensors (pickled .bin weights are "
                         "refused)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except SafetensorError as exc:
        raise ValueError(f"ControlNet {path}: {weights.name} is not a readable safetensors file ({exc})") from None
    check_config(path, config, unet, model)
    return config


def check_config(path: Path, config: dict[str, Any], unet: dict[str, Any], model: str) -> None:
    """ValueError naming ControlNet `path`, the field and both values when its ControlNetModel `config` was made
    for another base model than the one whose UNet config is `unet` (channels, layers, cross-attention width,
    added conditioning, latent channels): its residuals would not fit that UNet."""
    for key in MATCHING:
        mine, base = config.get(key), unet.get(key)
        if _norm(mine) != _norm(base):
            raise ValueError(f"ControlNet {path} was made for another base model: its {key} is {mine!r}, the UNet of "
                             f"{model} has {base!r}")
    if config.get("in_channels") != unet["out_channels"]:
        raise ValueError(f"ControlNet {path} takes {config.get('in_channels')} latent channels, the model {model} "
                         f"has {unet['out_channels']}")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def control_folder(base: Path, nets: dict[str, Path], root: Path) -> Path:
    """One folder that is the model `base` plus each ControlNet as sub-folder `controlnet.<name>`: links, made
    once (atomically) under `root`, keyed by the resolved paths (weights are keyed by content where it matters)."""
    from export.store import linked_folder

    return linked_folder(base, {PREFIX + name: path for name, path in nets.items()}, root)


def random_controlnet(model: Path, out: Path, seed: int, embedding: tuple[int, ...] = (16, 32, 96, 256),
                      std: float = 0.05) -> Path:
    """A seeded random diffusers ControlNetModel for the UNet of model folder `model`, saved (safetensors) as
    folder `out` (named by its stem; made atomically, reused when it exists): the UNet's down path copied, as
    ControlNetModel.from_unet does, and the zero-initialised convolutions drawn from N(0, std) so that the net
    changes the image (benchmarks and tests; `embedding` must have log2(VAE scale) + 1 entries)."""
    import torch
    from diffusers.models.controlnets.controlnet import ControlNetModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from export.store import exclusive, staging_dir

    if (out / "config.json").is_file():
        return out
    with exclusive(out):
        if not (out / "config.json").is_file():
            unet = UNet2DConditionModel.from_pretrained(model / "unet", use_safetensors=True)
            torch.manual_seed(seed)
            net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
            with torch.no_grad():
                for module in (*net.controlnet_down_blocks, net.controlnet_mid_block,
                               net.controlnet_cond_embedding.conv_out):
                    for p in module.parameters():
                        p.normal_(0.0, std)
            with staging_dir(out) as tmp:
                net.save_pretrained(tmp, safe_serialization=True)
    return out
