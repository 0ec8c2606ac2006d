"""Textual-inversion embeddings: a folder of `.safetensors` files whose stems are words a prompt may use.

`--embeddings DIR` (engine.generate) and `--embeddings-dir DIR` (engine.serve) load every embedding under DIR once,
when the session starts. A prompt that names one (its file stem, found among the prompt's tokens as A1111 finds it:
engine/prompts.py) gets its vectors in place of the name, one token slot per vector; the text encoders take them
through their `token_embeds` input (export/families/token_embedding.py), so an embedding needs no re-export and no
rebuild, on every backend.

Layouts read (safetensors only: a pickled `.pt`, `.bin`, `.ckpt` or `.pth` is refused, never unpickled):
- A1111's `emb_params` [n, C], and its `string_to_param` dict, which a safetensors file stores as `string_to_param.*`;
- diffusers' and the concepts library's `{token: tensor}`: one tensor, [n, C] or [C];
- SDXL's `clip_l` [n, C1] and `clip_g` [n, C2], one per text encoder (the family's `embedding_keys`).
An embedding whose width is not its text encoder's is refused naming the file and both widths.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.prompts import CHUNK_TOKENS
from export.families import Family
from export.specs import Dims

SUFFIX = ".safetensors"
PICKLES = (".pt", ".bin", ".ckpt", ".pth")
INPUT = "token_embeds"  # the text encoders' input the vectors go to
A1111_KEYS = ("emb_params", "string_to_param.")  # an exact key, and a key prefix


@dataclass(frozen=True)
class Embedding:
    name: str  # the file stem: the word a prompt uses
    vectors: Mapping[str, torch.Tensor]  # text encoder -> its vectors [n, C], float32
    shorthash: str  # the file's sha256, first 12 hex digits (A1111's `TI hashes`)

    @property
    def count(self) -> int:
        """Token slots it takes in a prompt: one per vector."""
        return int(next(iter(self.vectors.values())).shape[0])


def encoder_widths(family: Family, dims: Dims) -> dict[str, int]:
    """Each text encoder's `token_embeds` width (its token embedding's)."""
    widths = {}
    for name in family.roles.text_encoders:
        spec = family.spec(name)
        widths[name] = spec.inputs[spec.input_names.index(INPUT)].shape(dims, 1, 0, 0)[-1]
    return widths


def load_embeddings(folder: Path, widths: Mapping[str, int], keys: Mapping[str, str]) -> dict[str, Embedding]:
    """Every embedding under `folder` by name; ValueError naming the file for a pickle, an unknown layout, a wrong
    width or two files of one name."""
    if not folder.is_dir():
        raise ValueError(f"embeddings folder {folder} is not a directory")
    found: dict[str, Embedding] = {}
    paths: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix in PICKLES:
            raise ValueError(f"{path}: a pickled embedding ({suffix}) is never loaded: convert it to {SUFFIX} or move "
                             "it out of the embeddings folder")
        if suffix != SUFFIX:
            continue  # previews and notes beside the embeddings
        if path.stem in paths:
            raise ValueError(f"{path}: embedding {path.stem!r} is also {paths[path.stem]}: prompts name embeddings by "
                             "file stem, so rename one")
        paths[path.stem] = path
        found[path.stem] = read_embedding(path, widths, keys)
    return found


def read_embedding(path: Path, widths: Mapping[str, int], keys: Mapping[str, str]) -> Embedding:
    """One embedding file's vectors for each text encoder (`widths`: encoder -> width; `keys`: encoder -> its key in
    a file with one tensor per encoder, empty when the model has one text encoder)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    vectors = {name: _as_vectors(path, tensors[key]) for name, key in _keys_of(path, tensors, widths, keys).items()}
    for name, v in vectors.items():
        if v.shape[1] != widths[name]:
            raise ValueError(f"{path}: vectors of width {v.shape[1]}, the {name} text encoder takes {widths[name]} "
                             "(an embedding trained for another model)")
    counts = {int(v.shape[0]) for v in vectors.values()}
    if len(counts) > 1 or not 1 <= min(counts) <= CHUNK_TOKENS:
        raise ValueError(f"{path}: {sorted(counts)} vectors; an embedding has 1 to {CHUNK_TOKENS}, the same number "
                         "for every text encoder")
    return Embedding(path.stem, vectors, hashlib.sha256(path.read_bytes()).hexdigest()[:12])


def _keys_of(path: Path, tensors: Mapping[str, torch.Tensor], widths: Mapping[str, int],
             keys: Mapping[str, str]) -> dict[str, str]:
    """encoder -> the key holding its vectors in this file; ValueError naming the layouts read."""
    if keys:  # one tensor per text encoder (SDXL's clip_l / clip_g)
        missing = [k for k in keys.values() if k not in tensors]
        if missing:
            raise ValueError(f"{path}: this model's embeddings have tensors {', '.join(keys.values())} (A1111's SDXL "
                             f"layout); the file has {', '.join(tensors) or 'none'}")
        return dict(keys)
    exact, prefix = A1111_KEYS
    single = ([exact] if exact in tensors else [k for k in tensors if k.startswith(prefix)]) or list(tensors)
    if len(single) != 1:
        raise ValueError(f"{path}: unknown embedding layout (tensors {', '.join(tensors) or 'none'}): expected "
                         f"A1111's {exact} or {prefix}*, or one {{token: tensor}} as diffusers saves it")
    assert len(widths) == 1, "a family of several text encoders names their embedding_keys"
    (name,) = widths
    return {name: single[0]}


def _as_vectors(path: Path, t: torch.Tensor) -> torch.Tensor:
    v = t.unsqueeze(0) if t.dim() == 1 else t
    if v.dim() != 2 or not v.is_floating_point():
        raise ValueError(f"{path}: an embedding is a float tensor [vectors, width], this one is {t.dtype} "
                         f"{list(t.shape)}")
    return v.float()
