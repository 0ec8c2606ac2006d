"""Feature caching (DeepCache, Ma et al. 2023) as components: a full UNet graph that also returns the deep feature
of one skip branch, and a shallow graph that recomputes only the layers above that branch from a cached one.

A UNet's skip branch `b` (DeepCache's `cache_branch_id`: block `c = b // 3` counted from the shallowest, layer
`l = b % 3`) splits it in two. At a *full* step every layer runs, as today. At a *shallow* step, as DeepCache's
`DeepCacheSDHelper` does, the down blocks from `c` on (but their first `l` layers), the mid block and the up blocks
below up block `c` are not run: their outputs are the ones of the last full step. Only the time embedding,
`conv_in`, the down blocks above `c` and layers 0 .. l-1 of down block `c`, the layers `l, l-1, .., 0` of up block
`c` (counted from its output end) and the up blocks above it run. What
those layers read from the skipped part is the *cache*: the hidden state entering layer `l` of up block `c` (the
deep feature) and the skip tensors they take that come from skipped down blocks (none for branch 0).

So a build with `--cache-branch B` has, besides the plain components:

- `unet`: the same graph with the cache as extra outputs `cache_b<B>_<k>` (the first the deep feature);
- `unet_shallow`: latents, timestep and conditioning as the UNet's, plus the cache as inputs -> `latent`.

`layout` computes the cache tensors (channels, downscale) from a UNet config; the torch wrappers
(export/families/cache_wrappers.py) compute the same split from the module. Only UNet2DConditionModel denoisers
whose inputs are SD's or SDXL's are supported (ControlNet residuals and IP-Adapter inputs are refused at build).
Torch-free: the CLI and the server read this module.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from export.families.base import Family
from export.specs import ComponentSpec, Dims, TensorSpec

SHALLOW = "unet_shallow"  # the shallow graph's component name
WRAPPERS = "export.families.cache_wrappers"  # full_b<B> / shallow_b<B>: the wrappers of branch B
PLAIN_INPUTS = {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}  # SD's and SDXL's UNet
MAX_BRANCH = 11  # DeepCache's branch ids of a 4-block UNet: 0 .. 3 * 4 - 1


@dataclass(frozen=True)
class Split:
    """Where branch `branch` cuts a UNet (all indices in diffusers' module order)."""

    branch: int
    down_run: int  # down blocks 0 .. down_run - 1 run at a shallow step (DeepCache's block id)
    up_block: int  # the up block that runs in part
    first_layer: int  # its resnets/attentions from this index on run
    down_layers: int  # resnets/attentions of down block `down_run` that run too (DeepCache's layer id)
    skip_start: int  # position (in the down path's skip tuple) of the up block's first skip
    fresh: int  # skip tensors computed at a shallow step: conv_in's and those of the down layers that run
    cached_skips: tuple[int, ...]  # positions of the skips the shallow part reads from the cache (none in SD's and
    # SDXL's UNets: each branch runs as many layers on its down side as on its up side)


def split(branch: int, down_layers: list[int], down_samplers: list[bool], up_layers: list[int]) -> Split:
    """The split of a UNet with these down blocks (resnets per block, whether it downsamples) and up blocks (resnets
    per block); ValueError naming `branch` when the UNet has no such branch."""
    n = len(up_layers)
    block, layer = branch // 3, branch % 3
    if not 0 <= branch or block >= n or layer >= up_layers[n - 1 - block]:
        most = max(i * 3 + min(up_layers[n - 1 - i], 3) - 1 for i in range(n))
        raise ValueError(f"cache branch {branch} is not a skip branch of this UNet: choose 0..{most} "
                         "(block = branch // 3 from the shallowest, layer = branch % 3)")
    k = n - 1 - block
    m = up_layers[k]
    fresh = 1 + sum(down_layers[i] + int(down_samplers[i]) for i in range(block)) + layer
    total = 1 + sum(down_layers) + sum(down_samplers)
    start = total - sum(up_layers[:k + 1])  # up block k takes skips start .. start + m - 1
    return Split(branch, block, k, m - 1 - layer, layer, start, fresh,
                 tuple(p for p in range(start, start + layer + 1) if p >= fresh))


def unet_split(branch: int, unet: dict[str, Any]) -> Split:
    """`split` of a UNet2DConditionModel config."""
    chans = list(unet["block_out_channels"])
    layers = unet.get("layers_per_block", 2)
    layers = [layers] * len(chans) if isinstance(layers, int) else list(layers)
    down_samplers = [i < len(chans) - 1 for i in range(len(chans))]
    return split(branch, layers, down_samplers, [n + 1 for n in reversed(layers)])


def layout(branch: int, unet: dict[str, Any]) -> list[tuple[int, int]]:
    """(channels, downscale from the latents) of each cache tensor of `branch` in this UNet config: the deep feature,
    then the cached skips."""
    s = unet_split(branch, unet)
    chans = list(unet["block_out_channels"])
    rev = chans[::-1]
    scale = 2 ** s.down_run  # up block k works at the resolution of down block n - 1 - k
    feature = rev[s.up_block] if s.first_layer > 0 else (rev[s.up_block - 1] if s.up_block > 0 else chans[-1])
    skips: list[tuple[int, int]] = [(chans[0], 1)]  # conv_in's, then each down block's resnets and downsampler
    layers = unet.get("layers_per_block", 2)
    layers = [layers] * len(chans) if isinstance(layers, int) else list(layers)
    for i, (c, n) in enumerate(zip(chans, layers, strict=True)):
        skips += [(c, 2 ** i)] * n + ([(c, 2 ** (i + 1))] if i < len(chans) - 1 else [])
    return [(feature, scale)] + [skips[p] for p in s.cached_skips]


def names(branch: int, count: int) -> list[str]:
    """The cache tensors' names (the full graph's extra outputs, the shallow graph's extra inputs)."""
    return [f"cache_b{branch}_{k}" for k in range(count)]


def _tensor(name: str, channels: int, scale: int) -> TensorSpec:
    def shape(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
        return (b, channels, h // (d.vae_scale * scale), w // (d.vae_scale * scale))  # [2B, C, h/s, w/s]

    return TensorSpec(name, "model", shape, {0: "batch", 2: "height", 3: "width"})


def with_feature_cache(family: Family, cache: dict[str, Any] | None) -> Family:
    """`family` with the cache outputs on its denoiser and the shallow graph added, as a build record's
    `feature_cache` entry says ({"branch": B, "tensors": [[channels, downscale], ...]}); `family` itself for None."""
    if not cache:
        return family
    branch = int(cache["branch"])
    tensors = [_tensor(n, c, s) for n, (c, s) in zip(names(branch, len(cache["tensors"])), cache["tensors"],
                                                      strict=True)]
    denoiser = family.roles.denoiser
    base = family.specs[denoiser]
    full = replace(base, outputs=base.outputs + tuple(tensors),
                   description=base.description + f"; + the feature cache of skip branch {branch}")
    shallow = replace(base, name=SHALLOW, inputs=base.inputs + tuple(tensors),
                      description=f"the UNet's shallow part above skip branch {branch} (DeepCache): its inputs + the "
                                  "cache of the last full step -> eps or v")
    return replace(family, specs={**family.specs, denoiser: full, SHALLOW: shallow},
                   wrappers={**family.wrappers, denoiser: f"{WRAPPERS}:full_b{branch}",
                             SHALLOW: f"{WRAPPERS}:shallow_b{branch}"},
                   model_classes=family.model_classes)


def check_family(family: Family, unet: dict[str, Any]) -> None:
    """ValueError, before any work, when this denoiser cannot be built with a feature cache."""
    spec = family.specs[family.roles.denoiser]
    extra = [n for n in spec.input_names if n not in PLAIN_INPUTS]
    if unet.get("_class_name") != "UNet2DConditionModel" or extra:
        why = f"its UNet also takes {', '.join(extra)}" if extra else f"its denoiser is a {unet.get('_class_name')}"
        raise ValueError(f"--cache-branch: feature caching needs a Stable Diffusion or SDXL UNet without ControlNets or "
                         f"an IP-Adapter; this build's {why}")


def record_entry(branch: int, unet: dict[str, Any]) -> dict[str, Any]:
    """The build record's `feature_cache` entry of `branch` for this UNet config (ValueError for a bad branch)."""
    return {"branch": branch, "tensors": [list(t) for t in layout(branch, unet)]}


PACKED = "cache"  # the cache wrappers' keyword for the cache tensors, as one tuple


def pack(inputs: dict[str, Any]) -> dict[str, Any]:
    """Inputs by spec name -> the cache wrappers' keywords: the cache tensors as one tuple `cache` (in order), where
    the first was; anything else as it is. The identity for inputs without a cache."""
    found = sorted((k for k in inputs if k.startswith("cache_b")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if not found:
        return inputs
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if k == found[0]:
            out[PACKED] = tuple(inputs[c] for c in found)
        elif k not in found:
            out[k] = v
    return out


def family_for(spec: ComponentSpec, folder: Any) -> Family | None:
    """The family a backend loads `spec`'s torch module with, when the spec carries a feature cache (its wrapper is
    then a cache wrapper): the model folder's family with the cache of the spec's branch; None otherwise."""
    found = [t.name for t in (*spec.inputs, *spec.outputs) if t.name.startswith("cache_b")]
    if not found:
        return None
    from export.families import detect_family

    branch = int(found[0][len("cache_b"):].split("_")[0])
    return with_feature_cache(detect_family(folder), {"branch": branch, "tensors": [[1, 1]] * len(found)})
