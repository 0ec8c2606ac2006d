"""The CLIP tokenizer every model folder written here ships: the real CLIP BPE vocabulary (49408
tokens) from export/data, so nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"


def default_tokenizer(max_length: int = 77):
    """The real CLIP BPE tokenizer (49408 tokens) from the vocabulary shipped in export/data."""
    from transformers import CLIPTokenizer

    vocab = json.loads((DATA_DIR / "clip_vocab.json").read_text(encoding="utf-8"))
    lines = (DATA_DIR / "clip_merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", model_max_length=max_length)


SDXL_PAD_TOKEN = "!"  # SDXL's tokenizer_2 pads with "!" (id 0), its tokenizer with <|endoftext|>


def sdxl_tokenizer_2(max_length: int = 77):
    """SDXL's second tokenizer: the same CLIP BPE vocabulary, padding with "!" as SDXL's tokenizer_2 does."""
    tokenizer = default_tokenizer(max_length)
    tokenizer.pad_token = SDXL_PAD_TOKEN
    return tokenizer
