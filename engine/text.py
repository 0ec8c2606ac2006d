"""The text side of a session: a request's prompts read once, when it is prepared, then encoded per batch.

`read` turns a request's prompt and negative prompt into each text encoder's chunks (engine/prompts.py: A1111's
syntax or plain, textual-inversion embeddings from engine/embeddings.py), checked against the chunks the engines
take; the prepared request keeps them, so a batch never tokenizes again. `encode` runs each text encoder once per
chunk on a batch's rows ([negatives; prompts] with guidance, padded to the batch's chunk count with the empty
prompt's chunk as A1111's pad_cond_uncond does) and returns the family's text outputs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine import prompts
from engine.embeddings import Embedding, encoder_widths
from engine.request import Request, RequestError
from export.families import Family
from export.families.base import Outputs
from export.specs import Dims

FIELDS = ("prompt", "negative_prompt")


@dataclass(frozen=True)
class Prompts:
    """One request's prompt and negative prompt, read for one text encoder."""

    prompt: prompts.Chunks
    negative: prompts.Chunks

    @property
    def chunks(self) -> int:
        return max(len(self.prompt.ids), len(self.negative.ids))

    @property
    def embeddings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.prompt.embeddings + self.negative.embeddings))


class TextEncoders:
    def __init__(self, family: Family, runners: Mapping[str, Any], tokenizers: Sequence[Any], dims: Dims,
                 max_chunks: int, embeddings: Mapping[str, Embedding] | None = None):
        self.names = family.roles.text_encoders  # in the tokenizers' order
        self.runners = {name: runners[name] for name in self.names}
        self.tokenizers = list(tokenizers)
        self.text_len = dims.text_len
        self.max_chunks = max_chunks  # chunks of 77 tokens the denoiser takes
        self.widths = encoder_widths(family, dims)
        self.embeddings = dict(embeddings or {})
        counts = {e.name: e.count for e in self.embeddings.values()}
        self.indexes = [prompts.EmbeddingIndex.of(prompts.pieces(t), counts) for t in self.tokenizers]
        self.empty = [prompts.text_chunks("", t, "a1111", self.text_len) for t in self.tokenizers]  # the padding chunk
        self.vectors = {name: {e.name: e.vectors[name].to(self.runners[name].device) for e in self.embeddings.values()}
                        for name in self.names}  # text encoder -> embedding -> its vectors [n, C] on its device

    def read(self, r: Request) -> tuple[Prompts, ...]:
        """The request's prompts for each text encoder; RequestError naming `prompt` / `negative_prompt` when one
        needs more chunks than the engines take or has an attention weight that is not a number."""
        out = []
        for tokenizer, index in zip(self.tokenizers, self.indexes, strict=True):
            read = {}
            for field in FIELDS:
                try:
                    read[field] = prompts.text_chunks(getattr(r, field) or "", tokenizer, r.prompt_syntax,
                                                      self.text_len, warn=True, embeddings=index)
                except ValueError as exc:  # an attention weight that is no number
                    raise RequestError(field, f"{field.replace('_', ' ')}: {exc}") from None
                prompts.check_length([read[field]], self.max_chunks, field)
            out.append(Prompts(read["prompt"], read["negative_prompt"]))
        return tuple(out)

    def tokenize(self, texts: list[str], tokenizer=None) -> torch.Tensor:
        """Plain token ids [B, 77] (the tokenizer's truncation, with a warning): what `plain` prompt syntax encodes."""
        tokenizer = tokenizer or self.tokenizers[0]
        ids = [prompts.text_chunks(t, tokenizer, "plain", self.text_len, warn=True).ids[0] for t in texts]
        return torch.tensor(ids, dtype=torch.int32)  # [B, 77]

    def encode(self, rows: Sequence[Any], cfg: bool) -> Outputs:
        """Each text encoder's outputs for these rows (each with `.texts` from `read`, `.chunks` and a resolved
        `.request`): [negatives; prompts] with guidance, every text padded to the rows' chunk count."""
        k = max(row.chunks for row in rows)
        skips = [row.request.clip_skip or 1 for row in rows]  # a row's both halves alike
        outs = {}
        for i, name in enumerate(self.names):
            texts = ([row.texts[i].negative for row in rows] if cfg else []) + [row.texts[i].prompt for row in rows]
            texts = [prompts.pad(t, self.empty[i], k) for t in texts]
            outs[name] = prompts.encode_chunks(self.runners[name], texts, skips * 2 if cfg else skips,
                                               self.widths[name], self.vectors[name])
        return outs

    def hashes(self, texts: Sequence[Prompts]) -> dict[str, str]:
        """name -> short hash of the embeddings a request's prompts use (its `TI hashes`)."""
        used = dict.fromkeys(name for t in texts for name in t.embeddings)
        return {name: self.embeddings[name].shorthash for name in used}

