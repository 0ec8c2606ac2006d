"""Single-file checkpoints in the original layout (SD 1.x / 2.x LDM, SDXL `sgm` as Stability, ComfyUI and A1111
save them; `.safetensors` only) -> a cached diffusers folder.

The conversion is diffusers' own (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint` / `convert_open_clip_checkpoint` from diffusers.loaders.single_file_utils,
the functions `from_single_file` dispatches to) with configs from our presets only: nothing is
downloaded and nothing is unpickled (tensors are read with safetensors).

Text encoders by layout (a family's `single_file_text`; SD's is read off the checkpoint):
    SD 1.x   cond_stage_model.transformer.*          CLIP ViT-L (transformers names) -> text_encoder
    SD 2.x   cond_stage_model.model.*                OpenCLIP ViT-H (open_clip names) -> text_encoder
    SDXL     conditioner.embedders.0.transformer.*   CLIP ViT-L -> text_encoder
             conditioner.embedders.1.model.*         OpenCLIP ViT-bigG with projection -> text_encoder_2
    refiner  conditioner.embedders.0.model.*         OpenCLIP ViT-bigG with projection -> text_encoder_2 only
SDXL's UNet adds `label_emb.0.*` (the "text_time" embedding), which diffusers' UNet conversion maps.

The preset is chosen by shape: the checkpoint's header (names and shapes, no data) is run through the
same conversion as meta tensors for each preset, and the preset whose models (built on the meta
device) it fills exactly -- every key present, none left over, every shape equal -- is taken. So a
checkpoint is never half-loaded: a missing, extra or misshaped weight is an error naming it.

The result is written once, atomically, to `<cache>/converted/<stem>-<sha256[:16]>/` as an ordinary
diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), and reused.
Inpainting checkpoints (a 9-channel `input_blocks.0.0` conv) match an inpainting preset and are written
as StableDiffusionInpaintPipeline folders; SDXL checkpoints as StableDiffusionXLPipeline folders, an SDXL
refiner (only with the architecture of a refiner preset: there is no full-size one) as a
StableDiffusionXLImg2ImgPipeline folder with `requires_aesthetics_score`, as diffusers writes them.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from export.families import FAMILIES, get_family
from export.presets import PRESETS, SDXL_PRESETS, Preset
from export.store import (
    HASH_MEMO,
    DamagedFile,
    cache_root,
    exclusive,
    hash_file_memo,
    read_json,
    staging_dir,
)
from export.tokenizer import default_tokenizer, sdxl_tokenizer_2

CONVERT_VERSION = 1  # bump when the written folder changes, so cached conversions are remade
INFO = "conversion.json"
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
SUPPORTED = (
    "SD 1.x / SD 2.x checkpoints (text-to-image or 9-channel inpainting) in the original LDM layout "
    "(model.diffusion_model.*, first_stage_model.*, cond_stage_model.*); SDXL base checkpoints in the original "
    "sgm layout (model.diffusion_model.*, first_stage_model.*, conditioner.embedders.0.transformer.* and "
    "conditioner.embedders.1.model.*); SDXL refiners (conditioner.embedders.0.model.* only) with a refiner "
    "preset's architecture"
)
IGNORED_SUFFIXES = ("position_ids",)  # buffers some checkpoints carry and models rebuild themselves
SD_PREFIXES = ("cond_stage_model.",)
XL_PREFIXES = ("conditioner.embedders.",)
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
CANDIDATES: dict[str, Preset] = {**PRESETS, **SDXL_PRESETS}


def _layouts(family: str) -> dict[str, tuple[str, str]] | None:
    """A family's fixed text encoder layouts (sub-folder -> (layout, key prefix)); None: read off the checkpoint."""
    layouts = get_family(family).single_file_text
    return dict(layouts) if layouts is not None else None


def _fixed_prefixes(txt2img: bool) -> tuple[str, ...]:
    """The text key prefixes of the fixed layouts of the families that do (not: the refiner) make images from
    text alone."""
    return tuple(prefix for f in FAMILIES.values() if f.single_file_text and f.txt2img == txt2img
                 for _, prefix in f.single_file_text.values())


def text_folders(preset: Preset) -> tuple[str, ...]:
    """The preset's text encoder sub-folders: text_encoder (SD), + text_encoder_2 (SDXL), text_encoder_2 (refiner)."""
    return tuple(_layouts(preset.family) or {"text_encoder": None})


def _text_class(family: str, sub: str) -> str:
    return get_family(family).model_classes[sub][1]


def empty_models(preset: Preset) -> dict[str, torch.nn.Module]:
    """The preset's UNet, VAE and text encoder(s) on the meta device: configs and shapes, no memory."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    archs = {"text_encoder": preset.clip, "text_encoder_2": getattr(preset, "clip2", None)}
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**preset.unet_config()), "vae": AutoencoderKL(**preset.vae_config())}
        for sub in text_folders(preset):
            models[sub] = getattr(transformers, _text_class(preset.family, sub))(CLIPTextConfig(**archs[sub].config()))
    return models


def _sd_text(ckpt: dict[str, torch.Tensor], text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SD 1.x (cond_stage_model.transformer.*, transformers names) or SD 2.x (cond_stage_model.model.*)."""
    from diffusers.loaders import single_file_utils as su

    if su.is_clip_model(ckpt):
        return su.convert_ldm_clip_checkpoint(ckpt)
    if su.is_open_clip_model(ckpt):
        return su.convert_open_clip_checkpoint(text_encoder, ckpt, prefix="cond_stage_model.model.")
    return {}


def _layout_text(ckpt: dict[str, torch.Tensor], model: torch.nn.Module, layout: str, prefix: str) -> dict:
    """One text encoder of a fixed (SDXL) layout: CLIP (transformers names) or OpenCLIP under `prefix`."""
    from diffusers.loaders import single_file_utils as su

    if layout == "clip":
        return su.convert_ldm_clip_checkpoint(ckpt, remove_prefix=prefix)
    if not any(k.startswith(prefix) for k in ckpt):
        return {}
    return su.convert_open_clip_checkpoint(model, ckpt, prefix=prefix)


def _tidy_text(text: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Key names as `model` has them (CLIPTextModel is flat in transformers >= 5.6), rebuilt buffers dropped."""
    if not hasattr(model, "text_model"):
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
    return {k: v for k, v in text.items() if not k.endswith(IGNORED_SUFFIXES)}


def convert_state_dict(ckpt: dict[str, torch.Tensor], models: dict, family: str = "sd") -> dict[str, dict]:
    """Original-layout checkpoint -> diffusers/transformers state dicts per component (diffusers' conversion
    code). KeyError when the checkpoint lacks a key the conversion needs (e.g. SDXL's label_emb)."""
    from diffusers.loaders import single_file_utils as su

    out = {
        "unet": su.convert_ldm_unet_checkpoint(ckpt, dict(models["unet"].config)),
        "vae": su.convert_ldm_vae_checkpoint(ckpt, dict(models["vae"].config)),
    }
    layouts = _layouts(family)
    if layouts is not None:
        text = {sub: _layout_text(ckpt, models[sub], *layout) for sub, layout in layouts.items()}
    else:
        text = {"text_encoder": _sd_text(ckpt, models["text_encoder"])}
    return out | {sub: _tidy_text(state, models[sub]) for sub, state in text.items()}


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
                "cond_stage_model.model.", "conditioner.embedders.0.transformer.", "conditioner.embedders.0.model.",
                "conditioner.embedders.1.model.")
    counts = Counter(next((f for f in families if k.startswith(f)), "other") for k in ckpt)
    other = next((k for k in ckpt if not k.startswith(families)), None)
    parts = [f"{n} {fam}*" if fam != "other" else f"{n} other keys (e.g. {other!r})" for fam, n in counts.most_common()]
    widths = {
        "cross-attention width": [v.shape[1] for k, v in ckpt.items() if k.endswith("attn2.to_k.weight")][:1],
        "text width": [v.shape[1] for k, v in ckpt.items() if k.endswith("token_embedding.weight")][:1],
        "UNet base channels": [v.shape[0] for k, v in ckpt.items() if k.endswith("input_blocks.0.0.weight")],
        "UNet input channels": [v.shape[1] for k, v in ckpt.items() if k.endswith("input_blocks.0.0.weight")],
        "UNet added-conditioning width": [v.shape[1] for k, v in ckpt.items() if k.endswith("label_emb.0.0.weight")],
    }
    parts += [f"{label} {v[0]}" for label, v in widths.items() if v]
    return f"{len(ckpt)} tensors: " + ", ".join(parts)


def candidates(ckpt: dict[str, torch.Tensor]) -> list[str]:
    """The presets worth trying: SD ones for a cond_stage_model.* text encoder, SDXL ones for
    conditioner.embedders.*, every one for anything else (so the refusal lists them all)."""
    sd, xl = (any(k.startswith(p) for k in ckpt) for p in (SD_PREFIXES, XL_PREFIXES))
    if sd != xl:
        return [n for n, p in CANDIDATES.items() if (_layouts(p.family) is not None) == xl]
    return list(CANDIDATES)


def try_preset(ckpt: dict[str, torch.Tensor], preset: Preset) -> tuple[list[str], dict]:
    """(why `ckpt` does not fill the preset's models exactly, [] when it does; those models)."""
    models = empty_models(preset)
    try:
        converted = convert_state_dict(ckpt, models, preset.family)
    except KeyError as e:  # diffusers' conversion indexes keys it needs (SDXL's label_emb.0.*)
        return [f"unet: missing {e.args[0]!r}, which the conversion needs"], models
    return mismatches(converted, models), models


def choose_preset(path: Path, ckpt: dict[str, torch.Tensor], preset: str | None) -> tuple[Preset, dict]:
    """The (given or detected) preset whose models this checkpoint fills exactly, with those models."""
    if preset is not None and preset not in CANDIDATES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(CANDIDATES)}")
    report = {}
    for name in [preset] if preset else candidates(ckpt):
        problems, models = try_preset(ckpt, CANDIDATES[name])
        if not problems:
            return CANDIDATES[name], models
        report[name] = "; ".join(problems)
    why = "\n".join(f"  {name}: {text}" for name, text in report.items())
    raise ValueError(
        f"{path.name} does not match {'preset ' + repr(preset) if preset else 'any supported model family'}.\n"
        f"Found {describe(ckpt)}.\nSupported: {SUPPORTED}, with the architecture of a preset "
        f"({', '.join(CANDIDATES)}).\nPer preset:\n{why}{refiner_hint(ckpt)}"
    )


def refiner_hint(ckpt: dict[str, torch.Tensor]) -> str:
    """A line for a refiner-layout checkpoint that no preset fits (the full-size SDXL refiner has no preset)."""
    prefixes = _fixed_prefixes(txt2img=False)
    if not any(k.startswith(prefixes) for k in ckpt):
        return ""
    refiners = [n for n, p in CANDIDATES.items() if not get_family(p.family).txt2img] or ["none"]
    return (f"\nThis is an SDXL refiner checkpoint ({', '.join(prefixes)}* only): single-file refiners convert only "
            f"with a refiner preset's architecture ({', '.join(refiners)}); load a full-size refiner from its "
            "diffusers folder (a StableDiffusionXLImg2ImgPipeline folder with text_encoder_2) instead.")


def model_index(preset: Preset, texts: tuple[str, ...]) -> dict:
    """model_index.json as diffusers' save_pretrained writes it for the preset's pipeline class."""
    import diffusers

    family = get_family(preset.family)
    index = {
        "_class_name": preset.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    xl = family.single_file_text is not None
    for sub in ("text_encoder", "text_encoder_2") if xl else ("text_encoder",):
        index[sub] = ["transformers", _text_class(family.name, sub)] if sub in texts else [None, None]
        index[TOKENIZERS[sub]] = ["transformers", "CLIPTokenizer"] if sub in texts else [None, None]
    if not xl:
        return index | {"safety_checker": [None, None], "requires_safety_checker": False}
    index["force_zeros_for_empty_prompt"] = family.zero_empty_negative
    if preset.pipeline_class != "StableDiffusionXLPipeline":  # the only SDXL class without the flag
        index["requires_aesthetics_score"] = family.aesthetic
    return index


def write_tokenizer(folder: Path, sub: str, preset: Preset) -> None:
    """tokenizer/ (CLIP, pads with <|endoftext|>) or tokenizer_2/ (SDXL's: pads with "!")."""
    if sub == "text_encoder_2":
        tokenizer = sdxl_tokenizer_2(preset.text_len)
    else:
        tokenizer = default_tokenizer(preset.text_len)
    tokenizer.save_pretrained(folder / TOKENIZERS[sub])


def write_folder(folder: Path, preset: Preset, models: dict, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """A standard diffusers folder of the preset's pipeline class (StableDiffusion(Inpaint)Pipeline,
    StableDiffusionXLPipeline, the refiner's StableDiffusionXLImg2ImgPipeline): the preset's configs +
    converted weights."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    for name in ("unet", "vae"):
        models[name].save_config(folder / name)
    texts = text_folders(preset)
    for sub in texts:
        text_config = models[sub].config
        text_config.architectures = [_text_class(preset.family, sub)]
        text_config.save_pretrained(folder / sub)
        write_tokenizer(folder, sub, preset)
    DDIMScheduler.from_config(preset.scheduler.config(preset.prediction_type)).save_config(folder / "scheduler")
    index = model_index(preset, texts)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name, state in weights.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name / WEIGHT_FILES[name]),
                  metadata={"format": "pt"})


def convert_single_file(path: Path, preset: str | None = None) -> Path:
    """The diffusers folder for a single-file original-layout `.safetensors` checkpoint (converted once, then
    cached).

    `preset` names the architecture (a key of CANDIDATES: the SD and SDXL presets); by default it is detected
    from the checkpoint's tensor shapes. Raises ValueError for a non-safetensors file or an unsupported checkpoint.
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
        converted = convert_state_dict(load_file(str(path)), models, chosen.family)
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
