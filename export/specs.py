"""The one registry of components: names, I/O tensors, symbolic shapes, dynamic axes, profiles.

Exporter, optimizer, every backend, the pipeline and the tests read this file; nothing else spells a
component's tensor names or shapes. Shapes are functions of `Dims` (what the model fixes) and the
request: batch (the component's own batch, i.e. 2B for `clip`/`unet` under classifier-free guidance),
image height and width in pixels.

Conventions fixed here:
- `clip` takes int32 token ids and returns the last hidden state.
- `unet` takes one float32 timestep per batch row and returns the model output (epsilon or v).
- `vae_decoder` takes *raw* latents: the scaling factor 1/scaling_factor is inside the graph. It
  returns images in [-1, 1], NCHW.
- `vae_encoder` takes images in [-1, 1] and returns the latent distribution already multiplied by the
  scaling factor: `latent` (mean) and `latent_std` (standard deviation), so the runtime draws
  `latent + latent_std * randn` from a seeded generator exactly as diffusers' img2img/inpaint do.
- `unet` takes `unet_in_channels` input channels: `latent_channels` (4) for ordinary models, 9 for
  inpainting UNets (latents + 1 mask channel + 4 masked-image latent channels, concatenated).
- dtype "model" means the export precision (float16 or float32); other names are fixed.

SDXL (`SDXL_SPECS`, family `sdxl` in export/families/sdxl.py) has two text encoders and added conditioning:
- `clip` (text_encoder, CLIPTextModel) returns the *penultimate* hidden state [B, 77, C1], and
  `clip2` (text_encoder_2, CLIPTextModelWithProjection) returns its penultimate hidden state
  [B, 77, C2] plus the pooled, projected `text_embeds` [B, P]: what diffusers'
  StableDiffusionXLPipeline.encode_prompt takes (`hidden_states[-2]`, no final layer norm).
- `unet` takes `encoder_hidden_states` [2B, 77, C1 + C2] (the two concatenated on the last axis),
  `text_embeds` [2B, P] and `time_ids` [2B, 6] (float32: original size, crop top-left, target size,
  in pixels, as diffusers' `_get_add_time_ids` makes them).
- `vae_decoder` / `vae_encoder` are SD's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from export.errors import RequestError

if TYPE_CHECKING:
    import torch

COMPONENTS = ("clip", "unet", "vae_decoder", "vae_encoder")
TXT2IMG_COMPONENTS = ("clip", "unet", "vae_decoder")
EXPORT_MAX_BATCH = 63  # component batch the ONNX graphs take (diffusers' Upsample2D changes path at 64)
EXPORT_MAX_UNITS = 1024  # height and width the ONNX graphs take, in units of Dims.size_multiple
VAE_SCALE = 8  # pixels per latent of every Stable Diffusion VAE (the default of Dims.vae_scale)
TEXT = "text"  # the denoiser's text-token axis: dims.text_len tokens per prompt chunk (engine/prompts.py)
MAX_CHUNKS = 4  # prompt chunks the exported denoiser graphs take: 4 x 77 text tokens
CUSTOM_TOKEN = -1  # a text encoder's input id whose vector is its `token_embeds` row (textual inversion)


@dataclass(frozen=True)
class Dims:
    """What a model fixes about tensor shapes (read from its configs or its preset)."""

    latent_channels: int = 4  # VAE latent channels: what the sampler and the VAE see
    unet_in_channels: int = 4  # UNet input channels: latent_channels, or 2 * latent_channels + 1 (inpainting)
    text_dim: int = 768
    text_len: int = 77
    vae_scale: int = VAE_SCALE  # pixels per latent
    unet_scale: int = 8  # latent size must be a multiple of this (2 ** UNet down-samplers)
    # SDXL only (0 for SD 1/2): text_dim is then the concatenated width of both text encoders
    text2_dim: int = 0  # hidden width of the second text encoder (clip2); the first's is text_dim - text2_dim
    pooled_dim: int = 0  # clip2's pooled, projected `text_embeds` width (the UNet's added text conditioning)
    time_ids: int = 0  # the UNet's added size conditioning: 6 (original size, crop top-left, target size)
    # the UNet's skip residuals, down path then mid (what a ControlNet adds to: export/control.py)
    residual_channels: tuple[int, ...] = ()
    residual_scales: tuple[int, ...] = ()  # each one's downscale from the latent size
    # the IP-Adapter's image encoder (export/ip_adapter.py; 0 when built without one)
    ip_image_size: int = 0  # its input images are S x S
    ip_embed_dim: int = 0  # the width of its projected image embeddings
    text_layers: int = 0  # the first text encoder's layers (SD 1.x / 2.x clip's `text_layers` output: clip skip)
    vae_sample_size: int = 512  # the VAE's sample_size: its tile in tiled decoding (engine/tiling.py), as diffusers'
    n_classes: int = 0  # a class-conditional model's class table rows, the last the unconditional class (0: none)
    labels: tuple[str, ...] = ()  # a layout model's object labels (class id = index), read from its folder
    text_vocab: int = 49408  # the first text encoder's vocabulary (CLIP's; LDMBert's BERT one): example token ids

    def __post_init__(self):  # build.json stores tuples as lists
        for name in ("residual_channels", "residual_scales", "labels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def inpainting_unet(self) -> bool:
        """A 9-channel inpainting UNet: latents + mask + masked-image latents, concatenated."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels."""
        return self.vae_scale * self.unet_scale


@dataclass(frozen=True)
class Shape:
    """One request: image batch and pixel size, and its prompts' chunks of 77 text tokens (engine/prompts.py)."""

    batch: int
    height: int
    width: int
    chunks: int = 1


ShapeFn = Callable[[Dims, int, int, int], tuple[int, ...]]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "model" | "float32" | "int32"
    shape: ShapeFn  # (dims, batch, height_px, width_px) -> shape
    dynamic_axes: dict[int, str]  # axis -> symbol: "batch", "height", "width" (pixels or latent)

    def sized(self, dims: Dims, batch: int, height: int, width: int, chunks: int = 1) -> tuple[int, ...]:
        """The shape for this batch and size; a TEXT axis holds `chunks` prompt chunks of dims.text_len tokens."""
        shape = list(self.shape(dims, batch, height, width))
        for axis, sym in self.dynamic_axes.items():
            if sym == TEXT:
                shape[axis] = dims.text_len * chunks
        return tuple(shape)

    def numpy_dtype(self, precision: str) -> np.dtype:
        name = precision_dtype(precision) if self.dtype == "model" else self.dtype
        return np.dtype(name)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_factor: int  # component batch per image under classifier-free guidance
    model_folder: str  # diffusers sub-folder holding the weights
    description: str
    per_step: bool = False  # runs at every denoise step (the denoiser): worth compiling and its own CUDA graphs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input_shapes(self, dims: Dims, batch: int, height: int, width: int,
                     chunks: int = 1) -> dict[str, tuple[int, ...]]:
        return {t.name: t.sized(dims, batch, height, width, chunks) for t in self.inputs}

    def output_shapes(self, dims: Dims, batch: int, height: int, width: int,
                      chunks: int = 1) -> dict[str, tuple[int, ...]]:
        return {t.name: t.sized(dims, batch, height, width, chunks) for t in self.outputs}

    def profile(self, dims: Dims, lo: Shape, opt: Shape, hi: Shape) -> dict[str, tuple[tuple[int, ...], ...]]:
        """min/opt/max shape per input, for image-level shapes lo <= opt <= hi.

        Components run under CFG get batch from lo.batch (guidance off) to hi.batch * batch_factor."""
        b_lo, b_opt, b_hi = lo.batch, opt.batch * self.batch_factor, hi.batch * self.batch_factor
        return {
            t.name: (
                t.sized(dims, b_lo, lo.height, lo.width, lo.chunks),
                t.sized(dims, b_opt, opt.height, opt.width, opt.chunks),
                t.sized(dims, b_hi, hi.height, hi.width, hi.chunks),
            )
            for t in self.inputs
        }


def precision_dtype(precision: str) -> str:
    """The numpy / ONNX dtype name of a precision: "float16" for "fp16", "float32" for "fp32"."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
    return "float16" if precision == "fp16" else "float32"


TORCH_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # build precision -> torch dtype


def precision_torch_dtype(precision: str) -> torch.dtype:
    """torch.float32 / float16 / bfloat16 for "fp32" / "fp16" / "bf16" (ValueError for anything else): the one
    place a build precision becomes a torch dtype. torch is imported here, not at module top (specs stay
    torch-free)."""
    import torch

    if precision not in TORCH_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}")
    return getattr(torch, TORCH_PRECISIONS[precision])


def _latent(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.latent_channels, h // d.vae_scale, w // d.vae_scale)  # [B, 4, H/8, W/8]


def _unet_sample(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.unet_in_channels, h // d.vae_scale, w // d.vae_scale)  # [2B, 4 or 9, H/8, W/8]


def _image(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, 3, h, w)  # [B, 3, H, W]


def _tokens(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.text_len)  # [B, 77]


def _text(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.text_len, d.text_dim)  # [B, 77, C]


def _text1(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.text_len, d.text_dim - d.text2_dim)  # SDXL clip: [B, 77, C1]


def _text2(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.text_len, d.text2_dim)  # SDXL clip2: [B, 77, C2]


def _pooled(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.pooled_dim)  # SDXL clip2 pooled projection: [B, P]


def _text_layers(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.text_layers, d.text_len, d.text_dim)  # every layer's output through the final norm: [B, L, 77, C]


def _time_ids(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.time_ids)  # SDXL size conditioning: [2B, 6]


def _per_row(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b,)  # [B]


_BATCH = {0: "batch"}
_SPATIAL = {0: "batch", 2: "height", 3: "width"}

SPECS: dict[str, ComponentSpec] = {
    "clip": ComponentSpec(
        name="clip",
        inputs=(TensorSpec("input_ids", "int32", _tokens, _BATCH),
                TensorSpec("token_embeds", "model", _text, _BATCH)),  # rows of negative ids (textual inversion)
        outputs=(TensorSpec("text_embeddings", "model", _text, _BATCH),
                 TensorSpec("text_layers", "model", _text_layers, _BATCH)),
        batch_factor=2,
        model_folder="text_encoder",
        description="CLIP text encoder: token ids [B, 77] (a negative id takes its vector from token_embeds [B, 77, C]: "
                    "textual inversion) -> last hidden state [B, 77, C] and every layer's output through the final "
                    "layer norm [B, L, 77, C] (A1111's clip skip picks one)",
    ),
    "unet": ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", "model", _unet_sample, _SPATIAL),
            TensorSpec("timestep", "float32", _per_row, _BATCH),
            TensorSpec("encoder_hidden_states", "model", _text, {0: "batch", 1: TEXT}),  # 77 tokens per chunk
        ),
        outputs=(TensorSpec("latent", "model", _latent, _SPATIAL),),
        batch_factor=2,
        model_folder="unet",
        description="UNet denoiser: latents [2B, 4|9, H/8, W/8], timesteps [2B], text [2B, 77, C] -> eps or v",
        per_step=True,
    ),
    "vae_decoder": ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "model", _latent, _SPATIAL),),
        outputs=(TensorSpec("images", "model", _image, _SPATIAL),),
        batch_factor=1,
        model_folder="vae",
        description="VAE decoder: raw latents [B, 4, H/8, W/8] (scaling inside) -> images [B, 3, H, W] in [-1, 1]",
    ),
    "vae_encoder": ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("images", "model", _image, _SPATIAL),),
        outputs=(
            TensorSpec("latent", "model", _latent, _SPATIAL),
            TensorSpec("latent_std", "model", _latent, _SPATIAL),
        ),
        batch_factor=1,
        model_folder="vae",
        description="VAE encoder: images [B, 3, H, W] in [-1, 1] -> scaled latent mean and std [B, 4, H/8, W/8]",
    ),
}


SDXL_COMPONENTS = ("clip", "clip2", "unet", "vae_decoder", "vae_encoder")
SDXL_TXT2IMG_COMPONENTS = ("clip", "clip2", "unet", "vae_decoder")

_SD_CLIP, _SD_UNET = SPECS["clip"], SPECS["unet"]
SDXL_SPECS: dict[str, ComponentSpec] = {  # SD's specs, with SDXL's outputs and added UNet inputs
    "clip": replace(
        _SD_CLIP,
        inputs=(_SD_CLIP.inputs[0], TensorSpec("token_embeds", "model", _text1, _BATCH)),
        outputs=(TensorSpec("text_embeddings", "model", _text1, _BATCH),),
        description="SDXL CLIP text encoder: token ids [B, 77] -> penultimate hidden state [B, 77, C1]",
    ),
    "clip2": replace(
        _SD_CLIP,
        name="clip2",
        inputs=(_SD_CLIP.inputs[0], TensorSpec("token_embeds", "model", _text2, _BATCH)),
        outputs=(
            TensorSpec("text_embeddings", "model", _text2, _BATCH),
            TensorSpec("text_embeds", "model", _pooled, _BATCH),
        ),
        model_folder="text_encoder_2",
        description="SDXL second text encoder (with projection): token ids [B, 77] -> penultimate hidden state "
                    "[B, 77, C2] and pooled projected text_embeds [B, P]",
    ),
    "unet": replace(
        _SD_UNET,
        inputs=_SD_UNET.inputs + (
            TensorSpec("text_embeds", "model", _pooled, _BATCH),
            TensorSpec("time_ids", "float32", _time_ids, _BATCH),
        ),
        description="SDXL UNet: latents [2B, 4|9, H/8, W/8], timesteps [2B], text [2B, 77, C1+C2], "
                    "pooled text_embeds [2B, P], time_ids [2B, 6] -> eps or v",
    ),
    "vae_decoder": SPECS["vae_decoder"],
    "vae_encoder": SPECS["vae_encoder"],
}

UPSCALE_SPECS: dict[str, ComponentSpec] = {  # the x4 upscaler (export/families/upscale.py)
    "clip": _SD_CLIP,
    "unet": replace(
        _SD_UNET,
        inputs=_SD_UNET.inputs + (TensorSpec("class_labels", "int32", _per_row, _BATCH),),
        description="x4 upscaler UNet: latents + noised low-res image [2B, 4+3, H/4, W/4], timesteps [2B], text "
                    "[2B, 77, C], noise level [2B] (the class label) -> eps or v",
    ),
    "vae_decoder": SPECS["vae_decoder"],
    "vae_encoder": SPECS["vae_encoder"],  # built when asked for; a request's image is not encoded
}

LDM_SPECS: dict[str, ComponentSpec] = {  # the Latent Diffusion paper's own models (export/families/ldm.py)
    "unet": ComponentSpec(
        name="unet",
        inputs=(TensorSpec("sample", "model", _unet_sample, _SPATIAL), TensorSpec("timestep", "float32", _per_row, _BATCH)),
        outputs=(TensorSpec("latent", "model", _latent, _SPATIAL),),
        batch_factor=1,  # no classifier-free guidance
        model_folder="unet",
        description="LDM UNet2DModel: latents (+ a concatenated condition) [B, C, H/f, W/f], timesteps [B] -> eps",
        per_step=True,
    ),
    "vae_decoder": replace(SPECS["vae_decoder"], model_folder="vqvae",
                           description="VQ decoder: latents [B, C, H/f, W/f] -> nearest codebook entries (argmin of "
                                       "|z|^2 + |e|^2 - 2 z.e) -> images [B, 3, H, W] in [-1, 1]"),
    "vae_encoder": replace(SPECS["vae_encoder"], model_folder="vqvae",
                           description="VQ encoder: images [B, 3, H, W] in [-1, 1] -> latents (before quantisation, "
                                       "as VQModel.encode) and a zero std [B, C, H/f, W/f]"),
}

def _class_ids(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b,)  # [2B] int32 class ids, the unconditional class's rows first under guidance


def _class_context(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.text_len, d.text_dim)  # [2B, 1, D]: one context token per row


LDM_CLASS_SPECS: dict[str, ComponentSpec] = {  # the paper's class-conditional LDM (export/families/ldm_class.py)
    "class_embedder": ComponentSpec(
        name="class_embedder",
        inputs=(TensorSpec("class_ids", "int32", _class_ids, _BATCH),),
        outputs=(TensorSpec("encoder_hidden_states", "model", _class_context, _BATCH),),
        batch_factor=2,
        model_folder="class_embedder",
        description="class embedding table: class ids [2B] -> the UNet's cross-attention context [2B, 1, D]",
    ),
    "unet": replace(
        _SD_UNET,
        inputs=(*_SD_UNET.inputs[:2], TensorSpec("encoder_hidden_states", "model", _class_context, _BATCH)),
        description="class-conditional LDM UNet: latents [2B, C, H/f, W/f], timesteps [2B], class context "
                    "[2B, 1, D] -> eps",
    ),
    "vae_decoder": LDM_SPECS["vae_decoder"],
    "vae_encoder": LDM_SPECS["vae_encoder"],
}
LDM_TEXT_SPECS: dict[str, ComponentSpec] = {  # the paper's text-to-image LDM (export/families/ldm_text.py)
    "bert": replace(
        _SD_CLIP,
        name="bert",
        outputs=(TensorSpec("text_embeddings", "model", _text, _BATCH),),
        model_folder="bert",
        description="LDMBert text encoder: token ids [B, 77] (a negative id takes its vector from token_embeds) -> "
                    "last hidden state [B, 77, C]",
    ),
    "unet": _SD_UNET,
    "vae_decoder": replace(SPECS["vae_decoder"], model_folder="vqvae"),  # a KL (or VQ) autoencoder in vqvae/
    "vae_encoder": replace(SPECS["vae_encoder"], model_folder="vqvae"),
}


def _labels(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, 1, h, w)  # [B, 1, H, W] int32 class ids per pixel


def _map_condition(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.unet_in_channels - d.latent_channels, h // d.vae_scale, w // d.vae_scale)  # [B, 3, H/f, W/f]


LDM_SEMANTIC_SPECS: dict[str, ComponentSpec] = {  # the paper's semantic synthesis (export/families/ldm_semantic.py)
    "semantic_encoder": ComponentSpec(
        name="semantic_encoder",
        inputs=(TensorSpec("labels", "int32", _labels, _SPATIAL),),
        outputs=(TensorSpec("concat_scaled", "model", _map_condition, _SPATIAL),),
        batch_factor=1,
        model_folder="semantic_encoder",
        description="spatial rescaler: label map [B, 1, H, W] -> its 1x1 mapping, resized to the latents [B, 3, H/f, "
                    "W/f], concatenated to them",
    ),
    **LDM_SPECS,
}


def _layout_tokens(d: Dims, b: int, h: int, w: int) -> tuple[int, ...]:
    return (b, d.text_len)  # [B, 92] layout tokens


LDM_LAYOUT_SPECS: dict[str, ComponentSpec] = {  # the paper's layout-to-image model (export/families/ldm_layout.py)
    "layout_encoder": ComponentSpec(
        name="layout_encoder",
        inputs=(TensorSpec("layout_tokens", "int32", _layout_tokens, _BATCH),),
        outputs=(TensorSpec("encoder_hidden_states", "model", _class_context, _BATCH),),
        batch_factor=1,
        model_folder="layout_encoder",
        description="layout transformer (LDMBert without a tokenizer): tokens [B, 92] (label, top-left, bottom-right "
                    "per object; crop) -> the UNet's cross-attention context [B, 92, D]",
    ),
    "unet": replace(LDM_CLASS_SPECS["unet"], batch_factor=1,
                    description="layout-to-image LDM UNet: latents [B, C, H/f, W/f], timesteps [B], layout context "
                                "[B, 92, D] -> eps"),
    "vae_decoder": LDM_SPECS["vae_decoder"],
    "vae_encoder": LDM_SPECS["vae_encoder"],
}
ALL_COMPONENTS = tuple(dict.fromkeys((*SPECS, *SDXL_SPECS, *LDM_CLASS_SPECS, *LDM_TEXT_SPECS, *LDM_SEMANTIC_SPECS,
                                      *LDM_LAYOUT_SPECS)))  # every component name of every family


def get_spec(name: str) -> ComponentSpec:
    if name not in SPECS:
        raise ValueError(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
    return SPECS[name]


def parse_components(text: str) -> tuple[str, ...]:
    """Component names from "a,b,c"; ValueError for a name no family has (the family checks the rest)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        if n not in ALL_COMPONENTS:
            raise ValueError(f"unknown component {n!r}; choose from {', '.join(ALL_COMPONENTS)}")
    return names


def export_range(dims: Dims) -> tuple[Shape, Shape]:
    """The image shapes every exported graph accepts: batch up to EXPORT_MAX_BATCH // 2 images (their
    UNet batch doubles under classifier-free guidance), any multiple of the size granularity."""
    m = dims.size_multiple
    return Shape(1, m, m), Shape(EXPORT_MAX_BATCH // 2, m * EXPORT_MAX_UNITS, m * EXPORT_MAX_UNITS, MAX_CHUNKS)


def check_size(dims: Dims, height: int, width: int, lo: Shape | None = None, hi: Shape | None = None) -> None:
    """RequestError (a ValueError) naming the field, the value and the allowed range if a pixel size is not
    usable."""
    m = dims.size_multiple
    for what, v in (("height", height), ("width", width)):
        if v <= 0 or v % m:
            raise RequestError(what, f"{what} {v} must be a positive multiple of {m} for this model")
        if lo is not None and hi is not None:
            a, b = getattr(lo, what), getattr(hi, what)
            if not a <= v <= b:
                raise RequestError(what, f"{what} {v} is outside the built profile [{a}, {b}]; rebuild with "
                                         f"--{what} {v} or --build-dynamic-shape")
