"""Single-file ControlNets in the original layout (`.safetensors` only) -> a cached diffusers ControlNetModel folder.

lllyasviel's ControlNet 1.0 / 1.1 files and sd-webui-controlnet (A1111) keep a ControlNet as the `cldm` module
`control_model`: the UNet's down path and mid block in LDM names plus the ControlNet's own parts, with or without
the `control_model.` prefix:

    time_embed.{0,2}.*                    -> time_embedding.linear_{1,2}.*
    label_emb.0.{0,2}.* (SDXL)            -> add_embedding.linear_{1,2}.*   (class_embedding.* for class_embed_type)
    input_blocks.0.0.*                    -> conv_in.*
    input_blocks.<i>.0.* / .1.* / .0.op.* -> down_blocks.<b>.resnets.<j>.* / .attentions.<j>.* / .downsamplers.0.conv.*
    middle_block.{0,1,2}.*                -> mid_block.resnets.0.*, mid_block.attentions.0.*, mid_block.resnets.1.*
    zero_convs.<k>.0.*                    -> controlnet_down_blocks.<k>.*
    middle_block_out.0.*                  -> controlnet_mid_block.*
    input_hint_block.{0, 2, .., 2m}.*     -> controlnet_cond_embedding.conv_in.*, .blocks.<n/2 - 1>.*, .conv_out.*

The mapping is diffusers' own (`convert_controlnet_checkpoint` in diffusers.loaders.single_file_utils, what
`ControlNetModel.from_single_file` runs); two parts it leaves out are added here from its own tables and the
model's structure: `label_emb` (SDXL's added text and size conditioning) and a hint block of another depth than
the usual 8 convolutions (diffusers fixes conv_out at index 14).

Nothing is downloaded and nothing is unpickled: tensors are read with safetensors, and the ControlNetModel config
is derived locally, from the checkpoint's shapes (latent and control-image channels, the hint block's channels as
conditioning_embedding_out_channels, block channels and layers, which blocks attend, cross-attention width,
linear or convolutional projections, the added-conditioning width) and, for what shapes cannot tell (head counts,
activation, norms, the added-conditioning kind, ...), the base model's UNet config.json; global pooling of the
residuals (ControlNet 1.1's shuffle) by the file's stem ending in `_shuffle` / `_shuffle_fp16`, as ComfyUI and
Forge decide it. The derived config is
checked against the UNet first (export.control.check_config: a ControlNet for another base model is refused
naming the field and both values), then the checkpoint's header is converted as meta tensors and must fill a
ControlNetModel built on the meta device exactly: a missing, extra or misshaped tensor is a one-line ValueError
naming the file and the key, before anything is written.

The result is written once, atomically, to `<cache>/controlnets/<stem>-<key>/` (config.json,
diffusion_pytorch_model.safetensors with the file's dtypes, conversion.json) and reused; `key` is 16 hex digits of
the sha256 of the file's sha256 and the derived config, so one file used with base models that differ in what
shapes cannot tell (e.g. SD 2.x's upcast_attention) gets one folder each.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from export.control import MODEL_CLASS, check_config, check_controlnet
from export.store import (
    HASH_MEMO,
    DamagedFile,
    cache_root,
    content_key,
    exclusive,
    hash_file_memo,
    read_json,
    staging_dir,
)

CONVERT_VERSION = 1  # bump when the written folder changes, so cached conversions are remade
INFO = "conversion.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
LDM_PREFIX = "control_model."  # diffusers' LDM_CONTROLNET_KEY
BASE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")  # ignored
REQUIRED = ("input_hint_block.0.weight", "zero_convs.0.0.weight", "middle_block_out.0.weight")
DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"  # a single-file ControlNet in diffusers' own names
HINT, LABEL = "input_hint_block.", "label_emb.0.0.weight"
RGB = 3  # the engines feed control images as [2B, 3, H, W]
POOLED = ("_shuffle", "_shuffle_fp16")  # stems of shuffle ControlNets: global pooling (as ComfyUI and Forge decide)

if TYPE_CHECKING:
    from diffusers.models.controlnets.controlnet import ControlNetModel

Tensors = dict[str, torch.Tensor]


def read_header(path: Path) -> Tensors:
    """The file's tensors as meta tensors: names and shapes from the safetensors header, no data (ValueError
    naming the file when it is not a readable safetensors file: a bad header, a truncated body)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"ControlNet {path} is not a readable .safetensors file ({e})") from None


def control_keys(path: Path, keys: list[str]) -> dict[str, str]:
    """The ControlNet's tensors: name without `control_model.` -> name in the file. With the prefix, the base
    model's tensors that ControlNet 1.0's full checkpoints carry (BASE_PREFIXES) are ignored; any other key, a
    file in diffusers' names or one that is not a ControlNet is a ValueError naming the file and a key."""
    if any(k.startswith(LDM_PREFIX) for k in keys):
        other = [k for k in keys if not k.startswith((LDM_PREFIX, *BASE_PREFIXES))]
        if other:
            raise ValueError(f"ControlNet {path}: tensor {other[0]!r} ({len(other)} such) is neither under "
                             f"{LDM_PREFIX!r} nor a base model's ({', '.join(BASE_PREFIXES)})")
        names = {k[len(LDM_PREFIX):]: k for k in keys if k.startswith(LDM_PREFIX)}
    else:
        names = {k: k for k in keys}
    if DIFFUSERS_KEY in names:
        raise ValueError(f"ControlNet {path} is in diffusers' names ({DIFFUSERS_KEY!r}), not the original layout: "
                         "give it as a ControlNetModel folder (its config.json beside it as "
                         "diffusion_pytorch_model.safetensors)")
    missing = [k for k in REQUIRED if k not in names]
    if missing:
        example = f"e.g. {keys[0]!r}" if keys else "none"
        raise ValueError(f"ControlNet {path} is not a ControlNet in the original layout: no {missing[0]!r} (with or "
                         f"without the {LDM_PREFIX!r} prefix); it has {len(keys)} tensors, {example}")
    return names


def _block_indices(path: Path, state: Tensors, prefix: str, names: dict[str, str]) -> list[int]:
    """The sorted indices n of the `<prefix><n>.*` tensors; ValueError unless they are numbers."""
    found = {k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}
    bad = sorted(x for x in found if not x.isdigit())
    if bad:
        raise ValueError(f"ControlNet {path}: {names[next(k for k in state if k.startswith(prefix + bad[0]))]!r} "
                         f"is not a {prefix}<number> tensor")
    return sorted(int(x) for x in found)


def hint_channels(path: Path, state: Tensors, names: dict[str, str]) -> list[int]:
    """The hint block's channels as ControlNetModel's conditioning_embedding_out_channels: conv 0's output, then
    each stride-2 conv's (4, 8, .., 2m - 2). ValueError naming the file when the block is not conv, SiLU, .., conv
    with convolutions at 0, 2, .., 2m (an even number of them)."""
    indices = _block_indices(path, state, HINT, names)
    if len(indices) < 2 or len(indices) % 2 or indices != list(range(0, 2 * len(indices), 2)):
        raise ValueError(f"ControlNet {path}: its {HINT}* convolutions are at {indices}; the original layout has "
                         "them at 0, 2, .., 2m (conv_in, pairs of convolutions, conv_out), e.g. 0..14")
    outs = {n: _shape(path, state, f"{HINT}{n}.weight", names)[0] for n in indices}
    return [outs[0]] + [outs[n] for n in indices[1:-1] if n % 4 == 0]


def _shape(path: Path, state: Tensors, key: str, names: dict[str, str]) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"ControlNet {path}: no tensor {LDM_PREFIX + key!r} (with or without the prefix), which the "
                         "original layout has")
    shape = tuple(state[key].shape)
    if len(shape) < 2:
        raise ValueError(f"ControlNet {path}: {names[key]!r} has shape {list(shape)}, not a weight matrix")
    return shape


def down_layout(path: Path, state: Tensors, names: dict[str, str]) -> dict[str, Any]:
    """block_out_channels, layers_per_block and down_block_types read off `input_blocks.*`: resnets
    (`<i>.0.out_layers.3`: their channels), attentions (`<i>.1.*`) and downsamplers (`<i>.0.op`) that end a block."""
    indices = _block_indices(path, state, "input_blocks.", names)
    if indices != list(range(len(indices))) or len(indices) < 2:
        raise ValueError(f"ControlNet {path}: its input_blocks.* are numbered {indices}, not 0, 1, .., n")
    blocks: list[list[tuple[int, bool]]] = [[]]
    for i in indices[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:
            blocks.append([])
            continue
        channels = _shape(path, state, f"input_blocks.{i}.0.out_layers.3.weight", names)[0]
        blocks[-1].append((channels, any(k.startswith(f"input_blocks.{i}.1.") for k in state)))
    layers = sorted({len(b) for b in blocks})
    if len(layers) != 1 or not layers[0]:
        raise ValueError(f"ControlNet {path}: its down blocks have {[len(b) for b in blocks]} resnets; a "
                         "ControlNetModel has the same number (layers_per_block) in each")
    return {
        "block_out_channels": [b[-1][0] for b in blocks],
        "layers_per_block": layers[0],
        "down_block_types": ["CrossAttnDownBlock2D" if any(a for _, a in b) else "DownBlock2D" for b in blocks],
    }


def _first(state: Tensors, suffix: str) -> torch.Tensor | None:
    return next((state[k] for k in sorted(state) if k.endswith(suffix)), None)


def derive_config(path: Path, state: Tensors, names: dict[str, str], unet: dict[str, Any],
                  model: str) -> dict[str, Any]:
    """The ControlNetModel config of this checkpoint: the base UNet's config where ControlNetModel has the field
    (as ControlNetModel.from_unet copies it), overridden by what the shapes say; ValueError naming the file when
    it was made for another base model (export.control.check_config) or takes non-RGB control images."""
    from diffusers.models.controlnets.controlnet import ControlNetModel

    fields = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in unet.items() if k in fields}
    config |= down_layout(path, state, names) | {
        "in_channels": _shape(path, state, "input_blocks.0.0.weight", names)[1],
        "conditioning_channels": _shape(path, state, f"{HINT}0.weight", names)[1],
        "conditioning_embedding_out_channels": hint_channels(path, state, names),
    }
    if (key := _first(state, "attn2.to_k.weight")) is not None:
        config["cross_attention_dim"] = key.shape[1]
    if (proj := _first(state, ".proj_in.weight")) is not None:
        config["use_linear_projection"] = proj.dim() == 2
    config["global_pool_conditions"] = path.stem.lower().endswith(POOLED)
    label = state.get(LABEL)
    config["projection_class_embeddings_input_dim"] = None if label is None else label.shape[1]
    if label is None:
        config |= {"addition_embed_type": None, "class_embed_type": None}
    check_config(path, config, unet, model)
    if config["conditioning_channels"] != RGB:
        raise ValueError(f"ControlNet {path} takes {config['conditioning_channels']}-channel control images "
                         f"({names[f'{HINT}0.weight']!r}); the engines feed RGB ({RGB} channels)")
    return config


def empty_controlnet(path: Path, config: dict[str, Any]) -> ControlNetModel:
    """A ControlNetModel of `config` on the meta device: its keys and shapes, no memory."""
    from diffusers.models.controlnets.controlnet import ControlNetModel

    try:
        with torch.device("meta"):
            return ControlNetModel(**config)
    except (ValueError, TypeError) as e:  # diffusers checks its arguments' consistency
        raise ValueError(f"ControlNet {path}: its derived config does not make a ControlNetModel ({e})") from None


def convert_state_dict(state: Tensors, config: dict[str, Any]) -> dict[str, torch.Tensor | None]:
    """Original layout (without the prefix) -> ControlNetModel names: diffusers' convert_controlnet_checkpoint,
    plus `label_emb` and a hint block of any depth (see the module doc). The values are `state`'s own tensors
    (None where diffusers looked for a tensor the file lacks), so each is traced back to its key by identity."""
    from diffusers.loaders import single_file_utils as su

    prefixed = {LDM_PREFIX + k: v for k, v in state.items()}  # diffusers strips it: one path for both layouts
    converted = {k: v for k, v in su.convert_controlnet_checkpoint(prefixed, config).items()
                 if not k.startswith("controlnet_cond_embedding.")}
    hint = sorted({int(k[len(HINT):].split(".")[0]) for k in state if k.startswith(HINT)})
    for n in hint:
        part = "conv_in" if n == 0 else "conv_out" if n == hint[-1] else f"blocks.{n // 2 - 1}"
        for suffix in ("weight", "bias"):
            converted[f"controlnet_cond_embedding.{part}.{suffix}"] = state.get(f"{HINT}{n}.{suffix}")
    kind = next((k for k in ("addition_embed_type", "class_embed_type") if config.get(k)), None)
    if kind is not None:
        for ours, ldm in su.DIFFUSERS_TO_LDM_MAPPING["controlnet"][kind].items():
            converted[ours] = state.get(ldm)
    return converted


def _some(items: list[str]) -> str:
    return items[0] + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")


def fit_problems(converted: dict[str, torch.Tensor | None], want: dict[str, tuple[int, ...]], state: Tensors,
                 names: dict[str, str]) -> list[str]:
    """Why the converted tensors do not fill a ControlNetModel with parameter shapes `want` exactly ([] when they
    do): its keys without a tensor, tensors it has no place for, tensors of another shape, file tensors unused."""
    origin = {id(v): names[k] for k, v in state.items()}
    got = {k: v for k, v in converted.items() if v is not None}
    used = {id(v) for v in got.values()}
    found = {
        "missing": [f"no tensor for {k!r}" for k in sorted(want.keys() - got.keys())],
        "extra": [f"{origin[id(got[k])]!r} (as {k!r}) has no place in the ControlNetModel"
                  for k in sorted(got.keys() - want.keys())],
        "misshaped": [f"{origin[id(got[k])]!r} is {list(got[k].shape)}, {k!r} needs {list(want[k])}"
                      for k in sorted(want.keys() & got.keys()) if tuple(got[k].shape) != want[k]],
        "unused": [f"{names[k]!r} is not part of a ControlNet in the original layout"
                   for k in sorted(state) if id(state[k]) not in used],
    }
    return [f"{label}: {_some(items)}" for label, items in found.items() if items]


def check_fit(path: Path, state: Tensors, names: dict[str, str], config: dict[str, Any],
              net: ControlNetModel, model: str) -> dict[str, torch.Tensor | None]:
    """`state` converted; ValueError naming the file and a key when it does not fill `net` exactly."""
    converted = convert_state_dict(state, config)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    problems = fit_problems(converted, want, state, names)
    if problems:
        raise ValueError(f"ControlNet {path} does not fit a ControlNetModel for {model} exactly: "
                         + "; ".join(problems))
    return converted


def _strip(state: Tensors, names: dict[str, str]) -> Tensors:
    return {ours: state[theirs] for ours, theirs in names.items()}


def load_control(path: Path, names: dict[str, str]) -> Tensors:
    """The ControlNet's tensors (names without the prefix), read with safetensors: only those, not a base model's
    beside them."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {ours: f.get_tensor(theirs) for ours, theirs in names.items()}


def convert_controlnet(path: Path, unet: dict[str, Any], model: str) -> Path:
    """The diffusers ControlNetModel folder for single-file ControlNet `path` (original layout, `.safetensors`),
    made for the base model whose UNet config is `unet`: converted once, then cached (see the module doc).
    ValueError naming the file for a file that is not a readable safetensors ControlNet, one made for another base
    model or one that does not fill its ControlNetModel exactly; nothing is written then."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"ControlNet {path}: only .safetensors single-file ControlNets are converted (nothing is "
                         "unpickled)")
    if not path.is_file():
        raise ValueError(f"ControlNet {path}: no such file")
    header = read_header(path)
    names = control_keys(path, list(header))
    state = _strip(header, names)
    config = derive_config(path, state, names, unet, model)
    net = empty_controlnet(path, config)
    check_fit(path, state, names, config, net, model)  # an unfit file leaves nothing behind
    digest = hash_file_memo(path, cache_root() / HASH_MEMO)  # re-read only when the file changed
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem)
    final = cache_root() / "controlnets" / f"{slug}-{content_key({'sha256': digest, 'config': config})}"
    if _converted(final):
        return final
    with exclusive(final):  # concurrent conversions of one file wait; a killed one's leftovers are removed
        if _converted(final):
            return final
        data = load_control(path, names)
        weights = check_fit(path, data, names, config, net, model)  # the header fitted, so the data does too
        with staging_dir(final) as tmp:
            write_folder(tmp, net, weights, {"version": CONVERT_VERSION, "source": path.name, "sha256": digest})
    return final


def write_folder(folder: Path, net: ControlNetModel, weights: dict[str, torch.Tensor | None],
                 info: dict[str, Any]) -> None:
    """A ControlNetModel folder as save_pretrained writes it (config.json, diffusion_pytorch_model.safetensors in
    the file's dtypes), plus conversion.json: where it came from."""
    from safetensors.torch import save_file

    net.save_config(folder)  # ConfigMixin: config.json with _class_name
    tensors = {k: v.contiguous() for k, v in weights.items() if v is not None}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / INFO).write_text(json.dumps(info, indent=2) + "\n")


def _converted(final: Path) -> bool:
    """Whether `final` holds a finished conversion of this version."""
    if not all((final / name).is_file() for name in ("config.json", WEIGHTS, INFO)):
        return False
    try:
        info, config = read_json(final / INFO), read_json(final / "config.json")
    except DamagedFile:
        return False  # converted again, over it
    return (isinstance(info, dict) and info.get("version") == CONVERT_VERSION and isinstance(config, dict)
            and config.get("_class_name") == MODEL_CLASS[1])


def prepare_controlnet(path: Path, unet: dict[str, Any], model: str) -> Path:
    """The diffusers ControlNetModel folder to build ControlNet `path` from, checked against the base model's UNet
    config (check_controlnet): `path` itself when it is such a folder; for a single-file `.safetensors` ControlNet
    in the original (lllyasviel / A1111) layout, its cached conversion (`convert_controlnet`). ValueError
    naming `path` for anything else: a pickled file, a file that is not a ControlNet, one for another base model."""
    folder = convert_controlnet(path, unet, model) if path.is_file() and path.suffix.lower() == ".safetensors" else path
    check_controlnet(folder, unet, model)
    return folder
