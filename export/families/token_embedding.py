"""Text encoders that take vectors they were never trained with (textual inversion), without a re-export.

Every text encoder graph takes `input_ids` [B, 77] and `token_embeds` [B, 77, C]: where an id is negative
(`CUSTOM`), the token's input vector is that position's row of `token_embeds` instead of the vocabulary's. The
engine puts an embedding's vectors there (engine/embeddings.py); any other row is ignored. A negative id is never
the end token, so the pooled output (SDXL's clip2) is still read at the first end token, for either of
transformers' rules (the legacy argmax of the ids, or the first `eos_token_id`).
"""
from __future__ import annotations

import torch

from export.specs import CUSTOM_TOKEN as CUSTOM  # the id of a token whose vector comes from `token_embeds`


class TokenEmbedding(torch.nn.Module):
    """A text encoder's token embedding (the same `weight`, so parameter names do not change) that takes the
    vectors of negative ids from `custom`, which the wrapper that owns it sets for one call."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.weight = embedding.weight
        self.custom: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, 77] -> [B, 77, C]
        assert self.custom is not None, "TokenEmbedding called outside text_encoder_call"
        vectors = torch.nn.functional.embedding(ids.clamp(min=0), self.weight)
        return torch.where((ids == CUSTOM).unsqueeze(-1), self.custom.to(vectors.dtype), vectors)


def with_token_inputs(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text encoder with its input embedding a TokenEmbedding (once; the weights stay the same tensors)."""
    if not isinstance(text_encoder.get_input_embeddings(), TokenEmbedding):
        text_encoder.set_input_embeddings(TokenEmbedding(text_encoder.get_input_embeddings()))
    return text_encoder


def text_encoder_call(text_encoder: torch.nn.Module, input_ids: torch.Tensor, token_embeds: torch.Tensor):
    """The text encoder's output (all hidden states) for ids whose negative entries take `token_embeds`' rows."""
    tokens = text_encoder.get_input_embeddings()
    tokens.custom = token_embeds  # [B, 77, C], this call only
    try:
        return text_encoder(input_ids.long(), output_hidden_states=True)
    finally:
        tokens.custom = None
