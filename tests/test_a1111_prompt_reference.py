"""Checks of the A1111 prompt reference (tests/a1111_prompts.py) against expectations written by hand from
A1111's documentation: the parse_prompt_attention docstring in modules/prompt_parser.py, the wiki's
Attention/emphasis cheat sheet, and the chunking / emphasis / padding rules of sd_hijack_clip.py,
sd_emphasis.py and sd_samplers_cfg_denoiser.py."""
from __future__ import annotations

import pytest
import torch

from tests.a1111_prompts import chunk_ids, chunks, emphasize, encode, encode_pooled, pad_pair, parse

COMMA = 0  # the comma id for the numeric tokenizer below


def numbers(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer whose ids can be read off the prompt: "12" -> 12, "," -> COMMA, any other word -> 99."""
    return [[COMMA if word == "," else int(word) if word.isdigit() else 99 for word in text.split()] for text in texts]


def words(first: int, last: int) -> str:
    return " ".join(str(i) for i in range(first, last + 1))


def ids_of(result: list[tuple[list[int], list[float]]]) -> list[list[int]]:
    return [ids for ids, _ in result]


# --- parse: the examples in parse_prompt_attention's docstring, exactly -------------------------------------

@pytest.mark.parametrize("prompt, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_parse_docstring_examples(prompt, expected):
    assert parse(prompt) == expected


# --- parse: the wiki cheat sheet and the rules the brief names -----------------------------------------------

@pytest.mark.parametrize("prompt, expected", [
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.21)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("(abc)", [("abc", 1.1)]),
    ("[abc]", [("abc", 1 / 1.1)]),
    ("((abc))", [("abc", 1.21)]),
    ("[[abc]]", [("abc", 1 / 1.21)]),
    ("([abc])", [("abc", 1.0)]),
    ("((abc:2))", [("abc", 2.2)]),
    ("(abc: 2 )", [("abc", 2.0)]),  # blanks around an explicit weight are allowed
    ("[abc:2]", [("abc:2", 1 / 1.1)]),  # an explicit weight only works with round brackets
    ("a (word) b", [("a ", 1.0), ("word", 1.1), (" b", 1.0)]),
])
def test_parse_weights(prompt, expected):
    got = parse(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected], rel=1e-12)


@pytest.mark.parametrize("prompt, expected", [
    ("", [("", 1.0)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    ("anime_\\(character\\)", [("anime_(character)", 1.0)]),
    ("\\[x\\] \\\\", [("[x] \\", 1.0)]),
    ("\\(literal\\)", [("(literal)", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before an ordinary character is dropped
    ("a) b] c", [("a) b] c", 1.0)]),  # closers with nothing open are text
    ("x:1.5) y", [("x:1.5) y", 1.0)]),  # so is an explicit weight with no "(" open
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),  # the blanks around BREAK go with it
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a break b", [("a break b", 1.0)]),  # BREAK must be uppercase ...
    ("BREAKING x_BREAK", [("BREAKING x_BREAK", 1.0)]),  # ... and a word of its own
    ("a BREAK, b", [("a", 1.0), ("BREAK", -1.0), (", b", 1.0)]),
])
def test_parse_literals_and_break(prompt, expected):
    assert parse(prompt) == expected


def test_break_inside_brackets_is_scaled_like_any_run():
    # A1111 scales the marker too, so "(a BREAK b)" carries ("BREAK", -1.1): no longer a BREAK for chunks()
    got = parse("(a BREAK b)")
    assert [text for text, _ in got] == ["a", "BREAK", "b"]
    assert [weight for _, weight in got] == pytest.approx([1.1, -1.1, 1.1])
    assert ids_of(chunks([("1", 1.1), ("BREAK", -1.1), ("2", 1.1)], lambda t: [[1], [99], [2]], COMMA)) \
        == [[1, 99, 2]]


# --- chunks ----------------------------------------------------------------------------------------------------

def test_150_tokens_cut_after_a_comma_within_20_tokens():
    # tokens 1..60, a comma (index 60), 61..149 = 150 tokens. When token 75 finds the chunk full, the comma is
    # 75 - 60 = 15 <= 20 from its end: chunk 1 ends at the comma, 61..74 move on, chunk 2 fills to 75 tokens.
    prompt = words(1, 60) + " , " + words(61, 149)
    result = chunks(parse(prompt), numbers, COMMA)
    assert ids_of(result) == [list(range(1, 61)) + [COMMA], list(range(61, 136)), list(range(136, 150))]
    assert [len(w) for _, w in result] == [61, 75, 14]
    assert all(w == [1.0] * len(ids) for ids, w in result)


def test_backtrack_limit_is_inclusive():
    at_20 = chunks(parse(words(1, 55) + " , " + words(56, 100)), numbers, COMMA)  # comma at index 55
    assert ids_of(at_20) == [list(range(1, 56)) + [COMMA], list(range(56, 101))]
    at_21 = chunks(parse(words(1, 54) + " , " + words(55, 100)), numbers, COMMA)  # comma at index 54
    assert ids_of(at_21) == [list(range(1, 55)) + [COMMA] + list(range(55, 75)), list(range(75, 101))]


def test_no_backtrack_when_disabled_or_when_the_comma_is_the_overflowing_token():
    prompt = words(1, 60) + " , " + words(61, 80)
    assert ids_of(chunks(parse(prompt), numbers, COMMA, backtrack=0)) == [
        list(range(1, 61)) + [COMMA] + list(range(61, 75)), list(range(75, 81))]
    # 75 tokens, then a comma arrives: A1111 records it and closes the full chunk without cutting
    prompt = words(1, 60) + " , " + words(61, 74) + " , 75"
    assert ids_of(chunks(parse(prompt), numbers, COMMA)) == [
        list(range(1, 61)) + [COMMA] + list(range(61, 75)), [COMMA, 75]]


def test_exactly_75_tokens_is_one_chunk():
    assert ids_of(chunks(parse(words(1, 75)), numbers, COMMA)) == [list(range(1, 76))]
    assert ids_of(chunks(parse(words(1, 76)), numbers, COMMA)) == [list(range(1, 76)), [76]]


def test_break_closes_a_short_chunk():
    assert chunks(parse("1 2 BREAK 3"), numbers, COMMA) == [([1, 2], [1.0, 1.0]), ([3], [1.0])]
    assert ids_of(chunks(parse("BREAK 3"), numbers, COMMA)) == [[], [3]]  # a leading BREAK: empty chunk
    assert ids_of(chunks(parse("3 BREAK"), numbers, COMMA)) == [[3]]  # a trailing one adds nothing
    assert ids_of(chunks(parse("1 BREAK BREAK 2"), numbers, COMMA)) == [[1], [], [2]]


def test_empty_prompt_is_one_empty_chunk():
    assert chunks(parse(""), numbers, COMMA) == [([], [])]


def test_weights_follow_their_tokens():
    assert chunks(parse("(1 2:1.5) [3] 4"), numbers, COMMA) == [([1, 2, 3, 4], [1.5, 1.5, 1 / 1.1, 1.0])]


def test_chunks_with_clip_tokenizer(tokenizer):
    def tokenize(texts):
        return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    comma = tokenizer.get_vocab()[",</w>"]
    # "cat" and "," are one CLIP token each: 60 cats, a comma, 89 cats -> chunks of 61, 75 and 14 tokens
    result = chunks(parse("cat " * 60 + ", " + "cat " * 89), tokenize, comma)
    assert [len(ids) for ids, _ in result] == [61, 75, 14]
    assert result[0][0][-1] == comma
    result = chunks(parse("a cat BREAK (a dog)"), tokenize, comma)
    assert [len(ids) for ids, _ in result] == [2, 2]
    assert result[1][1] == pytest.approx([1.1, 1.1])


# --- chunk_ids, emphasize, pad_pair ----------------------------------------------------------------------------

def test_chunk_ids_pads_to_77_with_the_given_pad():
    ids, weights = chunk_ids([5, 6], [1.5, 0.5], start_id=49406, end_id=49407, pad_id=0)
    assert ids == [49406, 5, 6, 49407] + [0] * 73
    assert weights == [1.0, 1.5, 0.5, 1.0] + [1.0] * 73
    ids, _ = chunk_ids([], [], 49406, 49407, 49407)
    assert ids == [49406] + [49407] * 76


def test_emphasis_scales_tokens_and_keeps_the_mean():
    z = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    # scaled: [1, 1], [4, 4], [3, 3] -> mean 8/3; original mean 2 -> everything times 3/4
    out = emphasize(z, torch.tensor([[1.0, 2.0, 1.0]]))
    assert out.tolist() == [[[0.75, 0.75], [3.0, 3.0], [2.25, 2.25]]]
    z = torch.randn(1, 77, 8) + 0.5
    out = emphasize(z, torch.rand(1, 77) + 0.5)
    assert out.mean().item() == pytest.approx(z.mean().item(), rel=1e-4)
    assert torch.allclose(emphasize(z, torch.ones(1, 77)), z)


def test_pad_pair_extends_the_shorter_with_empty():
    empty = torch.full((1, 77, 4), 7.0)
    cond, uncond = pad_pair(torch.zeros(1, 154, 4), torch.ones(1, 77, 4), empty)
    assert cond.shape == uncond.shape == (1, 154, 4)
    assert torch.equal(uncond[:, :77], torch.ones(1, 77, 4)) and torch.equal(uncond[:, 77:], empty)
    cond, uncond = pad_pair(torch.zeros(2, 77, 4), torch.ones(2, 231, 4), empty)
    assert cond.shape == (2, 231, 4) and torch.equal(cond[:, 77:], empty.repeat(2, 2, 1))
    cond, uncond = pad_pair(torch.zeros(1, 77, 4), torch.ones(1, 77, 4), empty)
    assert cond.shape == uncond.shape == (1, 77, 4)


# --- encode with a tiny CLIP text model --------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 16-wide model is slower on many threads than on one (0.15 s against 1 ms a forward on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from export.tokenizer import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=8,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = CLIPTextModelWithProjection(config).eval()
    # a freshly initialised final LayerNorm gives every token a mean of ~0, so the overall mean that emphasis
    # divides by would be noise; a real CLIP's LayerNorm bias keeps it well away from 0
    model.text_model.final_layer_norm.bias.data.normal_(0.5, 0.2)
    return model


def raw(clip, ids: list[int], hidden: str = "last") -> torch.Tensor:
    with torch.no_grad():
        out = clip(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.last_hidden_state if hidden == "last" else out.hidden_states[-2]


def test_encode_one_chunk_matches_the_model(tokenizer, clip):
    ids = [49406, *tokenizer("a cat", add_special_tokens=False)["input_ids"], 49407] + [49407] * 73
    assert torch.allclose(encode("a cat", tokenizer, clip), raw(clip, ids), atol=1e-6)
    assert torch.allclose(encode("a cat", tokenizer, clip, hidden="penultimate"), raw(clip, ids, "penultimate"),
                          atol=1e-6)
    weights = torch.tensor([[1.0, 1.0, 1.5] + [1.0] * 74])
    assert torch.allclose(encode("a (cat:1.5)", tokenizer, clip), emphasize(raw(clip, ids), weights), atol=1e-6)
    from export.tokenizer import sdxl_tokenizer_2  # pads with "!" (id 0), as SD 2.x / SDXL's OpenCLIP does

    ids = ids[:4] + [0] * 73
    assert torch.allclose(encode("a cat", sdxl_tokenizer_2(), clip), raw(clip, ids), atol=1e-6)


def test_encode_chunks_are_independent(tokenizer, clip):
    both = encode("a cat BREAK a dog", tokenizer, clip)
    assert both.shape == (1, 154, 16)
    assert torch.allclose(both[:, :77], encode("a cat", tokenizer, clip), atol=1e-6)
    assert torch.allclose(both[:, 77:], encode("a dog", tokenizer, clip), atol=1e-6)
    assert encode("", tokenizer, clip).shape == (1, 77, 16)
    assert encode("cat " * 100, tokenizer, clip).shape == (1, 154, 16)  # 100 tokens -> 2 chunks


def test_encode_pooled_uses_the_first_chunk(tokenizer, clip):
    pooled = encode_pooled("a cat BREAK a dog", tokenizer, clip)
    assert pooled.shape == (1, 8)
    assert torch.allclose(pooled, encode_pooled("a cat", tokenizer, clip), atol=1e-6)
    assert not torch.allclose(pooled, encode_pooled("a dog", tokenizer, clip), atol=1e-6)
