"""engine/tokenizer.py: the `tokenizers`-only CLIP tokenizer gives transformers' CLIPTokenizer ids exactly."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import CLIPTokenizer

from engine.tokenizer import ClipTokenizer, load_tokenizer
from export.tokenizer import DATA_DIR, default_tokenizer, sdxl_tokenizer_2

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    " ",
    "  Hello,   WORLD!!  \n\t tabs and\nnewlines ",
    "naïve café — 東京 🚀 emoji, Ünïcödé ﬁ ligature, e\u0301 combining",
    "it's don't we'll they've I'm you'd 123 4567 x1y2 3.14159",
    "<|startoftext|> and <|endoftext|> inside a prompt",
    "word " * 200,  # far past 77 tokens: truncated
    "a" * 400,  # one long word
    " ".join(f"w{i}" for i in range(74)),  # around the 75-token content limit
    " ".join(f"w{i}" for i in range(75)),
    " ".join(f"w{i}" for i in range(76)),
    "(masterpiece:1.2), [best quality], {detailed} | lora:<x:0.5>",
    "Ελληνικά, русский, العربية, हिन्दी, 한국어",
]


def _folder(tmp_path, tokenizer, name="tokenizer"):
    folder = tmp_path / name
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=["tokenizer", "tokenizer_2"])
def pair(request, tmp_path):
    """(ours, transformers') loaded from the same folder: SD's tokenizer, and SDXL's tokenizer_2 (pads with "!")."""
    folder = _folder(tmp_path, default_tokenizer() if request.param == "tokenizer" else sdxl_tokenizer_2())
    ours = load_tokenizer(folder)
    assert isinstance(ours, ClipTokenizer)
    return ours, CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def test_ids_equal_transformers_one_prompt_at_a_time(pair):
    ours, ref = pair
    for p in PROMPTS:
        assert ours(p).input_ids == ref(p).input_ids, p


@pytest.mark.parametrize("max_length", [77, 8])
def test_padded_truncated_batches_equal_transformers(pair, max_length):
    ours, ref = pair
    kw = dict(padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    got, want = ours(PROMPTS, **kw).input_ids, ref(PROMPTS, **kw).input_ids
    assert got.dtype == torch.int64 and got.shape == (len(PROMPTS), max_length)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert ours.pad_token_id == ref.pad_token_id and ours.model_max_length == ref.model_max_length
    # the settings of a padded call do not leak into the next plain call
    assert ours(PROMPTS[7]).input_ids == ref(PROMPTS[7]).input_ids and len(ours(PROMPTS[7]).input_ids) > 77


def _token_dict(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def _vocab_folder(tmp_path, pad: str, name: str):
    """A tokenizer folder as Hugging Face's SD 1.5 / SDXL repositories ship it: vocab.json + merges.txt, no
    tokenizer.json; special tokens as AddedToken dicts in tokenizer_config.json and special_tokens_map.json."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copyfile(DATA_DIR / "clip_vocab.json", folder / "vocab.json")
    shutil.copyfile(DATA_DIR / "clip_merges.txt", folder / "merges.txt")
    special = {"bos_token": _token_dict("<|startoftext|>"), "eos_token": _token_dict("<|endoftext|>"),
               "unk_token": _token_dict("<|endoftext|>"), "pad_token": pad}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "tokenizer_class": "CLIPTokenizer", **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_a_vocab_and_merges_folder_loads_fast_with_transformers_ids(tmp_path, pad):
    folder = _vocab_folder(tmp_path, pad, "tokenizer")
    ours, ref = load_tokenizer(folder), CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert isinstance(ours, ClipTokenizer)
    for p in PROMPTS:
        assert ours(p).input_ids == ref(p).input_ids, p
    kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    torch.testing.assert_close(ours(PROMPTS, **kw).input_ids, ref(PROMPTS, **kw).input_ids, atol=0, rtol=0)


def test_other_folders_load_with_transformers(tmp_path):
    no_merges = _vocab_folder(tmp_path, "<|endoftext|>", "no_merges")
    (no_merges / "merges.txt").unlink()  # transformers generates merges from the vocabulary: its business
    assert ClipTokenizer.from_folder(no_merges) is None
    extra = _vocab_folder(tmp_path, "<|endoftext|>", "extra")
    config = json.loads((extra / "tokenizer_config.json").read_text())
    (extra / "tokenizer_config.json").write_text(json.dumps({**config, "additional_special_tokens": ["<x>"]}))
    assert ClipTokenizer.from_folder(extra) is None
    other = _vocab_folder(tmp_path, "<|endoftext|>", "other")
    (other / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))  # disagrees with the config
    assert ClipTokenizer.from_folder(other) is None
    assert isinstance(load_tokenizer(other), CLIPTokenizer)


def test_a_tokenizer_json_with_another_pipeline_loads_with_transformers(tmp_path):
    folder = _folder(tmp_path, default_tokenizer())
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}  # no lowercasing
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    assert ClipTokenizer.from_folder(folder) is None
    assert isinstance(load_tokenizer(folder), CLIPTokenizer)
