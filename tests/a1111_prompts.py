"""An independent reference of how AUTOMATIC1111's stable-diffusion-webui turns one prompt into CLIP
conditioning, for tests to compare an implementation against. Plain Python + torch; no engine imports.

Written from A1111's wiki ("Features": Attention/emphasis, Infinite prompt length, BREAK keyword) and from
reading modules/prompt_parser.py (parse_prompt_attention), modules/sd_hijack_clip.py (tokenize_line,
process_tokens), modules/sd_emphasis.py (EmphasisOriginal) and modules/sd_samplers_cfg_denoiser.py
(pad_cond_uncond). The pipeline is: parse -> chunks -> chunk_ids -> text encoder -> emphasize -> concat.
Textual-inversion embeddings are placed as tokenize_line does (chunks_with_embeddings; their vectors replace the
token embeddings at those places, modules/sd_hijack.py EmbeddingsWithFixes). Clip skip, prompt editing/alternation
([a:b:N], [a|b]) and AND are out of scope.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence

import torch

ROUND = 1.1  # "(x)" multiplies the attention of x by 1.1
SQUARE = 1 / 1.1  # "[x]" multiplies it by 1/1.1 (A1111 multiplies by this constant rather than dividing)
BREAK_MARK = ("BREAK", -1.0)  # what parse() emits for a BREAK keyword

_ESCAPABLE = "()[]\\"  # a backslash before one of these makes it literal
_SPECIAL = "\\()[]:"  # characters that end a run of plain text
_EXPLICIT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")  # ":1.5)" closing "(x:1.5)"; blanks allowed around the number
_BREAK = re.compile(r"\s*\bBREAK\b\s*")  # the uppercase word BREAK, eating the blanks around it


def parse(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs, following A1111's attention syntax.

    Rules:
    - "(x)" multiplies the weight of everything inside by 1.1, "[x]" by 1/1.1; nesting multiplies.
    - "(x:w)" multiplies what is inside by w instead of 1.1 (blanks may surround w). An explicit weight
      only exists for round brackets; ":w)" with no "(" open is plain text. A malformed number such as
      "(x:.)" makes float() raise ValueError, as it does in A1111.
    - "\\(", "\\)", "\\[", "\\]", "\\\\" are the literal character; a backslash before anything else is
      dropped (it becomes an empty run).
    - A ")" or "]" with nothing to close is literal text; brackets still open at the end are closed
      there (all round ones, outermost first, then all square ones).
    - Inside plain text the separate uppercase word BREAK (with the blanks around it) becomes the marker
      ("BREAK", -1.0). The marker is an ordinary run, so brackets around it scale it too: inside "(...)"
      it turns into ("BREAK", -1.1), which chunks() then tokenizes as the word "BREAK" (A1111 does so).
    - Weights are products of floats taken in closing order, so "((x:1.3))" is 1.3*1.1*1.1 bit for bit.
    - Nothing at all gives [("", 1.0)]; neighbouring runs whose weights are exactly equal are joined.
    """
    runs: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []  # index in runs where each open "(" began
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            follower = text[pos + 1:pos + 2]
            escaped = follower != "" and follower in _ESCAPABLE
            runs.append([follower if escaped else "", 1.0])
            pos += 2 if escaped else 1
        elif char == "(":
            open_round.append(len(runs))
            pos += 1
        elif char == "[":
            open_square.append(len(runs))
            pos += 1
        elif char == ":" and open_round and (explicit := _EXPLICIT.match(text, pos)):
            scale(open_round.pop(), float(explicit.group(1)))
            pos = explicit.end()
        elif char == ")" and open_round:
            scale(open_round.pop(), ROUND)
            pos += 1
        elif char == "]" and open_square:
            scale(open_square.pop(), SQUARE)
            pos += 1
        else:
            end = pos + 1  # a stray ")", "]" or ":" is one literal character; plain text runs on
            if char not in _SPECIAL:
                while end < len(text) and text[end] not in _SPECIAL:
                    end += 1
            for i, piece in enumerate(_BREAK.split(text[pos:end])):
                if i:
                    runs.append(list(BREAK_MARK))
                runs.append([piece, 1.0])
            pos = end

    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for piece, weight in runs or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged


def chunks(parsed: Sequence[tuple[str, float]], tokenize: Callable[[list[str]], list[list[int]]],
           comma_id: int, chunk_len: int = 75, backtrack: int = 20) -> list[tuple[list[int], list[float]]]:
    """Cut the token stream of parse()'s runs into chunks of at most chunk_len tokens (no start/end/pad).

    Each run is tokenized on its own (tokenize gets all run texts at once, without special tokens) and
    every token carries its run's weight. Rules, as A1111's sd_hijack_clip tokenize_line applies them:
    - A run that is exactly ("BREAK", -1.0) closes the current chunk, however short (even an empty one:
      a leading BREAK gives an empty first chunk).
    - Before a token is added to a chunk that already holds chunk_len tokens, the chunk is closed. If
      that token is not a comma, backtrack is non-zero, and the chunk's last comma sits at index c with
      chunk_len - c <= backtrack, the chunk is cut right after the comma instead and the tokens after it
      (with their weights) start the next chunk. A comma arriving at a full chunk never triggers this.
    - Closing a chunk forgets its comma; at the end, the open chunk is kept if it has tokens or if it
      would be the only chunk (a prompt without tokens gives one empty chunk).
    """
    return [(ids, weights) for ids, weights, _ in chunks_with_embeddings(parsed, tokenize, comma_id, {}, chunk_len,
                                                                         backtrack)]


def chunks_with_embeddings(parsed: Sequence[tuple[str, float]], tokenize: Callable[[list[str]], list[list[int]]],
                           comma_id: int, embeddings: dict[tuple[int, ...], tuple[str, int]], chunk_len: int = 75,
                           backtrack: int = 20) -> list[tuple[list[int], list[float], list[tuple[int, str]]]]:
    """chunks(), with textual-inversion embeddings as A1111's tokenize_line and EmbeddingDatabase place them.

    `embeddings` maps an embedding name's token ids (tokenized without special tokens) to (name, vectors).
    - At each position of a run, after the comma / full-chunk rules above, the embedding whose name ids start
      there is looked for, the longest name first. Found: if its vectors do not fit in what is left of the
      chunk, the chunk is closed first; then the chunk gets one placeholder token 0 per vector (all with the
      run's weight), a fix (offset of the first placeholder in the chunk's tokens, name), and the run goes on
      after the name's ids.
    - A comma cut moves tokens (placeholders included) to the next chunk but leaves every fix where it was:
      A1111 keeps `fixes` on the chunk object it closes.
    Returns (tokens, weights, fixes) per chunk.
    """
    done: list[tuple[list[int], list[float], list[tuple[int, str]]]] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str]] = []
    comma_at = -1
    by_length = sorted(embeddings.items(), key=lambda item: -len(item[0]))

    def close(keep: int) -> None:
        """Emit the first `keep` tokens (and every fix) as a chunk; the rest stay as the start of the next one."""
        nonlocal ids, weights, fixes, comma_at
        done.append((ids[:keep], weights[:keep], fixes))
        ids, weights, fixes, comma_at = ids[keep:], weights[keep:], [], -1

    for (piece, weight), piece_ids in zip(parsed, tokenize([piece for piece, _ in parsed]), strict=True):
        if (piece, weight) == BREAK_MARK:
            close(len(ids))
            continue
        pos = 0
        while pos < len(piece_ids):
            token = piece_ids[pos]
            if token == comma_id:
                comma_at = len(ids)
            elif backtrack and len(ids) == chunk_len and comma_at >= 0 and chunk_len - comma_at <= backtrack:
                close(comma_at + 1)
            if len(ids) == chunk_len:
                close(chunk_len)
            match = next(((name_ids, found) for name_ids, found in by_length
                          if tuple(piece_ids[pos:pos + len(name_ids)]) == name_ids), None)
            if match is None:
                ids.append(token)
                weights.append(weight)
                pos += 1
                continue
            name_ids, (name, vectors) = match
            if len(ids) + vectors > chunk_len:
                close(len(ids))
            fixes.append((len(ids), name))
            ids += [0] * vectors
            weights += [weight] * vectors
            pos += len(name_ids)
    if ids or not done:
        close(len(ids))
    return done


def chunk_ids(chunk_tokens: Sequence[int], chunk_weights: Sequence[float], start_id: int, end_id: int,
              pad_id: int, chunk_len: int = 75) -> tuple[list[int], list[float]]:
    """One chunk as the text encoder sees it: [start] + tokens + [end] + [pad] * rest, chunk_len + 2 long.

    Start, end and padding get weight 1.0. SD 1.x pads with the end token and SD 2.x / SDXL's OpenCLIP
    with id 0: pass the tokenizer's pad token as pad_id.
    """
    rest = chunk_len - len(chunk_tokens)
    if rest < 0:
        raise ValueError(f"chunk of {len(chunk_tokens)} tokens is longer than {chunk_len}")
    ids = [start_id, *chunk_tokens, end_id] + [pad_id] * rest
    weights = [1.0, *chunk_weights, 1.0] + [1.0] * rest
    return ids, weights


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk: z [B, T, C] scaled per token by weights [B, T], then the
    whole tensor rescaled so its mean (one scalar over every element, batch included) is what it was.
    The rescale divides by the new mean, so it is ill-conditioned when that mean is near 0 (e.g. a randomly
    initialised CLIP whose final LayerNorm has zero bias); A1111 applies it regardless."""
    before = z.mean()
    scaled = z * weights.to(z.dtype).unsqueeze(-1)
    return scaled * (before / scaled.mean())


def _comma_id(tokenizer) -> int:
    return tokenizer.get_vocab().get(",</w>", -1)


def _chunk_inputs(text: str, tokenizer) -> list[tuple[list[int], list[float]]]:
    """parse -> chunks -> chunk_ids with the tokenizer's own start/end/pad tokens."""
    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    return [chunk_ids(toks, ws, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            for toks, ws in chunks(parse(text), tokenize, _comma_id(tokenizer))]


@torch.no_grad()
def encode(text: str, tokenizer, text_encoder, hidden: str = "last") -> torch.Tensor:
    """The conditioning [1, 77 * chunks, C] of one prompt through a transformers CLIPTextModel or
    CLIPTextModelWithProjection: every chunk is encoded alone, emphasized, and the chunks are joined on
    the token axis. hidden="last" takes last_hidden_state (after the final layer norm); "penultimate"
    takes hidden_states[-2], the output of the second-to-last layer without the final norm (SDXL)."""
    if hidden not in ("last", "penultimate"):
        raise ValueError(f"hidden must be 'last' or 'penultimate', not {hidden!r}")
    device = next(text_encoder.parameters()).device
    parts = []
    for ids, weights in _chunk_inputs(text, tokenizer):
        out = text_encoder(input_ids=torch.tensor([ids], device=device),
                           output_hidden_states=hidden == "penultimate")
        z = out.last_hidden_state if hidden == "last" else out.hidden_states[-2]
        parts.append(emphasize(z, torch.tensor([weights], device=device)))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def encode_with_embeddings(text: str, tokenizer, text_encoder, vectors: dict[str, torch.Tensor],
                           hidden: str = "last") -> torch.Tensor:
    """encode() with textual-inversion embeddings (`vectors`: name -> [n, C]) named in the text. As A1111's
    EmbeddingsWithFixes, each fix's vectors replace the token embeddings from the placeholder on (cut at the
    chunk's end); here through a copy of the model whose vocabulary is extended by every vector, the way
    diffusers' load_textual_inversion adds tokens, so the model itself is never changed."""
    names = {tuple(tokenizer(name, add_special_tokens=False)["input_ids"]): (name, int(v.shape[0]))
             for name, v in vectors.items()}
    model = copy.deepcopy(text_encoder)
    first = model.get_input_embeddings().weight.shape[0]
    added: dict[str, int] = {}  # name -> id of its first vector in the extended vocabulary
    for name in vectors:
        added[name] = first + sum(int(vectors[n].shape[0]) for n in added)
    model.resize_token_embeddings(first + sum(int(v.shape[0]) for v in vectors.values()))
    table = model.get_input_embeddings().weight
    for name, v in vectors.items():
        table[added[name]:added[name] + v.shape[0]] = v.to(table)
    device = table.device

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    parts = []
    for toks, ws, fixes in chunks_with_embeddings(parse(text), tokenize, _comma_id(tokenizer), names):
        ids, weights = chunk_ids(toks, ws, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        for offset, name in fixes:
            n = min(int(vectors[name].shape[0]), len(ids) - 1 - (offset + 1))
            ids[offset + 1:offset + 1 + n] = range(added[name], added[name] + n)
        out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=hidden == "penultimate")
        z = out.last_hidden_state if hidden == "last" else out.hidden_states[-2]
        parts.append(emphasize(z, torch.tensor([weights], device=device)))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def encode_pooled(text: str, tokenizer, text_encoder) -> torch.Tensor:
    """SDXL's pooled vector [1, P]: text_embeds of a CLIPTextModelWithProjection for the FIRST chunk only,
    with no emphasis (A1111 keeps the pooled output from before emphasis is applied)."""
    device = next(text_encoder.parameters()).device
    ids, _ = _chunk_inputs(text, tokenizer)[0]
    return text_encoder(input_ids=torch.tensor([ids], device=device)).text_embeds


def pad_pair(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's pad_cond_uncond: when cond [B, T1, C] and uncond [B, T2, C] differ in length, the shorter gets
    (|T1 - T2| // 77) copies of `empty` (the encoded empty prompt, [1, 77, C]) appended on the token axis."""
    repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]

    def extend(x: torch.Tensor, times: int) -> torch.Tensor:
        return torch.cat([x, empty.to(x).repeat(x.shape[0], times, 1)], dim=1)

    if repeats > 0:
        uncond = extend(uncond, repeats)
    elif repeats < 0:
        cond = extend(cond, -repeats)
    return cond, uncond
