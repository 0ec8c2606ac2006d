"""The family record: what a model family is, as data plus a few small functions.

A family names its component *roles* (`Roles`: text encoders, denoiser, latent decoder and encoder, and
condition components), and owns what is specific to it: its component specs, the torch wrappers export puts
around each component, the classes its model sub-folders load with, the extra dims it reads from a model folder,
its single-file text layout, the request fields it takes (and their defaults), and how a batch of prepared
requests becomes the denoiser's inputs. The runtime asks a family for roles and hooks, never for a family name.

A new family (an upscaler, the LDM paper's VQ or class-conditional models) is a new module in this package and
a line in `export/families/__init__.py`, not an `if` elsewhere.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.specs import TXT2IMG_COMPONENTS, ComponentSpec, Dims

Outputs = dict[str, dict[str, Any]]  # text encoder -> its output tensors by name
TextConditioning = Callable[[Outputs], dict[str, Any]]  # text encoders' outputs -> denoiser inputs
# (the batch's rows: each a resolved `.request` and its loaded `.image` / `.mask`, guidance on) -> denoiser inputs
# from the requests themselves: SDXL's time ids; later families: a concatenated low-resolution image, class labels
RequestConditioning = Callable[[Sequence[Any], bool], dict[str, Any]]
RequestDefaults = Callable[[Any, Dims], dict[str, Any]]  # (a resolved request, the model's dims) -> its family
# fields, defaults filled in
AddedDims = Callable[[Path, dict, list[dict]], dict[str, int]]  # (folder, unet config, text configs) -> Dims fields


@dataclass(frozen=True)
class Roles:
    """Which component plays which part. The runtime finds components by role, never by name."""

    text_encoders: tuple[str, ...]  # run on token ids, in order
    denoiser: str = "unet"  # runs every step
    latent_decoder: str = "vae_decoder"  # latents -> pixels
    latent_encoder: str = "vae_encoder"  # pixels -> latents (img2img, inpainting); built only when needed
    conditions: tuple[str, ...] = ()  # condition components whose outputs feed the denoiser (ControlNet, ...)
    image_encoder: str = "image_encoder"  # image prompts -> embeddings the denoiser takes (IP-Adapter); built
    # only with one
    context_encoder: str = "context_encoder"  # a request's non-text condition (the class-conditional LDM's class
    # ids) -> the denoiser's cross-attention context; runs on the request conditioning inputs its spec names
    map_encoder: str = "map_encoder"  # a request's map (semantic synthesis's labels) -> channels concatenated to the
    # latents; runs as the context encoder does
    preview_decoder: str = "tiny_vae_decoder"  # a tiny decoder (TAESD): live previews, and final images on request;
    # built only with one (export/tiny_vae.py)


@dataclass(frozen=True)
class LowRes:
    """A denoiser conditioned on a low-resolution image concatenated to its latents (the x4 upscaler): a request's
    init image is that condition at the latent size, not an img2img start. It is noised at the request's noise level
    with the DDPM schedule of `scheduler_config`, and the level is the UNet's class label (engine/upscale.py)."""

    scheduler_config: str | None = "low_res_scheduler/scheduler_config.json"  # in the model folder and the engine
    # dir; None: the image is concatenated as it is (LDM super-resolution), with no noise level
    default_noise_level: int = 20  # diffusers' StableDiffusionUpscalePipeline default
    max_noise_level: int = 350  # its default; a folder's model_index.json may say another
    before_scaling: bool = False  # concatenated before the sampler scales the UNet's input (LDM's pipelines)


@dataclass(frozen=True)
class Family:
    name: str
    specs: Mapping[str, ComponentSpec]  # every component the family can build
    roles: Roles
    tokenizers: tuple[str, ...]  # model sub-folder of each text encoder's tokenizer (roles.text_encoders order)
    pipeline_classes: tuple[str, ...]  # diffusers model_index.json `_class_name`s of this family
    wrappers: Mapping[str, str]  # component -> "module:Class" of its export wrapper (weights: the spec's
    # model_folder); a name, not the class, so that reading a family does not load torch
    model_classes: Mapping[str, tuple[str, str]]  # model sub-folder -> (library, class name) it loads with
    conditioning: TextConditioning  # text encoder outputs -> denoiser conditioning inputs
    request_conditioning: RequestConditioning | None = None  # per-request extra denoiser inputs
    request_fields: tuple[str, ...] = ()  # the family-specific Request fields this family takes
    request_defaults: RequestDefaults | None = None  # fills those fields' defaults (ValueError for bad ones)
    added_dims: AddedDims | None = None  # family-specific Dims fields read from a model folder
    index_flags: Mapping[str, Any] = field(default_factory=dict)  # model_index.json flags the family writes/needs
    single_file_text: Mapping[str, tuple[str, str]] | None = None  # text sub-folder -> (layout, key prefix); None:
    # read off the checkpoint (SD 1.x CLIP or SD 2.x OpenCLIP under cond_stage_model.)
    blend_inpainting: bool = True  # an ordinary denoiser can inpaint by latent blending
    scheduler_config: str = "scheduler/scheduler_config.json"  # in the model folder and the engine dir
    txt2img_components: tuple[str, ...] = TXT2IMG_COMPONENTS  # what txt2img needs
    txt2img: bool = True  # False: img2img only (the SDXL refiner)
    default_strength: tuple[float, float] = (0.8, 1.0)  # (img2img, inpaint) when a request gives none: diffusers'
    upcast_vae: bool = False  # fp16 builds keep the VAE in fp32 when its config says force_upcast (SDXL's overflows)
    # text encoder -> the key of its vectors in a textual-inversion file with one tensor per text encoder (SDXL's
    # clip_l / clip_g: engine/embeddings.py); empty: one tensor, for the family's one text encoder
    embedding_keys: Mapping[str, str] = field(default_factory=dict)
    low_res: LowRes | None = None  # a low-resolution image concatenated to the latents (the x4 upscaler)
    index_classes: Mapping[str, str] = field(default_factory=dict)  # model sub-folder -> the class model_index.json
    # must name for it (the text LDM's vqvae/: AutoencoderKL or VQModel, one family each)
    warmup_fields: Callable[[int, int], dict[str, Any]] | None = None  # (height, width) -> what a warm-up request
    # (the server's) needs besides a prompt: a semantic map
    reseed_step_noise: bool = False  # a sampler's per-step noise (DDIM's eta) from a generator seeded again with
    # the image's seed, not the one its latents came from (diffusers' LDM pipelines draw it from the global RNG)

    @property
    def zero_empty_negative(self) -> bool:
        """diffusers' `force_zeros_for_empty_prompt`: with guidance and no negative prompt, the unconditional
        rows are zeros instead of the encoded ""."""
        return bool(self.index_flags.get("force_zeros_for_empty_prompt", False))

    @property
    def aesthetic(self) -> bool:
        """A model whose time ids end with an aesthetic score (diffusers' `requires_aesthetics_score`)."""
        return bool(self.index_flags.get("requires_aesthetics_score", False))

    def matches(self, index: dict) -> bool:
        """Whether a diffusers model_index.json describes a model of this family."""
        return (index.get("_class_name", "") in self.pipeline_classes
                and bool(index.get("requires_aesthetics_score", False)) == self.aesthetic
                and all((index.get(sub) or [None, None])[1] == cls for sub, cls in self.index_classes.items()))

    def model_folders(self) -> tuple[str, ...]:
        """The sub-folders a diffusers folder of this family must have (weights, tokenizers, scheduler)."""
        subs = [s.model_folder for s in self.specs.values()] + list(self.tokenizers)
        return tuple(dict.fromkeys(subs + [f.split("/")[0] for f in self.runtime_files if "/" in f]))

    @property
    def runtime_files(self) -> tuple[str, ...]:
        """The model folder's files the runtime reads besides tokenizers (copied into the engine dir): the scheduler
        config, and a low-res image's noise schedule and model_index.json (its max_noise_level)."""
        low_res = (self.low_res.scheduler_config, "model_index.json") if self.low_res and self.low_res.scheduler_config else ()
        return (self.scheduler_config, *low_res)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def spec(self, name: str) -> ComponentSpec:
        if name not in self.specs:
            raise ValueError(f"unknown component {name!r} for family {self.name!r}; "
                             f"choose from {', '.join(self.specs)}")
        return self.specs[name]

    def wrapper(self, name: str) -> Callable[[Any], Any]:
        """The export wrapper of a component: a loaded torch sub-model -> the module with the spec's conventions."""
        module, _, cls = self.wrappers[self.spec(name).name].partition(":")
        return getattr(importlib.import_module(module), cls)

    def default_components(self, dims: Dims) -> tuple[str, ...]:
        """What `engine.build` builds by default: txt2img, plus the latent encoder that a 9-channel inpainting
        denoiser or an img2img-only model cannot work without (not the x4 upscaler: its image is not encoded)."""
        needs_encoder = dims.inpainting_unet or (not self.txt2img and self.low_res is None)
        return self.txt2img_components + ((self.roles.latent_encoder,) if needs_encoder else ())

    def can_inpaint(self, dims: Dims) -> bool:
        return dims.inpainting_unet or (self.blend_inpainting and dims.unet_in_channels == dims.latent_channels)

    def denoiser_inputs(self, text: Outputs, rows: Sequence[Any],
                        negative: Sequence[str | None] | None) -> dict[str, Any]:
        """The denoiser's conditioning inputs for one batch: from its text encoders' outputs (with guidance
        [uncond; cond] rows, 2B) and from the batch's rows (one per image: `.request` resolved, `.image`)."""
        import torch

        cond = self.conditioning(text)
        if negative is not None and self.zero_empty_negative:  # no negative prompt = zero unconditional rows
            first = next(iter(cond.values()))
            empty = torch.tensor([n is None for n in negative] + [False] * len(rows), device=first.device)
            cond = {k: torch.where(empty.view(-1, *[1] * (v.dim() - 1)), torch.zeros_like(v), v)
                    for k, v in cond.items()}
        if self.request_conditioning is not None:
            cond.update(self.request_conditioning(rows, negative is not None))
        return cond


def read_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())
