"""Presets of the Latent Diffusion paper's own models (export/families/ldm.py, ldm_class.py), seeded random weights:
`tiny-ldm-sr` (LDMSuperResolutionPipeline: the low-resolution image concatenated, VQ-f4), `tiny-ldm-uncond`
(LDMPipeline: unconditional), `tiny-ldm-text` (LDMTextToImagePipeline: LDMBert, KL-f8), `tiny-ldm-cin` (the class-conditional ImageNet model's shape: a class table as the
UNet's cross-attention context; our LDMClassConditionalPipeline folder)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from export.preset_parts import SchedulerDefaults, UNetArch


@dataclass(frozen=True)
class UNet2DArch:
    """diffusers' UNet2DModel (the LDM paper's denoiser without cross-attention)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D")
    attention_head_dim: int = 8
    norm_num_groups: int = 32


@dataclass(frozen=True)
class VQArch:
    """diffusers' VQModel: a VQ-regularised autoencoder (f = 2 ** (blocks - 1) pixels per latent)."""

    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    latent_channels: int = 3
    num_vq_embeddings: int = 64
    norm_num_groups: int = 8

    def config(self, sample_size: int) -> dict:
        n = len(self.block_out_channels)
        return dict(asdict(self), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                    up_block_types=("UpDecoderBlock2D",) * n, sample_size=sample_size)


@dataclass(frozen=True)
class LdmPreset:
    """A Latent Diffusion paper model (export/families/ldm.py) with seeded random weights: `sr` is
    LDMSuperResolutionPipeline's (the low-resolution image concatenated to the latents: UNet in 2C, out C)."""

    name: str
    unet: UNet2DArch = field(default_factory=UNet2DArch)
    vq: VQArch = field(default_factory=VQArch)
    scheduler: SchedulerDefaults = field(default_factory=lambda: SchedulerDefaults(
        beta_start=0.0015, beta_end=0.0155, steps_offset=0))  # the paper's linear schedule (diffusers' scaled_linear)
    prediction_type: str = "epsilon"
    default_size: int = 128  # pixels out
    min_size: int = 32
    max_size: int = 512
    seed: int = 13
    codebook_std: float = 1.0  # the codebook's entries ~ N(0, std^2) (see `vqvae`)
    family: str = "ldm-sr"
    pipeline_class: str = "LDMSuperResolutionPipeline"

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vq.block_out_channels) - 1)

    def vqvae(self):
        import torch
        from diffusers import VQModel

        torch.manual_seed(self.seed + 1)
        vq = VQModel(**self.vq.config(self.default_size))
        # diffusers initialises the codebook in +-1/K: every entry near 0, so the nearest one to a latent of norm ~1 is
        # decided by rounding noise. A trained codebook spreads over the latents: unit normal entries, like them.
        with torch.no_grad():
            vq.quantize.embedding.weight.normal_(0.0, self.codebook_std)
        return vq

    def save_parts(self, folder: Path, parts: dict) -> None:
        """A folder diffusers has no pipeline for, in its shape: each part's config and safetensors in its sub-folder,
        the DDIM scheduler, and model_index.json naming this preset's pipeline class and each part's class."""
        import diffusers
        from diffusers import DDIMScheduler

        for sub, module in parts.items():
            module.eval().save_pretrained(folder / sub, safe_serialization=True)
        DDIMScheduler.from_config(self.scheduler.config(self.prediction_type)).save_pretrained(folder / "scheduler")
        index = {"_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__,
                 **{sub: ["diffusers" if hasattr(diffusers, type(m).__name__) else type(m).__module__,
                          type(m).__name__] for sub, m in parts.items()},
                 "scheduler": ["diffusers", "DDIMScheduler"]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def save_folder(self, folder: Path) -> None:
        import torch
        from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel

        c = self.vq.latent_channels
        torch.manual_seed(self.seed)
        unet = UNet2DModel(**asdict(self.unet), in_channels=2 * c, out_channels=c,
                           sample_size=self.default_size // self.vae_scale)
        vqvae = self.vqvae()
        scheduler = DDIMScheduler.from_config(self.scheduler.config(self.prediction_type))
        LDMSuperResolutionPipeline(vqvae=vqvae.eval(), unet=unet.eval(), scheduler=scheduler).save_pretrained(
            folder, safe_serialization=True)


@dataclass(frozen=True)
class LdmUncondPreset(LdmPreset):
    """LDMPipeline's model: a UNet2DModel on the latents alone (in C, out C)."""

    default_size: int = 64

    family: str = "ldm-uncond"
    pipeline_class: str = "LDMPipeline"

    def save_folder(self, folder: Path) -> None:
        import torch
        from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel

        c = self.vq.latent_channels
        torch.manual_seed(self.seed)
        unet = UNet2DModel(**asdict(self.unet), in_channels=c, out_channels=c,
                           sample_size=self.default_size // self.vae_scale)
        scheduler = DDIMScheduler.from_config(self.scheduler.config(self.prediction_type))
        LDMPipeline(vqvae=self.vqvae().eval(), unet=unet.eval(), scheduler=scheduler).save_pretrained(
            folder, safe_serialization=True)


@dataclass(frozen=True)
class LdmClassPreset(LdmPreset):
    """The class-conditional model: `n_classes` table rows (the last unconditional) of `cond_unet`'s
    cross_attention_dim, a UNet2DConditionModel, a VQ autoencoder."""

    cond_unet: UNetArch = field(default_factory=lambda: UNetArch(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")))
    n_classes: int = 11  # 10 classes and the unconditional one (the ImageNet model: 1001)
    default_size: int = 64

    family: str = "ldm-class"
    pipeline_class: str = "LDMClassConditionalPipeline"

    def save_folder(self, folder: Path) -> None:
        import torch
        from diffusers import UNet2DConditionModel

        from export.families.ldm_modules import ClassEmbedder

        c = self.vq.latent_channels
        torch.manual_seed(self.seed)
        unet = UNet2DConditionModel(**self.cond_unet.config(c, self.default_size // self.vae_scale))
        torch.manual_seed(self.seed + 2)
        embedder = ClassEmbedder(n_classes=self.n_classes, embed_dim=self.cond_unet.cross_attention_dim)
        self.save_parts(folder, {"unet": unet, "vqvae": self.vqvae(), "class_embedder": embedder})


# a small WordPiece vocabulary for the seeded text preset (no hub here): BERT's special tokens first, then words, letters
# and their word-piece continuations, so any lower-case ASCII prompt tokenizes without [UNK]
_WORDS = ("a an the of and in on with at to by photo photograph painting picture drawing portrait landscape city street "
          "house tree forest mountain river lake sea beach sky cloud sun moon star night day red green blue yellow "
          "black white orange purple dog cat horse bird fish cow man woman child person people car boat train "
          "astronaut riding flower garden castle bridge road snow rain fire water stone old new small big tall "
          "beautiful dark bright oil style art detailed").split()
BERT_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *",.!?'-():;\"", *_WORDS,
              *"abcdefghijklmnopqrstuvwxyz0123456789", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"))


@dataclass(frozen=True)
class LdmTextPreset(LdmPreset):
    """LDMTextToImagePipeline's model: LDMBert (a BART-style encoder) over a BERT tokenizer, a UNet2DConditionModel
    on its hidden states, and (as CompVis' ldm-text2im-large-256) a KL-f8 autoencoder in vqvae/."""

    cond_unet: UNetArch = field(default_factory=lambda: UNetArch(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")))
    kl_blocks: tuple[int, ...] = (16, 32, 32, 32)  # the autoencoder's block_out_channels: f8 (the pipeline's latents: H/8)
    autoencoder: str = "kl"  # "kl": AutoencoderKL (family ldm-text); "vq": VQModel (ldm-text-vq)
    bert: tuple[int, int, int, int] = (2, 2, 16, 64)  # LDMBert encoder_layers, heads, head_dim, ffn_dim
    default_size: int = 64

    family: str = "ldm-text"
    pipeline_class: str = "LDMTextToImagePipeline"

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.kl_blocks) - 1)

    def save_folder(self, folder: Path) -> None:
        import tempfile

        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
        from transformers import BertTokenizerFast

        with tempfile.TemporaryDirectory() as tmp:
            vocab = Path(tmp) / "vocab.txt"
            vocab.write_text("\n".join(BERT_VOCAB) + "\n")
            tokenizer = BertTokenizerFast(vocab_file=str(vocab), model_max_length=77)
        width = self.cond_unet.cross_attention_dim
        layers, heads, head_dim, ffn = self.bert
        torch.manual_seed(self.seed)
        unet = UNet2DConditionModel(**self.cond_unet.config(4, self.default_size // self.vae_scale))
        torch.manual_seed(self.seed + 1)
        if self.autoencoder == "vq":
            vae = replace(self, vq=VQArch(block_out_channels=self.kl_blocks, latent_channels=4)).vqvae()
        else:
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=self.kl_blocks,
                                down_block_types=("DownEncoderBlock2D",) * len(self.kl_blocks),
                                up_block_types=("UpDecoderBlock2D",) * len(self.kl_blocks), layers_per_block=1,
                                norm_num_groups=8, sample_size=self.default_size)
        torch.manual_seed(self.seed + 2)
        bert = LDMBertModel(LDMBertConfig(vocab_size=len(BERT_VOCAB), max_position_embeddings=77, encoder_layers=layers,
                                          encoder_attention_heads=heads, head_dim=head_dim, encoder_ffn_dim=ffn,
                                          d_model=width))
        scheduler = DDIMScheduler.from_config(self.scheduler.config(self.prediction_type))
        LDMTextToImagePipeline(vqvae=vae.eval(), bert=bert.eval(), tokenizer=tokenizer, unet=unet.eval(),
                               scheduler=scheduler).save_pretrained(folder, safe_serialization=True)


@dataclass(frozen=True)
class LdmSemanticPreset(LdmPreset):
    """The semantic synthesis model: the landscapes model's spatial rescaler (`n_classes` one-hot channels, 2 stages of
    x0.5 for the VQ-f4, a 1x1 convolution to C) and a UNet2DModel on the latents and that condition (in 2C, out C)."""

    n_classes: int = 182  # COCO-Stuff's, as the paper's landscapes model
    family: str = "ldm-semantic"
    pipeline_class: str = "LDMSemanticSynthesisPipeline"

    def save_folder(self, folder: Path) -> None:
        import torch
        from diffusers import UNet2DModel

        from export.families.ldm_modules import SpatialRescaler

        c, stages = self.vq.latent_channels, len(self.vq.block_out_channels) - 1
        torch.manual_seed(self.seed)
        unet = UNet2DModel(**asdict(self.unet), in_channels=2 * c, out_channels=c,
                           sample_size=self.default_size // self.vae_scale)
        torch.manual_seed(self.seed + 2)
        rescaler = SpatialRescaler(n_stages=stages, multiplier=0.5, in_channels=self.n_classes, out_channels=c)
        self.save_parts(folder, {"unet": unet, "vqvae": self.vqvae(), "semantic_encoder": rescaler})


@dataclass(frozen=True)
class LdmLayoutPreset(LdmClassPreset):
    """The layout-to-image model: LDMBert's encoder over the 8192 layout tokens (92 positions) as the context of a
    UNet2DConditionModel, a VQ autoencoder, and the label names (layout_encoder/labels.json)."""

    labels: tuple[str, ...] = ("person", "dog", "cat", "car", "tree", "house", "boat", "bird")
    bert: tuple[int, int, int, int] = (2, 2, 16, 64)  # LDMBert encoder_layers, heads, head_dim, ffn_dim
    family: str = "ldm-layout"
    pipeline_class: str = "LDMLayoutToImagePipeline"

    def save_folder(self, folder: Path) -> None:
        import torch
        from diffusers import UNet2DConditionModel
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

        from export.families.ldm_layout import LABELS_FILE, TOKENS, VOCABULARY

        torch.manual_seed(self.seed)
        unet = UNet2DConditionModel(**self.cond_unet.config(self.vq.latent_channels, self.default_size // self.vae_scale))
        layers, heads, head_dim, ffn = self.bert
        torch.manual_seed(self.seed + 2)
        bert = LDMBertModel(LDMBertConfig(vocab_size=VOCABULARY, max_position_embeddings=TOKENS, encoder_layers=layers,
                                          encoder_attention_heads=heads, head_dim=head_dim, encoder_ffn_dim=ffn,
                                          d_model=self.cond_unet.cross_attention_dim))
        self.save_parts(folder, {"unet": unet, "vqvae": self.vqvae(), "layout_encoder": bert})
        (folder / LABELS_FILE).write_text(json.dumps(list(self.labels), indent=1) + "\n")


TINY_LDM_SR = LdmPreset(name="tiny-ldm-sr")
TINY_LDM_LAYOUT = LdmLayoutPreset(name="tiny-ldm-layout", seed=31)
TINY_LDM_SEMANTIC = LdmSemanticPreset(name="tiny-ldm-semantic", seed=29, default_size=64)
TINY_LDM_TEXT = LdmTextPreset(name="tiny-ldm-text", seed=23)
TINY_LDM_TEXT_VQ = LdmTextPreset(name="tiny-ldm-text-vq", seed=23, autoencoder="vq", family="ldm-text-vq")
TINY_LDM_UNCOND = LdmUncondPreset(name="tiny-ldm-uncond", seed=17)
TINY_LDM_CIN = LdmClassPreset(name="tiny-ldm-cin", seed=19)
LDM_PRESETS: dict[str, LdmPreset] = {p.name: p for p in (TINY_LDM_SR, TINY_LDM_UNCOND, TINY_LDM_CIN, TINY_LDM_TEXT,
                                                              TINY_LDM_SEMANTIC, TINY_LDM_LAYOUT,
                                                              TINY_LDM_TEXT_VQ)}
