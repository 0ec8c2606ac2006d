"""Prompts as AUTOMATIC1111's web UI reads them: attention weights, chunks of 75 tokens, BREAK, "Original" emphasis.

`--prompt-syntax a1111` (the default) reads a prompt as A1111 does; `plain` keeps the text as it is (diffusers'
reading: one chunk, the tokenizer's truncation).

Attention (`parse`): `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1, `(text:w)` sets
w; brackets nest and their factors multiply; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the characters themselves; a
bracket left open is closed at the end of the prompt; a `)` or `]` with none open, or a `:w)` outside round
brackets, is text. The word `BREAK` (upper case, standing alone) ends the current chunk.

Chunks (`chunk_prompt`): the text's tokens (each with its weight) fill chunks of 75; a chunk that fills up while its
last comma is at most 20 tokens back is cut right after that comma and the rest starts the next chunk; `BREAK` starts
a new chunk. Each chunk becomes the text encoder's 77 ids: start token, its tokens, end token, then the tokenizer's
padding, with weight 1 outside the prompt's tokens. The chunks are encoded one by one and concatenated on the token
axis ([B, 77·k, C]); "Original" emphasis (`emphasize`) multiplies each chunk's hidden states by its tokens' weights
and rescales them so that their mean is the unweighted mean. A text without weights is encoded exactly as before.

Torch is imported by the functions that need it: the CLI and the server check prompts without it.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from export.errors import RequestError

if TYPE_CHECKING:
    import torch

SYNTAXES = ("a1111", "plain")
CHUNK_TOKENS = 75  # prompt tokens per chunk (+ start and end = the encoder's 77)
COMMA_BACKTRACK = 20  # a full chunk is cut after its last comma when that comma is at most this many tokens back
BREAK = "BREAK"
LAYERS = "text_layers"  # SD clip's every-layer output (clip skip), not a denoiser input
HIDDEN = "text_embeddings"  # the text encoders' hidden-state output (export/specs.py), chunked and weighted
ROUND, SQUARE = 1.1, 1 / 1.1  # the factors of ( ) and [ ]
_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:|\\")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Parsed = list[tuple[str, float]]  # runs of text and their weights; (BREAK, -1.0) marks a chunk break


def parse(text: str) -> Parsed:
    """A1111's attention syntax: the prompt as runs of (text, weight), runs of one weight merged."""
    runs: list[list] = []  # [text, weight], weights multiplied in place when a bracket closes
    opened: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:  # a BREAK inside brackets is scaled too, and then read as the word (as A1111 does)
            run[1] *= factor

    for m in _TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):  # an escaped character; a lone backslash is dropped
            runs.append([token[1:], 1.0])
        elif token in opened:
            opened[token].append(len(runs))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), _number(weight))
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append([BREAK, -1.0])
                runs.append([part, 1.0])
    for start in opened["("]:  # brackets left open are closed at the end
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    merged: list[list] = []
    for run in runs:  # neighbours of one weight become one run
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, float(w)) for t, w in merged] or [("", 1.0)]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"attention weight {text!r} is not a number (write it as (text:1.2))") from None


@dataclass(frozen=True)
class Chunks:
    """One text's chunks for one tokenizer: `ids` and `weights` are k lists of 77."""

    ids: list[list[int]]
    weights: list[list[float]]

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for row in self.weights for w in row)


def chunk_prompt(parsed: Parsed, tokenize: Callable[[str], list[int]], comma: int, start: int, end: int, pad: int,
                 length: int = CHUNK_TOKENS) -> Chunks:
    """The runs' tokens (`tokenize`: text -> ids without start/end) in chunks of `length`, cut after a comma when
    one is near the end, or at BREAK; each chunk as start + tokens + end + padding (`pad`) with its weights."""
    done: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        done.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parsed:
        if text == BREAK and weight == -1.0:
            close()
            continue
        for token in tokenize(text):
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == length and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                rest, rest_w = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = rest, rest_w
            if len(tokens) == length:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not done:
        close()
    ids = [[start, *t, end] + [pad] * (length - len(t)) for t, _ in done]
    return Chunks(ids, [[1.0, *w, 1.0] + [1.0] * (length - len(w)) for _, w in done])


def text_chunks(text: str, tokenizer, syntax: str, n: int = CHUNK_TOKENS + 2, warn: bool = False) -> Chunks:
    """`text` for one tokenizer: A1111's chunks of `n` ids (`a1111`), or one chunk as the tokenizer makes it, cut at
    `n` (`plain`; with a warning when `warn`: once per request, where it is prepared)."""
    if syntax == "plain":
        ids = tokenizer(text).input_ids
        if warn and len(ids) > n:
            warnings.warn(f"prompt longer than {n} tokens was truncated: {text[:60]!r}...", stacklevel=4)
        ids = tokenizer(text, padding="max_length", max_length=n, truncation=True).input_ids
        return Chunks([list(ids)], [[1.0] * n])
    comma = tokenizer(",").input_ids[1]
    start, end = tokenizer("").input_ids[:2]

    def tokenize(piece: str) -> list[int]:
        return list(tokenizer(piece).input_ids[1:-1])

    return chunk_prompt(parse(text), tokenize, comma, start, end, tokenizer.pad_token_id, n - 2)


def pad(chunks: Chunks, empty: Chunks, k: int) -> Chunks:
    """`chunks` extended to `k` chunks with the empty prompt's chunk (`empty`), as A1111's pad_cond_uncond pads the
    shorter of prompt and negative prompt so both halves of guidance run in one UNet batch."""
    n = k - len(chunks.ids)
    return Chunks(chunks.ids + empty.ids * n, chunks.weights + empty.weights * n) if n > 0 else chunks


def check_syntax(syntax: object) -> None:
    if syntax not in SYNTAXES:
        raise RequestError("prompt_syntax", f"prompt_syntax {syntax!r} is not one of {', '.join(SYNTAXES)}")


def check_length(texts: Sequence[Chunks], limit: int, field: str = "prompt") -> None:
    """RequestError naming `field` when a text needs more chunks than the engines take (77 tokens each)."""
    k = max(len(c.ids) for c in texts)
    if k > limit:
        raise RequestError(field, f"the {field.replace('_', ' ')} needs {k} chunks of 75 tokens (a long prompt or "
                                  f"BREAK), these engines take {limit} ({limit * 77} tokens): shorten it (prompt "
                                  "syntax plain cuts it at 77 tokens instead)")


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis of one chunk: z [N, 77, C] times its token weights [N, 77], rescaled per text so
    that its mean is the unweighted mean."""
    mean = z.mean(dim=(1, 2), keepdim=True)  # [N, 1, 1]
    out = z * weights.to(z.dtype).unsqueeze(-1)
    return out * (mean / out.mean(dim=(1, 2), keepdim=True))


def encode_chunks(runner, texts: list[Chunks], skips: list[int]) -> dict[str, torch.Tensor]:
    """A text encoder's (`runner`'s) outputs for texts of one chunk count, each chunk encoded and weighted: hidden
    states [N, 77·k, C] (each text's clip skip layer), the other outputs of chunk 0."""
    import torch

    parts: list[dict[str, torch.Tensor]] = []
    weighted = torch.tensor([t.weighted for t in texts])  # [N]
    for j in range(len(texts[0].ids)):
        ids = torch.tensor([t.ids[j] for t in texts], dtype=torch.int32)  # [N, 77]
        out = {k: v.clone() for k, v in runner(input_ids=ids.to(runner.device)).items()}  # valid until the next call
        if max(skips) > 1:  # A1111's clip skip N: layer L - N + 1's output through the final norm
            layers = out.pop(LAYERS)  # [N, L, 77, C]
            n, depth = layers.shape[:2]
            skip = torch.tensor(skips, device=layers.device)  # [N]
            picked = layers[torch.arange(n, device=layers.device), depth - skip]  # [N, 77, C]
            out[HIDDEN] = torch.where(skip.view(-1, 1, 1) > 1, picked, out[HIDDEN])
        out.pop(LAYERS, None)
        if bool(weighted.any()):
            z = out[HIDDEN]
            w = torch.tensor([t.weights[j] for t in texts], device=z.device)  # [N, 77]
            out[HIDDEN] = torch.where(weighted.to(z.device).view(-1, 1, 1), emphasize(z, w), z)
        parts.append(out)
    hidden = torch.cat([p[HIDDEN] for p in parts], dim=1)  # [N, 77·k, C]
    return {**parts[0], HIDDEN: hidden}
