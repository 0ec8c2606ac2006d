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
