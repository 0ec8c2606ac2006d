"""What a build adds to a model folder before export (engine/build.py): ControlNets, an IP-Adapter, the feature
cache's shallow graph and a tiny VAE. Each takes the build config, the folder and family so far, and gives them back
extended; ValueError naming what is wrong, before any work."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from engine import cache
from engine.config import BuildConfig
from export import control, feature_cache, ip_adapter, tiny_vae
from export.families import Family
from export.specs import Dims


def with_tiny_vae(cfg: BuildConfig, folder: Path, family: Family, dims: Dims, model: str) -> tuple[Path, Family]:
    """(the folder export reads, the family) with `cfg.tiny_vae` added as the preview decoder (export/tiny_vae.py);
    ValueError naming a folder that is not an AutoencoderTiny of this model's latents, before any work."""
    if not cfg.tiny_vae:
        return folder, family
    from export.store import cache_root

    path = Path(cfg.tiny_vae).expanduser()
    tiny_vae.check_folder(path, dims.latent_channels, model)
    return tiny_vae.tiny_vae_folder(folder, path, cache_root() / "tiny-vae"), tiny_vae.with_tiny_vae(family)


def with_feature_cache(cfg: BuildConfig, folder: Path, family: Family) -> tuple[Family, dict[str, Any] | None]:
    """(the family, the record's "feature_cache" entry) with the shallow graph of `cfg.cache_branch` added
    (export/feature_cache.py); ValueError naming a branch the UNet lacks, or a denoiser it cannot split."""
    if cfg.cache_branch is None:
        return family, None
    unet = cache.read_json(folder / family.spec(family.roles.denoiser).model_folder / "config.json")
    feature_cache.check_family(family, unet)
    entry = feature_cache.record_entry(cfg.cache_branch, unet)
    return feature_cache.with_feature_cache(family, entry), entry


def with_controlnets(cfg: BuildConfig, source: Path, family: Family, dims: Dims) -> tuple[Path, Family]:
    """(the folder export reads, the family) with `cfg.controlnets` added as components (export/control.py);
    ValueError naming a ControlNet that is not one, is named twice, or was made for another base model."""
    if not cfg.controlnets:
        return source, family
    from export.control_single_file import prepare_controlnet
    from export.store import cache_root

    unet = cache.read_json(source / family.spec(family.roles.denoiser).model_folder / "config.json")
    nets: dict[str, Path] = {}  # name -> the ControlNetModel folder to build from
    seen: dict[str, Path] = {}  # name -> the path given
    for given in cfg.controlnets:
        path = Path(given).expanduser()
        name = control.controlnet_name(path)
        if name in seen:
            raise ValueError(f"two ControlNets are named {name!r} ({seen[name]} and {path}); each is used by its "
                             "folder's name or file's stem, so rename one")
        seen[name] = path
        nets[name] = prepare_controlnet(path, unet, str(cfg.model))  # a single file: its converted folder
    return (control.control_folder(source, nets, cache_root() / "controlled"),
            control.with_controls(family, tuple(nets), dims))


def with_ip_adapter(cfg: BuildConfig, folder: Path, family: Family,
                     dims: Dims) -> tuple[Path, Family, Dims, dict[str, Any] | None]:
    """(the folder export reads, the family, the dims, the record's "ip_adapter" entry) with `cfg.ip_adapter` added
    (export/ip_adapter.py); ValueError naming a file that is not a plain IP-Adapter, or one made for another base
    model or image encoder, before any work."""
    if not cfg.ip_adapter:
        if cfg.image_encoder:
            raise ValueError("--image-encoder is the image encoder of an IP-Adapter: give --ip-adapter FILE too")
        return folder, family, dims, None
    from export.store import cache_root

    path = Path(cfg.ip_adapter).expanduser()
    name = ip_adapter.adapter_name(path)
    parts = ip_adapter.read_adapter(path)
    encoder = ip_adapter.encoder_folder(path, cfg.image_encoder)
    unet = cache.read_json(folder / family.spec(family.roles.denoiser).model_folder / "config.json")
    ip_adapter.check_adapter(path, parts, unet, cache.read_json(encoder / "config.json"), str(cfg.model))
    dims = replace(dims, **ip_adapter.encoder_dims(encoder))
    record = {"name": name, **ip_adapter.preprocessing(folder, encoder)}
    adapted = ip_adapter.ip_folder(folder, path, encoder, cache_root() / "adapted")
    return adapted, ip_adapter.with_ip_adapter(family, dims), dims, record
