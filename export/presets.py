"""Model presets: the architecture of each supported model family, as dataclasses.

A preset never holds weights. `tiny` is materialised from a fixed seed as random weights (seconds on a
CPU); `sd15` / `sd21` describe the real architectures, so a random full-size model can be built for
export and benchmark work, and so a single-file checkpoint can be converted with local configs.
`tiny-inpaint` / `sd15-inpaint` are the same architectures with a 9-channel inpainting UNet (latents +
mask + masked-image latents); they materialise as diffusers StableDiffusionInpaintPipeline folders.

`tiny-xl` / `sdxl` (`XLPreset`, family `sdxl`) add SDXL's second text encoder (CLIPTextModelWithProjection)
and the UNet's added "text_time" conditioning; they materialise as StableDiffusionXLPipeline folders.
`tiny-xl-refiner` (`refiner=True`, family `sdxl-refiner`) is SDXL's refiner on tiny-xl's scale: clip2 only,
5 time ids (aesthetic score instead of target size); it materialises as a StableDiffusionXLImg2ImgPipeline
folder with `requires_aesthetics_score`; `sdxl-refiner` is the real refiner's architecture. `tiny-xl-inpaint` /
`sdxl-inpaint` have a 9-channel inpainting UNet (StableDiffusionXLInpaintPipeline folders).
`tiny-upscaler` / `sd-x4-upscaler` (`UpscalePreset`, family `sd-upscaler`) are SD's x4 upscaler on tiny's scale and
its real architecture; they materialise as StableDiffusionUpscalePipeline folders (with `low_res_scheduler/`).
`PRESETS` holds the SD presets, `SDXL_PRESETS` the SDXL ones (base and refiner); single-file detection
tries both (`export.single_file.CANDIDATES`); `ALL_PRESETS` / `get_preset` every preset a model name can be.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from export.families import get_family
from export.families.sdxl import BASE_TIME_IDS, REFINER_TIME_IDS
from export.ldm_presets import LDM_PRESETS, LdmPreset
from export.preset_parts import SchedulerDefaults, UNetArch

__all__ = ["ALL_PRESETS", "LDM_PRESETS", "PRESETS", "SDXL_PRESETS", "UPSCALE_PRESETS", "LdmPreset", "Preset",
           "SchedulerDefaults", "UNetArch", "XLPreset", "UpscalePreset", "get_preset"]


@dataclass(frozen=True)
class VaeArch:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32

    def config(self, latent_channels: int, scaling_factor: float, sample_size: int) -> dict:
        n = len(self.block_out_channels)
        return dict(
            asdict(self),
            in_channels=3,
            out_channels=3,
            latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            scaling_factor=scaling_factor,
            sample_size=sample_size,
        )


@dataclass(frozen=True)
class ClipArch:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    vocab_size: int = 49408  # the real CLIP BPE vocabulary (export/data)
    max_position_embeddings: int = 77

    def config(self) -> dict:
        # bos/eos are the real CLIP ids, so pooled outputs pick the eos token like the reference.
        return dict(asdict(self), bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


@dataclass(frozen=True)
class Preset:
    name: str
    unet: UNetArch = field(default_factory=UNetArch)
    vae: VaeArch = field(default_factory=VaeArch)
    clip: ClipArch = field(default_factory=ClipArch)
    scheduler: SchedulerDefaults = field(default_factory=SchedulerDefaults)
    latent_channels: int = 4
    unet_in_channels: int = 4  # latent_channels; 2 * latent_channels + 1 for an inpainting UNet
    scaling_factor: float = 0.18215
    prediction_type: str = "epsilon"  # or "v_prediction"
    default_size: int = 512  # pixels, square
    min_size: int = 256  # dynamic-shape profile range, pixels
    max_size: int = 1024
    seed: int = 0  # random weights of a materialised preset

    @property
    def family(self) -> str:
        """The model family (export/families/) of a materialised folder."""
        return "sd"

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting UNet: latents + 1 mask channel + masked-image latents."""
        return self.unet_in_channels == 2 * self.latent_channels + 1

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline class a materialised or converted folder names in model_index.json."""
        return "StableDiffusionInpaintPipeline" if self.inpainting else "StableDiffusionPipeline"

    def unet_config(self) -> dict:
        """diffusers UNet2DConditionModel kwargs for this preset."""
        return self.unet.config(self.latent_channels, self.latent_size, self.unet_in_channels)

    def vae_config(self) -> dict:
        """diffusers AutoencoderKL kwargs for this preset."""
        return self.vae.config(self.latent_channels, self.scaling_factor, self.default_size)

    def low_res(self) -> tuple[dict, int] | None:
        """The x4 upscaler's low_res_scheduler config and max_noise_level (None for other models)."""
        return None

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along one axis: 2 ** (number of VAE down blocks - 1)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def text_dim(self) -> int:
        return self.clip.hidden_size

    @property
    def text_len(self) -> int:
        return self.clip.max_position_embeddings

    @property
    def latent_size(self) -> int:
        return self.default_size // self.vae_scale


SD15 = Preset(name="sd15")

SD21 = Preset(
    name="sd21",
    unet=UNetArch(
        attention_head_dim=(5, 10, 20, 20),  # head dim 64 everywhere
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    clip=ClipArch(
        hidden_size=1024,
        num_hidden_layers=23,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu",
        projection_dim=512,
    ),
    prediction_type="v_prediction",
    default_size=768,
    min_size=256,
    max_size=1024,
)

TINY = Preset(
    name="tiny",
    unet=UNetArch(
        block_out_channels=(64, 128),
        layers_per_block=1,
        attention_head_dim=(1, 2),  # head counts: head dim 64 everywhere, a size our kernel serves
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=32,
    ),
    vae=VaeArch(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    clip=ClipArch(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, projection_dim=32
    ),
    default_size=128,
    min_size=64,
    max_size=512,
)

TINY_INPAINT = replace(TINY, name="tiny-inpaint", unet_in_channels=9, seed=3)

SD15_INPAINT = replace(SD15, name="sd15-inpaint", unet_in_channels=9, seed=3)

@dataclass(frozen=True)
class XLUNetArch(UNetArch):
    """SDXL's UNet: SD's arguments plus per-block transformer depth and the added "text_time" embedding."""

    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    attention_head_dim: int | tuple[int, ...] = (5, 10, 20)  # head counts: head dim 64 everywhere
    cross_attention_dim: int = 2048
    use_linear_projection: bool = True
    transformer_layers_per_block: int | tuple[int, ...] = (1, 2, 10)
    addition_embed_type: str = "text_time"
    addition_time_embed_dim: int = 256  # sinusoidal width per time id


@dataclass(frozen=True)
class XLPreset(Preset):
    """An SDXL architecture: two text encoders (hidden states concatenated), pooled text and size conditioning."""

    unet: UNetArch = field(default_factory=XLUNetArch)
    clip2: ClipArch = field(default_factory=lambda: ClipArch(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120, hidden_act="gelu",
        projection_dim=1280))
    refiner: bool = False  # the img2img-only refiner (family sdxl-refiner): clip2 only, aesthetic-score time ids
    scaling_factor: float = 0.13025
    default_size: int = 1024
    min_size: int = 512
    max_size: int = 1536

    @property
    def family(self) -> str:
        return "sdxl-refiner" if self.refiner else "sdxl"

    @property
    def pipeline_class(self) -> str:
        """StableDiffusionXLPipeline, or the family's first class (the refiner's img2img pipeline)."""
        return "StableDiffusionXLInpaintPipeline" if self.inpainting else get_family(self.family).pipeline_classes[0]

    @property
    def text_encoders(self) -> dict[str, ClipArch]:
        """The family's text encoders (component name -> architecture), in order."""
        archs = {"clip": self.clip, "clip2": self.clip2}
        return {name: archs[name] for name in get_family(self.family).roles.text_encoders}

    @property
    def time_ids(self) -> int:
        """Time ids of the UNet's added conditioning: 6 (original size, crop, target size), refiner 5."""
        return REFINER_TIME_IDS if self.refiner else BASE_TIME_IDS

    @property
    def text_dim(self) -> int:
        """The UNet's cross-attention width: the text encoders' hidden states, concatenated."""
        return sum(arch.hidden_size for arch in self.text_encoders.values())

    @property
    def pooled_dim(self) -> int:
        return self.clip2.projection_dim

    def unet_config(self) -> dict:
        assert isinstance(self.unet, XLUNetArch), "an XLPreset needs an XLUNetArch"
        c = super().unet_config()
        c["projection_class_embeddings_input_dim"] = self.time_ids * self.unet.addition_time_embed_dim + self.pooled_dim
        c["cross_attention_dim"] = self.text_dim
        return c


SDXL = XLPreset(name="sdxl")  # SDXL 1.0 base: random weights, the real architecture

TINY_XL = XLPreset(
    name="tiny-xl",
    unet=XLUNetArch(  # the shape of diffusers' own tiny SDXL test UNet, head dim 64 like `tiny`
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(1, 1),
        cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        addition_time_embed_dim=8,
        norm_num_groups=32,
    ),
    vae=TINY.vae,
    clip=TINY.clip,
    clip2=ClipArch(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   hidden_act="gelu", projection_dim=32),
    default_size=128,
    min_size=64,
    max_size=512,
    seed=5,
)

# SDXL's refiner architecture on tiny-xl's scale: no first text encoder, so cross-attention is clip2's width
TINY_XL_REFINER = replace(TINY_XL, name="tiny-xl-refiner", refiner=True, seed=7)

# the same architectures with a 9-channel inpainting UNet (diffusers' stable-diffusion-xl-1.0-inpainting-0.1)
TINY_XL_INPAINT = replace(TINY_XL, name="tiny-xl-inpaint", unet_in_channels=9, seed=9)
SDXL_INPAINT = replace(SDXL, name="sdxl-inpaint", unet_in_channels=9, seed=3)

# SDXL 1.0's refiner: random weights, the real architecture (a wider 4-level UNet, 4 transformer layers per
# attention block, clip2's 1280-wide text only, 5 time ids of 256 each)
SDXL_REFINER = XLPreset(
    name="sdxl-refiner",
    refiner=True,
    unet=XLUNetArch(
        block_out_channels=(384, 768, 1536, 1536),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(6, 12, 24, 24),  # head counts: head dim 64 everywhere
        transformer_layers_per_block=4,
        cross_attention_dim=1280,
    ),
)

@dataclass(frozen=True)
class UpscaleUNetArch(UNetArch):
    """The x4 upscaler's UNet: SD's arguments plus the noise level's class embedding and blocks whose first
    attention attends to the text only (diffusers' `only_cross_attention`, LDM's `disable_self_attentions`)."""

    num_class_embeds: int = 1000
    only_cross_attention: bool | tuple[bool, ...] = False


@dataclass(frozen=True)
class UpscalePreset(Preset):
    """The x4 upscaler (family `sd-upscaler`): a 7-channel UNet (latents + the noised low-resolution image), a
    3-block VAE (4 pixels per latent), SD 2.x's text encoder; a DDPM schedule noises the low-resolution image."""

    unet_in_channels: int = 7  # 4 latent channels + RGB
    scaling_factor: float = 0.08333
    scheduler: SchedulerDefaults = field(default_factory=lambda: SchedulerDefaults(beta_start=0.0001, beta_end=0.02))
    prediction_type: str = "v_prediction"
    max_noise_level: int = 350

    @property
    def family(self) -> str:
        return "sd-upscaler"

    @property
    def pipeline_class(self) -> str:
        return "StableDiffusionUpscalePipeline"

    def low_res(self) -> tuple[dict, int]:
        """The released model's low_res_scheduler (DDPM on the same betas) and max_noise_level."""
        config = dict(_class_name="DDPMScheduler", beta_start=self.scheduler.beta_start,
                      beta_end=self.scheduler.beta_end, beta_schedule=self.scheduler.beta_schedule,
                      num_train_timesteps=self.scheduler.num_train_timesteps, clip_sample=True,
                      variance_type="fixed_small")
        return config, self.max_noise_level


# stabilityai/stable-diffusion-x4-upscaler: random weights, the real architecture (output sizes: 4x the input)
SD_X4_UPSCALER = UpscalePreset(
    name="sd-x4-upscaler",
    unet=UpscaleUNetArch(
        block_out_channels=(256, 512, 512, 1024),
        attention_head_dim=8,  # head counts (LDM's num_heads: 8)
        cross_attention_dim=1024,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        use_linear_projection=True,
        only_cross_attention=(True, True, True, False),
    ),
    vae=VaeArch(block_out_channels=(128, 256, 512)),
    clip=SD21.clip,
    default_size=512,  # a 128² image in
    min_size=128,
    max_size=2048,
)

TINY_UPSCALER = UpscalePreset(
    name="tiny-upscaler",
    unet=UpscaleUNetArch(
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(1, 1),  # head counts: head dim 64 in the one attention block
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        only_cross_attention=(False, True),
    ),
    vae=VaeArch(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8),
    clip=TINY.clip,
    default_size=128,  # a 32² image in
    min_size=32,
    max_size=512,
    seed=11,
)

# Order matters only for single-file detection, which takes the first preset a checkpoint fills exactly
# (the in_channels of conv_in tells an inpainting UNet apart, so at most one preset matches).
PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, SD15, SD21, TINY_INPAINT, SD15_INPAINT)}
SDXL_PRESETS: dict[str, XLPreset] = {p.name: p for p in (TINY_XL, SDXL, TINY_XL_REFINER, TINY_XL_INPAINT, SDXL_INPAINT,
                                                        SDXL_REFINER)}
UPSCALE_PRESETS: dict[str, UpscalePreset] = {p.name: p for p in (TINY_UPSCALER, SD_X4_UPSCALER)}


ALL_PRESETS: dict[str, Preset | LdmPreset] = {**PRESETS, **SDXL_PRESETS, **UPSCALE_PRESETS, **LDM_PRESETS}


def get_preset(name: str) -> Preset | LdmPreset:
    if name not in ALL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(ALL_PRESETS)} or a model path")
    return ALL_PRESETS[name]
