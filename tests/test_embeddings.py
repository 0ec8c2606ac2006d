"""Textual inversion (engine/embeddings.py, engine/prompts.py, export/families/token_embedding.py): the file layouts
read and refused; where an embedding's vectors go in a prompt's chunks, against the A1111 reference of
tests/a1111_prompts.py; the text encoders' outputs against that reference's encoding (a copy of the model with its
vocabulary extended, as diffusers' load_textual_inversion does); images against diffusers' own textual inversion; SDXL
(clip_l / clip_g) against diffusers' SDXL encode_prompt. None of it rebuilds an engine: the engines were built without
ever seeing an embedding."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine import prompts
from engine.embeddings import load_embeddings
from engine.pipeline import Pipeline
from engine.request import Request
from export.families import SDXL, SDXL_REFINER
from export.specs import CUSTOM_TOKEN
from tests import a1111_prompts as ref
from tests.helpers import max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

SIZE = 64
WIDTH = 32  # tiny's text encoder width
COUNTS = {"myemb": 2, "style-ink": 3, "zq": 1}  # name -> vectors; "style-ink" is several tokens


def vectors_of(seed: int, n: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory) -> Path:
    """One embedding of each SD layout: A1111's emb_params and string_to_param, diffusers' {token: tensor}."""
    d = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": vectors_of(1, 2)}, str(d / "myemb.safetensors"))
    save_file({"string_to_param.*": vectors_of(2, 3)}, str(d / "style-ink.safetensors"))
    save_file({"<zq>": vectors_of(3, 1)[0]}, str(d / "zq.safetensors"))  # 1-d: one vector
    (d / "myemb.preview.png").write_bytes(b"not an embedding")  # files beside them are left alone
    return d


# ---- files ----


def test_the_layouts_load_with_their_vectors_and_hashes(emb_dir):
    found = load_embeddings(emb_dir, {"clip": WIDTH}, {})
    assert {n: e.count for n, e in found.items()} == COUNTS
    for seed, name in enumerate(COUNTS, start=1):
        want = vectors_of(seed, COUNTS[name])
        assert torch.equal(found[name].vectors["clip"], want)
        assert found[name].shorthash == hashlib.sha256((emb_dir / f"{name}.safetensors").read_bytes()).hexdigest()[:12]


def test_sdxl_files_give_each_text_encoder_its_tensor(tmp_path):
    save_file({"clip_l": vectors_of(4, 2), "clip_g": vectors_of(5, 2, 64)}, str(tmp_path / "xl.safetensors"))
    both = load_embeddings(tmp_path, {"clip": WIDTH, "clip2": 64}, SDXL.embedding_keys)["xl"]
    assert torch.equal(both.vectors["clip"], vectors_of(4, 2)) and torch.equal(both.vectors["clip2"],
                                                                                 vectors_of(5, 2, 64))
    refiner = load_embeddings(tmp_path, {"clip2": 64}, SDXL_REFINER.embedding_keys)["xl"]
    assert list(refiner.vectors) == ["clip2"] and refiner.count == 2


BAD = {  # file -> (tensors or raw bytes, what the error says besides the file's path)
    "pickled.pt": (b"\x80\x04K\x01.", "a pickled embedding (.pt) is never loaded"),
    "two.safetensors": ({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, "unknown embedding layout"),
    "wide.safetensors": ({"emb_params": torch.zeros(2, 48)}, "vectors of width 48, the clip text encoder takes 32"),
    "junk.safetensors": (bytes(range(256)) * 4, "not a readable safetensors file"),
    "ints.safetensors": ({"emb_params": torch.zeros(2, WIDTH, dtype=torch.int32)}, "a float tensor"),
    "long.safetensors": ({"emb_params": torch.zeros(76, WIDTH)}, "an embedding has 1 to 75"),
    "xl.safetensors": ({"clip_l": torch.zeros(1, WIDTH), "clip_g": torch.zeros(1, 64)}, "unknown embedding layout"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_files_are_refused_naming_the_file(tmp_path, name):
    content, says = BAD[name]
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    else:
        save_file(content, str(tmp_path / name))
    with pytest.raises(ValueError, match=r"^" + str(tmp_path / name)) as caught:
        load_embeddings(tmp_path, {"clip": WIDTH}, {})
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_sdxl_refuses_sd_files_and_unequal_vector_counts(tmp_path):
    widths = {"clip": WIDTH, "clip2": 64}
    save_file({"emb_params": torch.zeros(2, WIDTH)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(ValueError, match="this model's embeddings have tensors clip_l, clip_g"):
        load_embeddings(tmp_path, widths, SDXL.embedding_keys)
    (tmp_path / "sd.safetensors").unlink()
    save_file({"clip_l": torch.zeros(2, WIDTH), "clip_g": torch.zeros(3, 64)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match=r"\[2, 3\] vectors"):
        load_embeddings(tmp_path, widths, SDXL.embedding_keys)


def test_two_files_of_one_name_and_a_missing_folder_are_refused(tmp_path, emb_dir):
    (tmp_path / "sub").mkdir()
    for where in (tmp_path, tmp_path / "sub"):
        save_file({"emb_params": torch.zeros(1, WIDTH)}, str(where / "twin.safetensors"))
    with pytest.raises(ValueError, match="embedding 'twin' is also"):
        load_embeddings(tmp_path, {"clip": WIDTH}, {})
    with pytest.raises(ValueError, match="is not a directory"):
        load_embeddings(tmp_path / "absent", {"clip": WIDTH}, {})


# ---- where the vectors go ----


def _a1111_texts() -> list[str]:
    filler = " ".join(["cat", "dog", "tree"] * 25)  # 75 tokens
    return ["a photo of myemb", "(style-ink:1.3) cat, [myemb] myemb zq", "myembx and style ink", "zq BREAK style-ink",
            "word " * 74 + "style-ink tail",  # 3 vectors do not fit after 74 tokens: they open the next chunk
            "word " * 73 + "myemb tail",  # 2 vectors fit exactly
            filler + " myemb " + filler, "((myemb)) " * 40]


def test_chunks_with_embeddings_match_a1111(tiny_folder):
    from transformers import CLIPTokenizer

    from engine.tokenizer import load_tokenizer

    theirs = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    ours = load_tokenizer(tiny_folder / "tokenizer")
    index = prompts.EmbeddingIndex.of(prompts.pieces(ours), COUNTS)
    names = {tuple(theirs(n, add_special_tokens=False)["input_ids"]): (n, c) for n, c in COUNTS.items()}

    def tokenize(texts: list[str]) -> list[list[int]]:
        return theirs(texts, truncation=False, add_special_tokens=False)["input_ids"]

    for text in _a1111_texts():
        got = prompts.text_chunks(text, ours, "a1111", embeddings=index)
        want = ref.chunks_with_embeddings(ref.parse(text), tokenize, ref._comma_id(theirs), names)
        full = [ref.chunk_ids(t, w, theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) for t, w, _ in want]
        assert [[0 if i == CUSTOM_TOKEN else i for i in ids] for ids in got.ids] == [ids for ids, _ in full], text
        assert got.weights == [w for _, w in full], text
        assert got.fixes == [[(offset + 1 + v, name, v) for offset, name in fixes for v in range(COUNTS[name])]
                             for _, _, fixes in want], text
        assert all(ids[p] == CUSTOM_TOKEN for ids, fixes in zip(got.ids, got.fixes, strict=True) for p, _, _ in fixes)
    assert len(prompts.text_chunks(_a1111_texts()[4], ours, "a1111", embeddings=index).ids) == 2
    assert prompts.text_chunks("a photo of myemb", ours, "a1111").fixes == [[]]  # no index: the name is text


def test_a_comma_cut_moves_an_embedding_with_its_slots(tiny_folder):
    """Where A1111 leaves the vectors of an embedding that a comma cut moved behind (the reference keeps that fix on
    the first chunk, past its tokens), we move them with their slots."""
    from transformers import CLIPTokenizer

    from engine.tokenizer import load_tokenizer

    theirs = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    ours = load_tokenizer(tiny_folder / "tokenizer")
    text = "word " * 70 + ", myemb more words and more"  # comma at 70, myemb at 71-72; "and" finds the chunk full
    got = prompts.text_chunks(text, ours, "a1111", embeddings=prompts.EmbeddingIndex.of(prompts.pieces(ours), COUNTS))
    want = ref.chunks_with_embeddings(ref.parse(text), lambda t: theirs(t, add_special_tokens=False)["input_ids"],
                                      ref._comma_id(theirs), {tuple(theirs("myemb", add_special_tokens=False)
                                                                    ["input_ids"]): ("myemb", 2)})
    assert [len(t) for t, _, _ in want] == [71, 6] and want[0][2] == [(71, "myemb")] and want[1][2] == []
    assert got.fixes == [[], [(1, "myemb", 0), (2, "myemb", 1)]] and got.ids[1][1:3] == [CUSTOM_TOKEN] * 2


def test_plain_syntax_places_embeddings_and_truncates_through_them(tiny_folder):
    from engine.tokenizer import load_tokenizer

    ours = load_tokenizer(tiny_folder / "tokenizer")
    index = prompts.EmbeddingIndex.of(prompts.pieces(ours), COUNTS)
    got = prompts.text_chunks("(a) photo of myemb", ours, "plain", embeddings=index)
    words = ours("(a) photo of").input_ids[:-1]
    assert got.ids[0][:len(words) + 3] == [*words, CUSTOM_TOKEN, CUSTOM_TOKEN, 49407] and got.weights == [[1.0] * 77]
    assert got.fixes == [[(len(words), "myemb", 0), (len(words) + 1, "myemb", 1)]]
    cut = prompts.text_chunks("word " * 74 + "style-ink", ours, "plain", embeddings=index)  # 1 of 3 vectors fits
    assert cut.fixes == [[(75, "style-ink", 0)]] and cut.ids[0][75:] == [CUSTOM_TOKEN, 49407]


# ---- what the text encoders make of them ----


@pytest.fixture(scope="module")
def weighted_ti(weighted_engines, emb_dir):
    pipe = Pipeline.load(weighted_engines, embeddings=emb_dir)
    yield pipe
    pipe.close()


def test_encodings_match_the_a1111_reference(weighted_ti, weighted_folder):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(weighted_folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(weighted_folder / "text_encoder").eval()
    vectors = {name: e.vectors["clip"] for name, e in weighted_ti.text.embeddings.items()}
    for text in [*_a1111_texts()[:2], _a1111_texts()[4], _a1111_texts()[6]]:
        rows = weighted_ti.prepare(Request(prompt=text, guidance_scale=1.0, height=SIZE, width=SIZE)).rows()
        got = weighted_ti.text.encode(rows, cfg=False)["clip"][prompts.HIDDEN]
        torch.testing.assert_close(got, ref.encode_with_embeddings(text, tokenizer, encoder, vectors), atol=2e-5,
                                   rtol=1e-4, msg=text)
    plain = weighted_ti.prepare(Request(prompt="a photo of myemb", guidance_scale=1.0, height=SIZE, width=SIZE))
    without = weighted_ti.prepare(Request(prompt="a photo of zzz", guidance_scale=1.0, height=SIZE, width=SIZE))
    differ = [weighted_ti.text.encode(p.rows(), cfg=False)["clip"][prompts.HIDDEN] for p in (plain, without)]
    assert (differ[0] - differ[1]).abs().max() > 0.1  # the vectors reach the output


def test_images_match_diffusers_textual_inversion_and_record_ti_hashes(ort_engines, tiny_folder, emb_dir):
    """diffusers' load_textual_inversion on the same file (tokens myemb, myemb_1) against our plain-syntax prompt;
    the image records A1111's `TI hashes`."""
    from diffusers import StableDiffusionPipeline

    from engine.png import parameters_text
    from tests.a1111 import parse_a1111

    pipe = Pipeline.load(ort_engines, embeddings=emb_dir)
    sd = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None, requires_safety_checker=False,
                                                 local_files_only=True)
    sd.set_progress_bar_config(disable=True)
    sd.load_textual_inversion(str(emb_dir / "myemb.safetensors"), token="myemb")
    sd.scheduler = diffusers_scheduler("euler", pipe.scheduler_config)
    try:
        prompt, negative = "a photo of myemb on a hill", "blurry, myemb"
        reqs = [Request(prompt=prompt, negative_prompt=negative, prompt_syntax=s, steps=4, sampler="euler", seed=3,
                        height=SIZE, width=SIZE) for s in ("plain", "a1111")]
        got = pipe.run(reqs, progress=False)
        want = to_uint8(sd(prompt, negative_prompt=negative, num_inference_steps=4, height=SIZE, width=SIZE,
                           output_type="np", generator=torch.Generator().manual_seed(3)).images)
        assert max_diff(stack_pixels(got), np.concatenate([want, want])) <= 2  # no weights: both syntaxes alike
        plain = Pipeline.load(ort_engines)  # no embeddings: "myemb" is text
        try:
            assert max_diff(stack_pixels(plain.run(reqs[:1], progress=False)), want) > 8
        finally:
            plain.close()
        digest = hashlib.sha256((emb_dir / "myemb.safetensors").read_bytes()).hexdigest()[:12]
        assert parse_a1111(parameters_text(got[0].params))["TI hashes"] == f"myemb: {digest}"
    finally:
        pipe.close()


def test_sdxl_embeddings_match_diffusers_encode_prompt(xl_engines, xl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = Pipeline.load(xl_engines)
    widths = pipe.text.widths
    pipe.close()
    clip_l, clip_g = vectors_of(6, 2, widths["clip"]), vectors_of(7, 2, widths["clip2"])
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xlemb.safetensors"))
    pipe = Pipeline.load(xl_engines, embeddings=tmp_path)
    sd = StableDiffusionXLPipeline.from_pretrained(xl_folder, local_files_only=True)
    sd.load_textual_inversion({"xlemb": clip_l}, token="xlemb", text_encoder=sd.text_encoder, tokenizer=sd.tokenizer)
    sd.load_textual_inversion({"xlemb": clip_g}, token="xlemb", text_encoder=sd.text_encoder_2,
                              tokenizer=sd.tokenizer_2)
    try:
        text = "a photo of xlemb by the sea"
        rows = pipe.prepare(Request(prompt=text, prompt_syntax="plain", guidance_scale=1.0, height=SIZE,
                                    width=SIZE)).rows()
        got = pipe.family.conditioning(pipe.text.encode(rows, cfg=False))
        with torch.no_grad():
            hidden, _, pooled, _ = sd.encode_prompt(text, do_classifier_free_guidance=False)
        torch.testing.assert_close(got["encoder_hidden_states"], hidden, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got["text_embeds"], pooled, atol=2e-5, rtol=1e-4)
    finally:
        pipe.close()
