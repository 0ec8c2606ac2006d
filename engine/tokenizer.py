"""CLIP tokenizers from an engine dir, without importing transformers when the folder allows it.

`load_tokenizer(folder)` builds the tokenizer with the `tokenizers` library directly (`ClipTokenizer`) from
the folder's `tokenizer.json` when that file holds exactly the pipeline transformers' `CLIPTokenizer` builds
(a BPE model with the `</w>` suffix, CLIP's normalizer, pre-tokenizer and bos/eos post-processor), or from
`vocab.json` + `merges.txt` (Hugging Face's SD 1.5 / SDXL folders) the way `CLIPTokenizer` builds it; the
special tokens of tokenizer_config.json are registered as transformers registers them. The ids are then
transformers' ids (tests/test_tokenizer.py compares them: long, truncated and unicode prompts, SDXL's "!"
padding). Any other folder (other added tokens, special tokens that disagree, another pipeline, no merges)
is loaded with transformers' `CLIPTokenizer`, as before.

`ClipTokenizer` implements the part of the transformers call the engine uses:
``tok(text_or_texts, padding=False | "max_length", max_length=None, truncation=False, return_tensors=None)``
returning an object with `input_ids` (a list, a list of lists, or an int64 tensor with "pt").
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when the config names none

# the pieces of CLIP's pipeline, as transformers' CLIPTokenizer sets them (tokenizers' JSON form)
_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "Lowercase"}]}
_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
                                           r"[\p{N}]|[^\s\p{L}\p{N}]+"},
     "behavior": "Removed", "invert": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
_BPE = {"type": "BPE", "dropout": None, "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
        "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
_DEFAULTS = {"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"}

log = logging.getLogger("engine.tokenizer")


@dataclass
class Encoding:
    input_ids: Any  # list[int], list[list[int]] or an int64 tensor [B, L]


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict[str, Any]) -> dict[str, str] | None:
    tokens = {k: _token(config.get(k, v)) for k, v in _DEFAULTS.items()}
    return tokens if all(tokens.values()) else None  # type: ignore[return-value]


def _from_vocab(folder: Path, tokens: dict[str, str]):
    """CLIP's pipeline over vocab.json + merges.txt, built as transformers' CLIPTokenizer builds it (the
    post-processor is added once the special tokens have ids)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=str(folder / VOCAB_FILE), merges=str(folder / MERGES_FILE), dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                        unk_token=tokens["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_TOKENIZER["pretokenizers"][0]["pattern"]["Regex"]), behavior="removed",
                             invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _only_known_added_tokens(config: dict[str, Any], tok, tokens: dict[str, str]) -> bool:
    """False when tokenizer_config.json names added or extra special tokens beyond bos/eos/unk/pad and those
    tokenizer.json already has (transformers would register them: that folder is left to transformers)."""
    if config.get("additional_special_tokens") or config.get("extra_special_tokens"):
        return False
    known = set(tokens.values()) | {t.content for t in tok.get_added_tokens_decoder().values()}
    decoder = config.get("added_tokens_decoder") or {}
    return isinstance(decoder, dict) and all(_token(v) in known for v in decoder.values())


def _state(component) -> Any:
    """A tokenizers pipeline component in its JSON form (what tokenizer.json holds for it)."""
    return None if component is None else json.loads(component.__getstate__())


def _is_clip_pipeline(tok, tokens: dict[str, str], ids: dict[str, int | None]) -> bool:
    """True when the tokenizer is the pipeline transformers' CLIPTokenizer builds from its vocabulary."""
    model = tok.model
    post = _state(tok.post_processor) or {}
    return (type(model).__name__ == "BPE" and all(getattr(model, k, None) == v for k, v in _BPE.items() if k != "type")
            and model.unk_token == tokens["unk_token"]
            and _state(tok.normalizer) == _NORMALIZER and _state(tok.pre_tokenizer) == _PRE_TOKENIZER
            and post.get("type") == "RobertaProcessing" and post.get("trim_offsets") is False
            and post.get("add_prefix_space") is False
            and post.get("cls") == [tokens["bos_token"], ids["bos_token"]]
            and post.get("sep") == [tokens["eos_token"], ids["eos_token"]]
            and all(i is not None for i in ids.values()))


class ClipTokenizer:
    """transformers' CLIPTokenizer encoding, run by the `tokenizers` library (no transformers import)."""

    def __init__(self, tokenizer, pad_token: str, model_max_length: int):
        self._tok = tokenizer  # tokenizers.Tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self._lock = threading.Lock()  # truncation / padding are settings of the shared Tokenizer
        self.pad_token = pad_token
        self.pad_token_id = tokenizer.token_to_id(pad_token)
        self.model_max_length = model_max_length

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipTokenizer | None:
        """The fast tokenizer of a CLIP tokenizer folder (tokenizer.json holding CLIP's pipeline, or vocab.json +
        merges.txt); None for any other folder (left to transformers)."""
        folder = Path(folder)
        try:
            config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
            special_map = (json.loads((folder / SPECIAL_TOKENS_MAP).read_text(encoding="utf-8"))
                           if (folder / SPECIAL_TOKENS_MAP).is_file() else {})
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or not isinstance(special_map, dict):
            return None
        tokens = _special_tokens(config)
        if (tokens is None or config.get("tokenizer_class", "CLIPTokenizer") not in ("CLIPTokenizer", "CLIPTokenizerFast")
                or any(k in special_map and _token(special_map[k]) != v for k, v in tokens.items())):
            return None  # special tokens named differently in two places: transformers decides
        try:
            if (folder / TOKENIZER_FILE).is_file():
                from tokenizers import Tokenizer

                tok = Tokenizer.from_str((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))
            elif (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file():
                tok = _from_vocab(folder, tokens)
            else:
                return None
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own types; any means "not ours"
            log.info("%s: not loadable with the tokenizers library (%s: %s); transformers will load it", folder,
                     type(exc).__name__, exc)
            return None
        if not _only_known_added_tokens(config, tok, tokens):
            return None
        # transformers registers the config's special tokens as special added tokens (SDXL's tokenizer_2 pads
        # with "!", which is then split off as a token of its own wherever it appears in a prompt)
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(t, rstrip=False, lstrip=False, single_word=False, normalized=False,
                                           special=True) for t in dict.fromkeys(tokens.values())])
        ids = {k: tok.token_to_id(v) for k, v in tokens.items()}
        if tok.post_processor is None and all(i is not None for i in ids.values()):  # built from vocab + merges
            from tokenizers import processors

            tok.post_processor = processors.RobertaProcessing((tokens["eos_token"], ids["eos_token"]),
                                                              (tokens["bos_token"], ids["bos_token"]), False, False)
        if not _is_clip_pipeline(tok, tokens, ids):
            return None
        max_length = config.get("model_max_length", VERY_LARGE_INTEGER)
        return cls(tok, tokens["pad_token"], int(max_length) if isinstance(max_length, (int, float)) else
                   VERY_LARGE_INTEGER)

    def __call__(self, text: str | list[str], padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None) -> Encoding:
        texts = [text] if isinstance(text, str) else list(text)
        if padding not in (False, "do_not_pad", "max_length") or return_tensors not in (None, "pt"):
            raise ValueError(f"ClipTokenizer supports padding=False/'max_length' and return_tensors=None/'pt', "
                             f"not {padding!r} / {return_tensors!r}")
        length = max_length if max_length is not None else self.model_max_length
        with self._lock:
            if truncation:
                self._tok.enable_truncation(length)
            if padding == "max_length":
                self._tok.enable_padding(length=length, pad_id=self.pad_token_id, pad_token=self.pad_token)
            try:
                ids = [e.ids for e in self._tok.encode_batch(texts)]
            finally:
                self._tok.no_truncation()
                self._tok.no_padding()
        if return_tensors == "pt":
            import torch

            return Encoding(torch.tensor(ids, dtype=torch.int64))
        return Encoding(ids[0] if isinstance(text, str) else ids)


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer: a `ClipTokenizer` where tokenizer.json allows, else transformers' CLIPTokenizer; a BERT
    tokenizer folder (the LDM paper's text model, LDMBert) with transformers' BertTokenizerFast."""
    fast = ClipTokenizer.from_folder(folder)
    if fast is not None:
        return fast
    if _tokenizer_class(Path(folder)).startswith("BertTokenizer"):
        from transformers import BertTokenizerFast

        return BertTokenizerFast.from_pretrained(folder, local_files_only=True)
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _tokenizer_class(folder: Path) -> str:
    """tokenizer_config.json's `tokenizer_class` ("" when the file or the key is missing or unreadable)."""
    try:
        config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(config.get("tokenizer_class", "")) if isinstance(config, dict) else ""
