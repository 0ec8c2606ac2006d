"""Single-file LDM/CompVis checkpoints (SD 1.x, SD 2.x `.safetensors`) -> a cached diffusers folder.

The conversion is diffusers' own (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint` / `convert_open_clip_checkpoint` from diffusers.loaders.single_file_utils,
the functions `from_single_file` dispatches to) with configs from our presets only: nothing is
downloaded and nothing is unpickled (tensors are read with safetensors).

The preset is chosen by shape: the checkpoint's header (names and shapes, no data) is run through the
same conversion as meta tensors for each preset, and the preset whose models (built on the meta
device) it fills exactly -- every key present, none left over, every shape equal -- is taken. So a
checkpoint is never half-loaded: a missing, extra or misshaped weight is an error naming it.

The result is written once, atomically, to `<cache>/converted/<stem>-<sha256[:16]>/` as an ordinary
diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), and reused.
Inpainting checkpoints (a 9-channel `input_blocks.0.0` conv) match an inpainting preset and are written
as StableDiffusionInpaintPipeline folders.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from export.presets import PRESETS, Preset
from export.store import HASH_MEMO, DamagedFile, cache_root, exclusive, hash_file_memo, read_json, staging_dir
from export.tokenizer import default_tokenizer

CONVERT_VERSION = 1  # bump when the written folder changes, so cached conversions are remade
INFO = "conversion.json"
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
FAMILIES = (
    "SD 1.x / SD 2.x checkpoints (text-to-image or 9-channel inpainting) in the original LDM layout "
    "(model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)"
)
IGNORED_SUFFIXES = ("position_ids",)  # buffers some checkpoints carry and models rebuild themselves


def empty_models(preset: Preset) -> dict[str, torch.nn.Module]:
    """The preset's UNet, VAE and CLIP text encoder on the meta device: configs and shapes, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**preset.unet_config()),
            "vae": AutoencoderKL(**preset.vae_config()),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**preset.clip.config())),
        }


def convert_state_dict(ckpt: dict[str, torch.Tensor], models: dict) -> dict[str, dict[str, torch.Tensor]]:
    """LDM checkpoint -> diffusers/transformers state dicts per component (diffusers' conversion code)."""
    from diffusers.loaders import single_file_utils as su

    text_encoder = models["text_encoder"]
    if su.is_clip_model(ckpt):  # SD 1.x: cond_stage_model.transformer.* (transformers names)
        text = su.convert_ldm_clip_checkpoint(ckpt)
    elif su.is_open_clip_model(ckpt):  # SD 2.x: cond_stage_model.model.* (OpenCLIP names)
        text = su.convert_open_clip_checkpoint(text_encoder, ckpt, prefix="cond_stage_model.model.")
    else:
        text = {}
    if not hasattr(text_encoder, "text_model"):  # CLIPTextModel is flat in transformers >= 5.6
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
    return {
        "unet": su.convert_ldm_unet_checkpoint(ckpt, dict(models["unet"].config)),
        "vae": su.convert_ldm_vae_checkpoint(ckpt, dict(models["vae"].config)),
        "text_encoder": {k: v for k, v in text.items() if not k.endswith(IGNORED_SUFFIXES)},
    }


def mismatches(converted: dict, models: dict) -> list[str]:
    """Why a converted checkpoint does not fill these models exactly ([] when it does)."""
    problems = []
    for name, module in models.items():
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted[name].items()}
        common = sorted(want.keys() & got.keys())
        wrong = [f"{k} {list(got[k])} vs {list(want[k])}" for k in common if got[k] != want[k]]
        for label, items in (("missing", sorted(want.keys() - got.keys())),
                             ("unexpected", sorted(got.keys() - want.keys())), ("misshaped", wrong)):
            if items:
                problems.append(f"{name}: {len(items)} {label} (e.g. {items[0]})")
    return problems


def read_header(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors: names and shapes from the safetensors header, no data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{path} is not a readable .safetensors file: {e}") from e


def describe(ckpt: dict[str, torch.Tensor]) -> str:
    """What a checkpoint holds, in a line: key families, cross-attention and text widths."""
    families = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.",
                "cond_stage_model.model.")
    counts = Counter(next((f for f in families if k.startswith(f)), "other") for k in ckpt)
    other = next((k for k in ckpt if not k.startswith(families)), None)
    parts = [f"{n} {fam}*" if fam != "other" else f"{n} other keys (e.g. {other!r})" for fam, n in counts.most_common()]
    widths = {
        "cross-attention width": [v.shape[1] for k, v in ckpt.items() if k.endswith("attn2.to_k.weight")][:1],
        "text width": [v.shape[1] for k, v in ckpt.items() if k.endswith("token_embedding.weight")][:1],
        "UNet base channels": [v.shape[0] for k, v in ckpt.items() if k.endswith("input_blocks.0.0.weight")],
        "UNet input channels": [v.shape[1] for k, v in ckpt.items() if k.endswith("input_blocks.0.0.weight")],
    }
    parts += [f"{label} {v[0]}" for label, v in widths.items() if v]
    return f"{len(ckpt)} tensors: " + ", ".join(parts)


def choose_preset(path: Path, ckpt: dict[str, torch.Tensor], preset: str | None) -> tuple[Preset, dict]:
    """The (given or detected) preset whose models this checkpoint fills exactly, with those models."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    report = {}
    for name in [preset] if preset else list(PRESETS):
        models = empty_models(PRESETS[name])
        problems = mismatches(convert_state_dict(ckpt, models), models)
        if not problems:
            return PRESETS[name], models
        report[name] = "; ".join(problems)
    why = "\n".join(f"  {name}: {text}" for name, text in report.items())
    raise ValueError(
        f"{path.name} does not match {'preset ' + repr(preset) if preset else 'any supported model family'}.\n"
        f"Found {describe(ckpt)}.\nSupported: {FAMILIES}, with the architecture of a preset "
        f"({', '.join(PRESETS)}).\nPer preset:\n{why}"
    )


def write_folder(folder: Path, preset: Preset, models: dict, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """A standard diffusers folder of the preset's pipeline class (StableDiffusionPipeline, or
    StableDiffusionInpaintPipeline for a 9-channel UNet): the preset's configs + converted weights."""
    import diffusers
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    for name in ("unet", "vae"):
        models[name].save_config(folder / name)
    text_config = models["text_encoder"].config
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(folder / "text_encoder")
    default_tokenizer(preset.text_len).save_pretrained(folder / "tokenizer")
    DDIMScheduler.from_config(preset.scheduler.config(preset.prediction_type)).save_config(folder / "scheduler")
    index = {
        "_class_name": preset.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name, state in weights.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name / WEIGHT_FILES[name]),
                  metadata={"format": "pt"})


def convert_single_file(path: Path, preset: str | None = None) -> Path:
    """The diffusers folder for a single-file LDM `.safetensors` checkpoint (converted once, then cached).

    `preset` names the architecture (a key of export.presets.PRESETS); by default it is detected from the
    checkpoint's tensor shapes. Raises ValueError for a non-safetensors file or an unsupported checkpoint.
    """
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: only .safetensors single-file checkpoints can be converted (nothing is unpickled)")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    digest = hash_file_memo(path, cache_root() / HASH_MEMO)  # re-read only when the file changed
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem)
    final = cache_root() / "converted" / f"{slug}-{digest[:16]}"
    if _converted(final, preset):
        return final
    chosen, models = choose_preset(path, read_header(path), preset)  # an unsupported file leaves nothing behind
    with exclusive(final):  # concurrent conversions of one file wait; a killed one's leftovers are removed
        if _converted(final, preset):
            return final
        converted = convert_state_dict(load_file(str(path)), models)
        assert not mismatches(converted, models)  # the header matched, so the data does too
        with staging_dir(final) as tmp:
            write_folder(tmp, chosen, models, converted)
            info = {"version": CONVERT_VERSION, "preset": chosen.name, "source": path.name, "sha256": digest}
            (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return final


def _converted(final: Path, preset: str | None) -> bool:
    """Whether `final` holds a finished conversion of this version (and of `preset`, when one is asked)."""
    if not ((final / "model_index.json").is_file() and (final / INFO).is_file()):
        return False
    try:
        info = read_json(final / INFO)
    except DamagedFile:
        return False  # converted again, over it
    return (isinstance(info, dict) and info.get("version") == CONVERT_VERSION
            and preset in (None, info.get("preset")))
