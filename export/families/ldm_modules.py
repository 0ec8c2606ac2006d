"""torch modules of the Latent Diffusion paper's models that diffusers has no class for, saved and loaded as diffusers
models (config.json + safetensors, `ModelMixin.from_pretrained`): the class-conditional model's embedding table."""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class ClassEmbedder(ModelMixin, ConfigMixin):
    """The original code's `ClassEmbedder`: one learned vector per class, the UNet's cross-attention context (one
    token). `n_classes` rows, the last the unconditional class that classifier-free guidance runs against (the
    ImageNet model's config: 1001 rows, classes 0..999 and 1000 unconditional)."""

    @register_to_config
    def __init__(self, n_classes: int = 1001, embed_dim: int = 512):
        super().__init__()
        self.embedding = torch.nn.Embedding(n_classes, embed_dim)

    def forward(self, class_ids: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 1, D]
        return self.embedding(class_ids.long())[:, None]


class SpatialRescaler(ModelMixin, ConfigMixin):
    """The original code's `SpatialRescaler`, the semantic-synthesis model's condition encoder: a map one-hot over
    `in_channels` classes, resized `n_stages` times by `multiplier` (bilinear), then mapped to `out_channels` by a 1x1
    convolution; the result is concatenated to the latents."""

    @register_to_config
    def __init__(self, n_stages: int = 2, multiplier: float = 0.5, in_channels: int = 182, out_channels: int = 3,
                 bias: bool = False):
        super().__init__()
        self.channel_mapper = torch.nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:  # [B, classes, H, W] -> [B, out, H/f, W/f]
        x = one_hot
        for _ in range(self.config.n_stages):
            x = torch.nn.functional.interpolate(x, scale_factor=self.config.multiplier, mode="bilinear")
        return self.channel_mapper(x)
