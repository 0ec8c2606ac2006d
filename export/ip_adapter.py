"""IP-Adapter as components: an image as a prompt, through the image encoder and the UNet's cross-attention.

An IP-Adapter (Ye et al., "IP-Adapter: Text Compatible Image Prompt Adapter"; the published `.safetensors`
layout: `image_proj.*` and `ip_adapter.<k>.to_k_ip / to_v_ip`) adds to a model:

- an `image_encoder` component (a CLIP vision model with projection, transformers' CLIPVisionModelWithProjection):
  `pixel_values` [B, 3, S, S] (CLIP-normalised) -> `image_embeds` [B, D];
- to the `unet`: the adapter's image projection (image_embeds -> T image tokens of the text width, in the graph)
  and, in every cross-attention, a second attention over those tokens with its own key/value projections, added
  as `ip_scale * attention(q, k_ip, v_ip)` (export/attention.py). The UNet takes two more inputs:
  `image_embeds` [2B, D] and `ip_scale` [2B] float32, per row, so rows of one batch have their own image and scale,
  and a row without an image prompt (zeros, scale 0) gives the text-only result exactly.

The adapter's tensors are converted once, at build, by diffusers' own IP-Adapter converters into the UNet's module
names and stored beside the UNet's weights (`unet/ip_adapter.safetensors` in a folder of links made by
`ip_folder`), so export, caching, every backend and LoRA treat the adapted UNet like any UNet. Only the plain
IP-Adapter (a linear image projection, 4 tokens: `ip-adapter_sd15`, `ip-adapter_sdxl`, ...) is supported; the Plus,
Full-face and FaceID variants (resampler projections, hidden-state embeddings) are refused naming the variant.
Torch-free at import: the CLI and the server read this module.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from export.errors import PICKLE_SUFFIXES
from export.families.base import Family
from export.specs import ComponentSpec, Dims, TensorSpec

COMPONENT = "image_encoder"  # component and model sub-folder of the image encoder
WEIGHTS = "ip_adapter.safetensors"  # the converted adapter tensors, in the UNet's module names, beside its weights
WRAPPER = "export.families.ip_wrappers:ImageEncoderWrapper"
MODEL_CLASS = ("transformers", "CLIPVisionModelWithProjection")
EMBEDS, SCALE = "image_embeds", "ip_scale"  # the UNet's extra inputs
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults (what diffusers' load_ip_adapter
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # makes when the pipeline has no feature_extractor)
TOKENS = 4  # image tokens of the plain IP-Adapter's projection (diffusers' converter fixes it too)
VARIANTS = {"proj.3.weight": "IP-Adapter Full-face", "perceiver_resampler.proj_in.weight": "IP-Adapter FaceID Plus",
            "latents": "IP-Adapter Plus", "norm.weight": "IP-Adapter FaceID"}  # image_proj keys -> refused variant


def _pixels(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, 3, d.ip_image_size, d.ip_image_size)  # [B, 3, S, S] CLIP-normalised


def _embeds(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.ip_embed_dim)  # [B, D]


def _scale(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b,)  # [2B]


IMAGE_ENCODER_SPEC = ComponentSpec(
    name=COMPONENT,
    inputs=(TensorSpec("pixel_values", "model", _pixels, {0: "batch"}),),
    outputs=(TensorSpec(EMBEDS, "model", _embeds, {0: "batch"}),),
    batch_factor=1,
    model_folder=COMPONENT,
    description="IP-Adapter image encoder: CLIP-normalised images [B, 3, S, S] -> projected image embeddings [B, D]",
)


def with_image_inputs(unet: ComponentSpec) -> ComponentSpec:
    """The denoiser spec that also takes the IP-Adapter's image embeddings and per-row scale."""
    extra = (TensorSpec(EMBEDS, "model", _embeds, {0: "batch"}), TensorSpec(SCALE, "float32", _scale, {0: "batch"}))
    return replace(unet, inputs=unet.inputs + extra, description=unet.description + "; + IP-Adapter image embeddings")


def with_ip_adapter(family: Family, dims: Dims) -> Family:
    """`family` with an image encoder and a denoiser that takes image embeddings, when `dims` say it was built
    with an IP-Adapter (`ip_embed_dim` > 0); else `family` itself."""
    if not dims.ip_embed_dim:
        return family
    denoiser = family.roles.denoiser
    return replace(
        family,
        specs={**family.specs, denoiser: with_image_inputs(family.specs[denoiser]), COMPONENT: IMAGE_ENCODER_SPEC},
        roles=replace(family.roles, image_encoder=COMPONENT),
        wrappers={**family.wrappers, COMPONENT: WRAPPER},
        model_classes={**family.model_classes, COMPONENT: MODEL_CLASS},
    )


def for_component(family: Family, name: str) -> Family:
    """`family` with the image encoder added when `name` is it (loading one component from an engine artifact)."""
    if name != COMPONENT or name in family.specs:
        return family
    return with_ip_adapter(family, Dims(ip_embed_dim=1, ip_image_size=1))


def adapter_name(path: Path) -> str:
    """The name images record the adapter by: its file's stem (ValueError when not a usable name)."""
    if not NAME.fullmatch(path.stem):
        raise ValueError(f"IP-Adapter {str(path)!r}: its name {path.stem!r} (the file's stem) must be 1-64 letters, "
                         "digits, '_', '.' or '-', starting with a letter or digit")
    return path.stem


def read_adapter(path: Path) -> dict[str, dict[str, Any]]:
    """The adapter's tensors as diffusers' load_ip_adapter splits them: {"image_proj": {...}, "ip_adapter": {...}}.
    ValueError for a pickle, an unreadable file, or one without the IP-Adapter layout."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"refusing to load IP-Adapter {path}: pickled files ({', '.join(PICKLE_SUFFIXES)}) can run "
                         "code; convert it to .safetensors")
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise ValueError(f"IP-Adapter {path}: not a .safetensors file" + ("" if path.exists() else "; no such path"))
    from safetensors import SafetensorError, safe_open

    parts: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                head, _, rest = key.partition(".")
                if head in parts:
                    parts[head][rest] = f.get_tensor(key)
    except SafetensorError as exc:
        raise ValueError(f"IP-Adapter {path}: not a readable safetensors file ({exc})") from None
    if not parts["image_proj"] or not parts["ip_adapter"]:
        raise ValueError(f"IP-Adapter {path}: no image_proj.* and ip_adapter.* tensors (the published IP-Adapter "
                         "layout); is it another kind of file?")
    if "proj.weight" not in parts["image_proj"]:
        variant = next((v for k, v in VARIANTS.items() if k in parts["image_proj"]), "an IP-Adapter variant")
        raise ValueError(f"IP-Adapter {path} is {variant}; only the plain IP-Adapter (a linear image projection, "
                         "image_proj.proj.weight) is supported")
    return parts


def check_adapter(path: Path, parts: dict[str, dict[str, Any]], unet: dict[str, Any], encoder: dict[str, Any],
                  model: str) -> None:
    """ValueError naming both values when the adapter was made for another base model (cross-attention width) or
    another image encoder (embedding width)."""
    rows, width = parts["image_proj"]["proj.weight"].shape  # [T * C, D]
    cross = unet["cross_attention_dim"]
    if rows != TOKENS * cross:
        raise ValueError(f"IP-Adapter {path} was made for another base model: its image tokens are {rows // TOKENS} "
                         f"wide, the UNet of {model} has cross_attention_dim {cross}")
    embed = encoder.get("projection_dim")
    if embed != width:
        raise ValueError(f"IP-Adapter {path} takes image embeddings of {width}, its image encoder gives {embed} "
                         "(projection_dim): give the encoder it was trained with (--image-encoder DIR)")


def encoder_folder(adapter: Path, given: str | Path | None) -> Path:
    """The image encoder's folder: `given`, else `image_encoder/` beside the adapter file (the published layout,
    e.g. h94/IP-Adapter's models/image_encoder), checked to be a CLIPVisionModelWithProjection with safetensors."""
    folder = Path(given).expanduser() if given else adapter.parent / COMPONENT
    config_path = folder / "config.json"
    if not config_path.is_file():
        how = "--image-encoder DIR" if given else f"an {COMPONENT}/ folder beside it, or --image-encoder DIR"
        raise ValueError(f"IP-Adapter {adapter}: no image encoder at {folder} (config.json); it needs {how}")
    config = json.loads(config_path.read_text())
    kind = (config.get("architectures") or [""])[0]
    if kind != MODEL_CLASS[1]:
        raise ValueError(f"image encoder {folder}: a {kind or config.get('model_type')!r}, not a {MODEL_CLASS[1]}")
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"image encoder {folder}: no model.safetensors (pickled .bin weights are refused)")
    return folder


def encoder_dims(folder: Path) -> dict[str, int]:
    """The Dims fields an image encoder sets: its input size and embedding width."""
    config = json.loads((folder / "config.json").read_text())
    vision = config.get("vision_config", config)
    return {"ip_image_size": int(vision.get("image_size", 224)), "ip_embed_dim": int(config["projection_dim"])}


def adapted_dims(folder: Path) -> dict[str, int]:
    """The Dims fields of a model folder made by `ip_folder` (its UNet carries an adapter); {} for any other."""
    return encoder_dims(folder / COMPONENT) if (folder / "unet" / WEIGHTS).is_file() else {}


def preprocessing(model: Path, encoder: Path) -> dict[str, Any]:
    """How request images become `pixel_values`, as diffusers' load_ip_adapter does it: the model folder's
    feature_extractor when it has one, else CLIPImageProcessor's defaults at the encoder's size (shortest side
    resized bicubic to S, centre crop S x S, CLIP mean and std)."""
    size = encoder_dims(encoder)["ip_image_size"]
    found = model / "feature_extractor" / "preprocessor_config.json"
    config = json.loads(found.read_text()) if found.is_file() else {}
    short = config.get("size", size)
    crop = config.get("crop_size", size)
    return {"resize": int(short.get("shortest_edge", size) if isinstance(short, dict) else short),
            "crop": int(crop.get("height", size) if isinstance(crop, dict) else crop),
            "mean": list(config.get("image_mean", CLIP_MEAN)), "std": list(config.get("image_std", CLIP_STD))}


def ip_folder(base: Path, adapter: Path, encoder: Path, root: Path) -> Path:
    """One folder that is the model `base` with the adapter: links to `base`'s entries, `image_encoder` linked to
    the encoder, and `unet/` holding links to the UNet's own files plus the adapter converted to the UNet's module
    names (WEIGHTS) and an index naming both (what export and the backends read). Made once (atomically) under
    `root`, keyed by the resolved paths and the adapter file's bytes."""
    from export.store import HASH_MEMO, cache_root, content_key, exclusive, hash_file_memo, staging_dir

    parts = {"base": str(base.resolve()), "encoder": str(encoder.resolve()),
             "adapter": hash_file_memo(adapter, cache_root() / HASH_MEMO), "version": 1}
    folder = root / f"{base.name}-{adapter.stem}-{content_key(parts)}"
    if (folder / "model_index.json").exists():
        return folder
    with exclusive(folder):
        if not (folder / "model_index.json").exists():
            with staging_dir(folder) as tmp:
                for entry in sorted(base.resolve().iterdir()):
                    if entry.name not in ("unet", COMPONENT):
                        os.symlink(entry, tmp / entry.name)
                os.symlink(encoder.resolve(), tmp / COMPONENT)
                _adapted_unet(base.resolve() / "unet", adapter, tmp / "unet")
    return folder


def _adapted_unet(source: Path, adapter: Path, out: Path) -> None:
    """`out`: links to the UNet folder's config and weights, the converted adapter, and one weight index naming
    every tensor (a single weights file is linked as a shard, so diffusers and export/lean.py both read the
    index)."""
    from export.families.ip_wrappers import convert_adapter
    from export.lean import tensor_index

    out.mkdir()
    os.symlink(source / "config.json", out / "config.json")
    index = tensor_index(source)  # tensor -> the file holding it
    names = {f: ("unet.safetensors" if f.name == "diffusion_pytorch_model.safetensors" else f.name)
             for f in set(index.values())}
    for f, name in names.items():
        os.symlink(f, out / name)
    convert_adapter(read_adapter(adapter), json.loads((source / "config.json").read_text()), out / WEIGHTS)
    weight_map = {k: names[f] for k, f in index.items()} | dict.fromkeys(tensor_names(out / WEIGHTS), WEIGHTS)
    text = json.dumps({"metadata": {"ip_adapter": adapter.name}, "weight_map": weight_map}, indent=1)
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(text)


def tensor_names(file: Path) -> list[str]:
    """The tensor names of a safetensors file (its header only)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def random_ip_adapter(model: Path, out: Path, seed: int, image_size: int = 32, embed_dim: int = 32,
                      std: float = 0.2) -> Path:
    """A seeded random IP-Adapter for the UNet of model folder `model`, in the published layout: folder `out` with
    `<out.name>.safetensors` (image_proj.*, ip_adapter.<k>.to_k_ip/to_v_ip) and `image_encoder/` (a small
    CLIPVisionModelWithProjection). Made atomically, reused when it exists (tests and benchmarks)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from export.families.ip_wrappers import cross_attention_widths
    from export.store import exclusive, staging_dir

    file = out / f"{out.name}.safetensors"
    if file.is_file():
        return file
    with exclusive(out):
        if not file.is_file():
            config = json.loads((model / "unet" / "config.json").read_text())
            g = torch.Generator().manual_seed(seed)
            cross = config["cross_attention_dim"]
            tensors = {"image_proj.proj.weight": torch.randn(TOKENS * cross, embed_dim, generator=g) * std,
                       "image_proj.proj.bias": torch.randn(TOKENS * cross, generator=g) * std,
                       "image_proj.norm.weight": 1 + torch.randn(cross, generator=g) * std,
                       "image_proj.norm.bias": torch.randn(cross, generator=g) * std}
            for k, width in enumerate(cross_attention_widths(config)):
                for proj in ("to_k_ip", "to_v_ip"):
                    tensors[f"ip_adapter.{2 * k + 1}.{proj}.weight"] = torch.randn(width, cross, generator=g) * std
            torch.manual_seed(seed)
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=32, intermediate_size=37, projection_dim=embed_dim, num_hidden_layers=2,
                num_attention_heads=4, image_size=image_size, patch_size=4)).eval()
            with staging_dir(out) as tmp:
                save_file(tensors, str(tmp / file.name))
                encoder.save_pretrained(tmp / COMPONENT, safe_serialization=True)
    return file
