"""Reference torch modules: from a local diffusers folder, a single-file checkpoint or a random preset.

Every model goes through one loader (`load_model`): a random preset is first materialised from its
fixed seed as an ordinary diffusers folder (safetensors), a single-file LDM checkpoint is first
converted to one (export/single_file.py). Nothing is downloaded, nothing is unpickled. The folder's
family (export/families/, from model_index.json) says which sub-models and wrappers it has: SDXL adds
text_encoder_2 / tokenizer_2 and its own clip, clip2 and unet conventions (export/specs.py).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from export import attention, ip_adapter, tiny_vae
from export.control import for_component, residual_layout
from export.errors import PICKLE_SUFFIXES
from export.families import SD, SDXL, Family, detect_family, get_family
from export.families.sdxl_wrappers import CastOutput
from export.presets import ALL_PRESETS, LdmPreset, Preset
from export.single_file import convert_single_file
from export.specs import Dims
from export.store import cache_root, content_key, exclusive, staging_dir  # cache_root: re-exported for engine/build.py
from export.tokenizer import DATA_DIR, default_tokenizer, sdxl_tokenizer_2  # noqa: F401  (DATA_DIR: re-exported)

FORMAT_VERSION = 1  # bump when materialisation changes, so cached preset folders are remade
SD_PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")
SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                         "StableDiffusionXLInpaintPipeline")
UPSCALE_PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
PIPELINE_CLASSES = SD_PIPELINE_CLASSES + SDXL_PIPELINE_CLASSES + (UPSCALE_PIPELINE_CLASS,)  # what we can write


def random_components(preset: Preset) -> dict:
    """Seeded random UNet, VAE and the family's CLIP text encoder(s) for a preset (fp32): SDXL adds
    text_encoder_2; the SDXL refiner has text_encoder_2 only (text_encoder None, as its folders say)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = get_family(preset.family).roles.text_encoders
    torch.manual_seed(preset.seed)
    unet = UNet2DConditionModel(**preset.unet_config())
    torch.manual_seed(preset.seed + 1)
    vae = AutoencoderKL(**preset.vae_config())
    out = {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": None}
    if "clip" in encoders:
        torch.manual_seed(preset.seed + 2)
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**preset.clip.config())).eval()
    if "clip2" in encoders:
        torch.manual_seed(preset.seed + 3)
        out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**preset.clip2.config())).eval()
    return out


def save_diffusers_folder(components: dict, scheduler_config: dict, folder: Path,
                          pipeline_class: str = "StableDiffusionPipeline", family: Family | None = None,
                          low_res: tuple[dict, int] | None = None) -> None:
    """Write components as a standard diffusers folder of `pipeline_class` (StableDiffusionPipeline,
    StableDiffusionInpaintPipeline or their SDXL counterparts, StableDiffusionUpscalePipeline), weights as
    safetensors, through that diffusers pipeline. An SDXL `family` (default `sdxl`) sets `requires_aesthetics_score`
    and `force_zeros_for_empty_prompt`; without a `text_encoder` (the refiner) there is no `tokenizer` either.
    The upscaler takes `low_res`: its low_res_scheduler config and max_noise_level."""
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler

    if pipeline_class not in PIPELINE_CLASSES:
        raise ValueError(f"cannot write a {pipeline_class!r} folder; choose from {', '.join(PIPELINE_CLASSES)}")
    if pipeline_class in SDXL_PIPELINE_CLASSES:
        family = family or SDXL
        extra = dict(tokenizer_2=sdxl_tokenizer_2(), image_encoder=None, feature_extractor=None,
                     force_zeros_for_empty_prompt=family.zero_empty_negative, add_watermarker=False)
        if pipeline_class != "StableDiffusionXLPipeline":  # the only one without requires_aesthetics_score
            extra["requires_aesthetics_score"] = family.aesthetic
    elif pipeline_class == UPSCALE_PIPELINE_CLASS:
        if low_res is None:
            raise ValueError("an upscaler folder needs its low_res_scheduler config and max_noise_level")
        extra = dict(safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=low_res[1],
                     low_res_scheduler=DDPMScheduler.from_config(low_res[0]))
    else:
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, pipeline_class)(
        **components,
        tokenizer=default_tokenizer() if components.get("text_encoder") is not None else None,
        scheduler=DDIMScheduler.from_config(scheduler_config),
        **extra,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def materialize_preset(preset: Preset | LdmPreset, root: Path | None = None) -> Path:
    """The preset's diffusers folder, created once from its seed (atomically) and reused. Concurrent callers
    wait for one another (lock beside the folder); leftovers of a killed attempt are removed."""
    key = content_key({"preset": repr(preset), "format": FORMAT_VERSION})
    folder = (root or cache_root() / "presets") / f"{preset.name}-{key}"
    if (folder / "model_index.json").is_file():
        return folder
    with exclusive(folder):
        if not (folder / "model_index.json").is_file():  # unless another process made it meanwhile
            with staging_dir(folder) as tmp:
                if isinstance(preset, LdmPreset):  # UNet2DModel + VQModel: its own pipeline class writes it
                    preset.save_folder(tmp)
                else:
                    save_diffusers_folder(random_components(preset), preset.scheduler.config(preset.prediction_type),
                                          tmp, preset.pipeline_class, get_family(preset.family), preset.low_res())
    return folder


@dataclass
class LoadedModel:
    path: Path  # the diffusers folder
    model_id: str  # short name for engine directories
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    dims: Dims
    family: Family = SD
    text_encoder: torch.nn.Module | None = None  # SD, SDXL (not the SDXL refiner)
    tokenizer: object | None = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL
    tokenizer_2: object | None = None  # SDXL


def resolve_model(model: str | Path) -> tuple[Path, str]:
    """(diffusers folder, model id) for a preset name, a diffusers folder or a .safetensors file."""
    if str(model) in ALL_PRESETS:
        return materialize_preset(ALL_PRESETS[str(model)]), str(model)
    path = Path(model).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing to load {path}: pickled checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run code. "
            "Convert it to .safetensors first (e.g. load it yourself in a trusted environment and save with "
            "safetensors.torch.save_file(state_dict, 'model.safetensors'))."
        )
    if not path.exists():
        raise ValueError(f"model {str(model)!r} is neither a preset ({', '.join(ALL_PRESETS)}) nor an existing path")
    name = path.resolve().stem if path.is_file() else path.resolve().name
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]  # same-named folders stay apart
    slug = f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{digest}"
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a diffusers folder (no model_index.json)")
        return path, slug
    if path.suffix.lower() == ".safetensors":
        return convert_single_file(path), slug
    raise ValueError(f"unsupported model file {path}: expected a diffusers folder or a .safetensors checkpoint")


def check_model_folders(folder: Path, family: Family) -> None:
    """ValueError naming the first sub-folder a model of `family` needs that `folder` lacks."""
    needed = family.model_folders()
    for sub in needed:
        if not (folder / sub).is_dir():
            raise ValueError(f"{folder}: missing the {sub}/ folder; a {family.name} model needs "
                             f"{', '.join(needed)}")


def folder_dims(folder: Path) -> Dims:
    """A model folder's shape facts, read from its config files (no weights loaded). ValueError naming a
    missing sub-folder (e.g. an SDXL folder without text_encoder_2)."""

    def config(sub: str, name: str = "config.json") -> dict:
        return json.loads((folder / sub / name).read_text())

    family = detect_family(folder)
    check_model_folders(folder, family)
    unet, vae = config(family.spec(family.roles.denoiser).model_folder), config(decoder_folder(family))
    texts = [config(family.spec(name).model_folder) for name in family.roles.text_encoders]
    toks = [config(sub, "tokenizer_config.json") for sub in family.tokenizers]
    text_len = min((min(int(t.get("model_max_length") or x["max_position_embeddings"]), x["max_position_embeddings"])
                    for t, x in zip(toks, texts, strict=True)), default=Dims.text_len)  # no text: unused
    added = family.added_dims(folder, unet, texts) if family.added_dims else {}
    residual_channels, residual_scales = residual_layout(unet)
    return Dims(**{
        "latent_channels": vae.get("latent_channels", 4),
        "unet_in_channels": unet["in_channels"],
        "text_dim": sum(x.get("hidden_size") or x["d_model"] for x in texts),  # d_model: LDMBert's (BART-style)
        "text_len": text_len,
        # the layers of a text encoder whose graph returns each (SD's clip: clip skip); 0 for families without one
        "text_layers": int(texts[0].get("num_hidden_layers", 0))
        if texts and "text_layers" in family.spec(family.roles.text_encoders[0]).output_names else 0,
        "text_vocab": int(texts[0].get("vocab_size") or Dims.text_vocab) if texts else Dims.text_vocab,
        "vae_scale": 2 ** (len(vae["block_out_channels"]) - 1),
        "vae_sample_size": int(vae.get("sample_size") or 512),
        "unet_scale": 2 ** (len(unet["down_block_types"]) - 1),
        "residual_channels": residual_channels,
        "residual_scales": residual_scales,
        **ip_adapter.adapted_dims(folder),
        **added,
    })


def decoder_folder(family: Family) -> str:
    """The model sub-folder of a family's latent decoder: vae (KL), vqvae (the LDM paper's VQ models)."""
    return family.spec(family.roles.latent_decoder).model_folder


def default_size(folder: Path) -> int:
    """The model's native image size in pixels: the VAE's sample_size (512 where its config has none)."""
    vae = json.loads((folder / decoder_folder(detect_family(folder)) / "config.json").read_text())
    return int(vae.get("sample_size") or 512)


def _model_class(family: Family, sub: str):
    """The diffusers / transformers class a family's model sub-folder loads with."""
    import importlib

    if sub not in family.model_classes:
        raise ValueError(f"a {family.name} model has no {sub}/ model; it has {', '.join(family.model_classes)}")
    library, name = family.model_classes[sub]
    return getattr(importlib.import_module(library), name)


def load_submodel(folder: Path, sub: str, dtype: torch.dtype = torch.float32,
                  family: Family | str | None = None) -> torch.nn.Module:
    """One sub-folder's model (unet, vae, text_encoder, text_encoder_2) through diffusers / transformers, offline,
    safetensors only, with our attention processor installed on diffusers modules."""
    cls = _model_class(_family_of(folder, family), sub)
    if _transformers(cls):
        return cls.from_pretrained(folder / sub, local_files_only=True, dtype=dtype).eval()
    module = cls.from_pretrained(folder, subfolder=sub, use_safetensors=True, local_files_only=True, torch_dtype=dtype)
    attention.install(_adapted(module, folder / sub))
    return module.eval()


def meta_submodel(folder: Path, sub: str, dtype: torch.dtype = torch.float32,
                  family: Family | str | None = None) -> torch.nn.Module:
    """One sub-folder's model built from its config alone, parameters on the meta device (no weight allocated,
    nothing read but the config), as `load_submodel` would build it: same classes, dtype and attention."""
    cls = _model_class(_family_of(folder, family), sub)
    with torch.device("meta"):
        if _transformers(cls):
            return cls._from_config(cls.config_class.from_pretrained(folder / sub), dtype=dtype).eval()
        module = cls.from_config(cls.load_config(folder / sub))
        module = module if dtype == torch.float32 else module.to(dtype)
        _adapted(module, folder / sub)
    attention.install(module)
    return module.eval()


def _transformers(cls: type) -> bool:
    """A transformers model class (CLIP's, and LDMBert, which diffusers defines on transformers' PreTrainedModel)."""
    from transformers import PreTrainedModel

    return issubclass(cls, PreTrainedModel)


def _adapted(module: torch.nn.Module, sub_folder: Path) -> torch.nn.Module:
    """`module` with the IP-Adapter stored beside its weights attached (export/ip_adapter.py), if there is one."""
    adapter = sub_folder / ip_adapter.WEIGHTS
    if not adapter.is_file():
        return module
    from export.families.ip_wrappers import attach

    return attach(module, adapter)


def load_model(model: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load every component of a model through diffusers / transformers, offline, safetensors only."""
    from transformers import CLIPTokenizer

    folder, model_id = resolve_model(model)
    family, dims = detect_family(folder), folder_dims(folder)  # dims: ValueError naming a missing sub-folder
    wanted = dict.fromkeys(family.spec(c).model_folder for c in family.wrappers)  # the sub-models export wraps
    subs = {sub: load_submodel(folder, sub, dtype, family).to(device) for sub in wanted}
    tokenizers = {name: CLIPTokenizer.from_pretrained(folder / name, local_files_only=True)
                  for name in family.tokenizers}
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return LoadedModel(path=folder, model_id=model_id, scheduler_config=scheduler_config, dims=dims,
                       family=family, **tokenizers, **subs)


def _wrapper(name: str, family: Family = SD):
    """(model sub-folder, wrapper) of one component of a family."""
    spec = family.spec(name)  # ValueError naming the family's components
    return spec.model_folder, family.wrapper(name)


def component_module(model: LoadedModel, name: str) -> torch.nn.Module:
    """The torch module of one component, with the spec's input/output conventions."""
    sub, wrap = _wrapper(name, model.family)
    return wrap(getattr(model, sub)).eval()


def _family_of(folder: Path, family: Family | str | None) -> Family:
    if family is None:
        return detect_family(folder) if (folder / "model_index.json").is_file() else SD
    return get_family(family) if isinstance(family, str) else family


def load_component(folder: Path, name: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   family: Family | str | None = None) -> torch.nn.Module:
    """One component's wrapped torch module, loading only its own sub-folder of `folder`. The family is
    given, or read from the folder's model_index.json, or SD for a folder without one (an engine dir)."""
    family = _family_of(folder, family)  # a ControlNet's or the image encoder's artifact: its own classes
    family = tiny_vae.for_component(ip_adapter.for_component(for_component(family, name), name), name)
    sub, wrap = _wrapper(name, family)
    return wrap(load_submodel(folder, sub, dtype, family).to(device)).eval()


def meta_component(folder: Path, name: str, dtype: torch.dtype = torch.float32,
                   family: Family | str | None = None) -> tuple[torch.nn.Module, str]:
    """(the component's wrapped module on the meta device, the prefix of its parameter names before the
    sub-folder's own tensor names, e.g. "unet.")."""
    family = _family_of(folder, family)
    sub, wrap = _wrapper(name, family)
    module = wrap(meta_submodel(folder, sub, dtype, family)).eval()
    attr = next(n for n, m in module.named_children() if not isinstance(m, CastOutput))
    return module, attr + "."


def component_files(folder: Path, sub_folder: str) -> list[Path]:
    """The files whose bytes define one component's weights and config (for cache keys)."""
    sub = folder / sub_folder
    return sorted(p for p in sub.iterdir() if p.suffix in (".json", ".safetensors"))
