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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from export.errors import RequestError
from export.specs import CUSTOM_TOKEN

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


Fix = tuple[int, str, int]  # (position in the chunk's ids, embedding name, which of its vectors)


@dataclass(frozen=True)
class Chunks:
    """One text's chunks for one tokenizer: `ids` and `weights` are k lists of 77; `fixes` says, per chunk, which
    positions take a textual-inversion vector (their id is CUSTOM_TOKEN)."""

    ids: list[list[int]]
    weights: list[list[float]]
    fixes: list[list[Fix]] = field(default_factory=list)

    def __post_init__(self):
        if not self.fixes:
            object.__setattr__(self, "fixes", [[] for _ in self.ids])

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for row in self.weights for w in row)

    @property
    def embeddings(self) -> tuple[str, ...]:
        """The textual-inversion embeddings this text uses, in order of first use."""
        return tuple(dict.fromkeys(name for row in self.fixes for _, name, _ in row))


@dataclass(frozen=True)
class EmbeddingIndex:
    """Textual-inversion embeddings by their names' token ids, found in a prompt's tokens as A1111 finds them:
    at each position the longest name whose ids start there."""

    by_first: Mapping[int, tuple[tuple[tuple[int, ...], str, int], ...]]  # first id -> (name ids, name, vectors)

    @classmethod
    def of(cls, tokenize: Callable[[str], list[int]], counts: Mapping[str, int]) -> EmbeddingIndex:
        """The index of embeddings `counts` (name -> its vectors) for a tokenizer (`tokenize`: no start/end)."""
        found: dict[int, list[tuple[tuple[int, ...], str, int]]] = {}
        for name, n in counts.items():
            ids = tuple(tokenize(name))
            if ids:
                found.setdefault(ids[0], []).append((ids, name, n))
        return cls({k: tuple(sorted(v, key=lambda e: -len(e[0]))) for k, v in found.items()})

    def at(self, tokens: Sequence[int], i: int) -> tuple[str, int, int] | None:
        """(name, vectors, name's token count) of the embedding whose name starts at tokens[i], or None."""
        for ids, name, n in self.by_first.get(tokens[i], ()):
            if tuple(tokens[i:i + len(ids)]) == ids:
                return name, n, len(ids)
        return None


NO_EMBEDDINGS = EmbeddingIndex({})
Item = tuple[int, str, int]  # a run's token, or an embedding: (its name's first token, its name, its vectors)


def items(run: Sequence[int], embeddings: EmbeddingIndex) -> list[Item]:
    """A run's tokens with each embedding name found in it as one item; a plain token is (token, "", 1)."""
    out: list[Item] = []
    i = 0
    while i < len(run):
        found = embeddings.at(run, i)
        name, n, span = found or ("", 1, 1)
        out.append((run[i], name, n))
        i += span
    return out


def _slots(item: Item, at: int) -> tuple[list[int], list[Fix]]:
    """An item's ids and fixes when it starts at position `at`: an embedding takes one CUSTOM_TOKEN per vector."""
    token, name, n = item
    if not name:
        return [token], []
    return [CUSTOM_TOKEN] * n, [(at + v, name, v) for v in range(n)]


def chunk_prompt(parsed: Parsed, tokenize: Callable[[str], list[int]], comma: int, start: int, end: int, pad: int,
                 length: int = CHUNK_TOKENS, embeddings: EmbeddingIndex = NO_EMBEDDINGS) -> Chunks:
    """The runs' tokens (`tokenize`: text -> ids without start/end) in chunks of `length`, cut after a comma when
    one is near the end, or at BREAK; each chunk as start + tokens + end + padding (`pad`) with its weights. An
    embedding's name takes one slot per vector (CUSTOM_TOKEN), all in one chunk. Unlike A1111, the tokens that a
    comma cut moves to the next chunk take their embedding vectors with them (A1111 leaves those behind)."""
    done: list[tuple[list[int], list[float], list[Fix]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    fixes: list[Fix] = []  # positions in `tokens`
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, fixes, last_comma
        done.append((tokens, weights, fixes))
        tokens, weights, fixes, last_comma = [], [], [], -1

    for text, weight in parsed:
        if text == BREAK and weight == -1.0:
            close()
            continue
        for item in items(tokenize(text), embeddings):
            if item[0] == comma:
                last_comma = len(tokens)
            elif len(tokens) == length and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the tokens after the comma move on
                rest = tokens[cut:], weights[cut:], [(p - cut, name, v) for p, name, v in fixes if p >= cut]
                tokens, weights, fixes = tokens[:cut], weights[:cut], [f for f in fixes if f[0] < cut]
                close()
                tokens, weights, fixes = rest
            if len(tokens) == length or len(tokens) + item[2] > length:  # an embedding's vectors share one chunk
                close()
            ids, more = _slots(item, len(tokens))
            tokens += ids
            weights += [weight] * len(ids)
            fixes += more
    if tokens or not done:
        close()
    ids = [[start, *t, end] + [pad] * (length - len(t)) for t, _, _ in done]
    return Chunks(ids, [[1.0, *w, 1.0] + [1.0] * (length - len(w)) for _, w, _ in done],
                  [[(p + 1, name, v) for p, name, v in f] for _, _, f in done])  # after the start token


def pieces(tokenizer) -> Callable[[str], list[int]]:
    """text -> its token ids without start and end (how runs are tokenized, and embedding names found)."""
    return lambda text: list(tokenizer(text).input_ids[1:-1])


def text_chunks(text: str, tokenizer, syntax: str, n: int = CHUNK_TOKENS + 2, warn: bool = False,
                embeddings: EmbeddingIndex = NO_EMBEDDINGS) -> Chunks:
    """`text` for one tokenizer: A1111's chunks of `n` ids (`a1111`), or one chunk as the tokenizer makes it, cut at
    `n` (`plain`; with a warning when `warn`: once per request, where it is prepared). Textual-inversion
    `embeddings` named in the text take their vectors' slots in either syntax."""
    comma = tokenizer(",").input_ids[1]
    start, end = tokenizer("").input_ids[:2]
    tokenize = pieces(tokenizer)
    if syntax == "plain":  # the tokenizer's reading: start, the text's tokens cut to n - 2, end, padding
        body: list[int] = []
        fixes: list[Fix] = []
        for item in items(tokenize(text), embeddings):
            ids, more = _slots(item, len(body) + 1)
            body += ids
            fixes += more
        if warn and len(body) > n - 2:
            warnings.warn(f"prompt longer than {n} tokens was truncated: {text[:60]!r}...", stacklevel=4)
        body = body[:n - 2]
        ids = [start, *body, end] + [tokenizer.pad_token_id] * (n - 2 - len(body))
        return Chunks([ids], [[1.0] * n], [[f for f in fixes if f[0] <= len(body)]])
    return chunk_prompt(parse(text), tokenize, comma, start, end, tokenizer.pad_token_id, n - 2, embeddings)


def pad(chunks: Chunks, empty: Chunks, k: int) -> Chunks:
    """`chunks` extended to `k` chunks with the empty prompt's chunk (`empty`), as A1111's pad_cond_uncond pads the
    shorter of prompt and negative prompt so both halves of guidance run in one UNet batch."""
    n = k - len(chunks.ids)
    return Chunks(chunks.ids + empty.ids * n, chunks.weights + empty.weights * n,
                  chunks.fixes + empty.fixes * n) if n > 0 else chunks


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


def token_inputs(ids: list[list[int]], fixes: list[list[Fix]], width: int, vectors: Mapping[str, torch.Tensor],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """A text encoder's inputs for one chunk of N texts: ids [N, 77] int32 and token_embeds [N, 77, width], the
    vectors of the embeddings their fixes name (`vectors`: name -> [n, width]) at those positions, zeros elsewhere."""
    import torch

    embeds = torch.zeros(len(ids), len(ids[0]), width)  # [N, 77, C]
    for row, row_fixes in enumerate(fixes):
        for p, name, v in row_fixes:
            embeds[row, p] = vectors[name][v]
    return {"input_ids": torch.tensor(ids, dtype=torch.int32).to(device), "token_embeds": embeds.to(device)}


def encode_chunks(runner, texts: list[Chunks], skips: list[int], width: int,
                  vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's (`runner`'s, inputs `width` wide) outputs for texts of one chunk count, each chunk encoded
    and weighted: hidden states [N, 77·k, C] (each text's clip skip layer), the other outputs of chunk 0; the
    textual-inversion embeddings the texts name take their `vectors`."""
    import torch

    parts: list[dict[str, torch.Tensor]] = []
    weighted = torch.tensor([t.weighted for t in texts])  # [N]
    for j in range(len(texts[0].ids)):
        inputs = token_inputs([t.ids[j] for t in texts], [t.fixes[j] for t in texts], width, vectors, runner.device)
        out = {k: v.clone() for k, v in runner(**inputs).items()}  # valid until the next call
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
