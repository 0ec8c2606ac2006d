"""Prompts as A1111 reads them (engine/prompts.py), against the independent reference of tests/a1111_prompts.py:
the parse and the chunks of many prompts, and images: diffusers' StableDiffusionPipeline fed the reference's
embeddings (`prompt_embeds`) against our engines, ≤ 2/255, on `tiny` with its text encoder's final LayerNorm bias
moved off zero (a random CLIP's hidden states have a mean near 0, where A1111's emphasis divides by it): weights,
long prompts in chunks, BREAK, prompt and negative of different chunk counts (padded as A1111's pad_cond_uncond).
Rows of other chunk counts run in other batches, each equal to its run alone. Plain prompts give the images of
`--prompt-syntax plain` bit for bit; bad syntax and over-long prompts are named."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine import prompts
from engine.request import Request, RequestError
from tests import a1111_prompts as ref
from tests.helpers import max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

SIZE = 64
PARSED = [  # A1111's documented examples and its quirks, each parsed by both
    "normal text", "an (important) word", "(unbalanced", r"\(literal\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "[[faint]] ((strong))", "(a [b] c:0.8) d",
    "a BREAK b", "BREAK start", "end BREAK", "(x BREAK y)", r"a\b \\ c", "a ) b ] c :1.2) d", "[abc:2]",
    "(spaced: 1.5 )", "", "((a:-0.5))",
]
WEIGHTED = [  # (prompt, negative): weights, nesting, escapes, unbalanced brackets
    ("a watercolor (lighthouse:1.4) on a ((rocky)) coast, [fog]", "blurry, (lowres:1.3)"),
    (r"a \(literal\) sign, (red [dim] (bright:1.2) bicycle", "[[washed out]]"),
]


def _texts(tokenizer) -> list[str]:
    words = ["cat", "dog", "red", "tree", "house", "sky", "blue", "sea"]
    long = " ".join(words[i % 8] + ("," if i % 7 == 6 else "") for i in range(150))  # 150 words, commas every 7
    return [*PARSED, long, f"{long} BREAK tail", "(" + long, "word " * 80]


@pytest.mark.parametrize("text", PARSED)
def test_parse_matches_the_reference(text):
    assert prompts.parse(text) == ref.parse(text)


def test_chunks_match_the_reference(tiny_folder):
    from transformers import CLIPTokenizer

    from engine.tokenizer import load_tokenizer

    theirs = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    ours = load_tokenizer(tiny_folder / "tokenizer")
    for text in _texts(theirs):
        got = prompts.text_chunks(text, ours, "a1111")
        want = ref._chunk_inputs(text, theirs)
        assert got.ids == [ids for ids, _ in want], text
        assert got.weights == [w for _, w in want], text
    long = _texts(theirs)[-4]
    assert len(prompts.text_chunks(long, ours, "a1111").ids) == 3  # 150 words and their commas


@pytest.fixture(scope="module")
def ours(weighted_engines):
    from engine.pipeline import Pipeline

    pipe = Pipeline.load(weighted_engines)
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def reference(weighted_folder, ours):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(weighted_folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("euler", ours.scheduler_config)
    return pipe


def reference_images(pipe, pairs: list[tuple[str, str]], seeds: list[int]) -> np.ndarray:
    """diffusers' images from the reference's A1111 embeddings: each prompt and negative encoded by
    tests/a1111_prompts.py, the shorter padded with the empty prompt's chunk (pad_pair), one image each."""
    import torch

    empty = ref.encode("", pipe.tokenizer, pipe.text_encoder)
    images = []
    for (p, n), seed in zip(pairs, seeds, strict=True):
        cond, uncond = ref.pad_pair(ref.encode(p, pipe.tokenizer, pipe.text_encoder),
                                    ref.encode(n, pipe.tokenizer, pipe.text_encoder), empty)
        images.append(pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=4, height=SIZE,
                           width=SIZE, output_type="np", generator=torch.Generator().manual_seed(seed)).images[0])
    return to_uint8(np.stack(images))


def our_images(pipe, pairs: list[tuple[str, str]], seeds: list[int], syntax: str = "a1111") -> np.ndarray:
    reqs = [Request(prompt=p, negative_prompt=n, steps=4, sampler="euler", seed=s, height=SIZE, width=SIZE,
                    prompt_syntax=syntax) for (p, n), s in zip(pairs, seeds, strict=True)]
    return stack_pixels(pipe.run(reqs, progress=False))


def test_weighted_prompts_match_diffusers_fed_a1111_embeddings(ours, reference):
    got = our_images(ours, WEIGHTED, [3, 4])
    assert max_diff(got, reference_images(reference, WEIGHTED, [3, 4])) <= 2
    assert max_diff(got, our_images(ours, WEIGHTED, [3, 4], "plain")) > 8  # the weights change the image


def test_long_prompts_and_break_match_diffusers_fed_a1111_embeddings(ours, reference, tiny_folder):
    from transformers import CLIPTokenizer

    long = _texts(CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer"))[-4]  # 150 words, 3 chunks
    pairs = [(long, "blurry"), ("a red (bicycle:1.3) BREAK in the [rain]", long + ", (noise:1.2)"),
             ("a lighthouse", "fog BREAK lowres")]
    got = our_images(ours, pairs, [5, 6, 7])  # chunk counts 3, 3 and 2: two batches
    assert max_diff(got, reference_images(reference, pairs, [5, 6, 7])) <= 2
    alone = np.concatenate([our_images(ours, [pair], [s]) for pair, s in zip(pairs, [5, 6, 7], strict=True)])
    assert max_diff(got, alone) <= 1


def test_rows_of_other_chunk_counts_never_share_a_flight(ours):
    from engine.continuous import Flight
    from tests.helpers import alone, drive

    reqs = {"a": Request(prompt="a red cat BREAK a blue sky", steps=4, sampler="euler", seed=1, height=SIZE,
                         width=SIZE),
            "b": Request(prompt="a green hill", steps=3, sampler="euler", seed=2, height=SIZE, width=SIZE),
            "c": Request(prompt="rain BREAK sun", steps=3, sampler="euler", seed=3, height=SIZE, width=SIZE)}
    flight = Flight(ours, max_batch=4)
    rows = {k: ours.prepare(r).rows() for k, r in reqs.items()}
    flight.admit(rows["a"], ["a"])
    assert flight.accepts(rows["c"][0]) and not flight.accepts(rows["b"][0])  # 2 chunks, 2 chunks; 1 chunk
    flight = Flight(ours, max_batch=4)
    images, errors = drive(flight, {0: [(reqs["a"], "a")], 1: [(reqs["c"], "c")]}, ours)
    assert not errors
    for owner in ("a", "c"):
        assert max_diff(images[owner][0][1], alone(ours, reqs[owner])[0]) <= 1


def test_clip_skip_2_is_a1111s_penultimate_layer_and_recorded(ours, reference):
    """A1111's clip skip 2: the penultimate layer's output through the final layer norm (what diffusers' `clip_skip=1`
    computes; its own code path reaches for `text_model`, which this transformers' CLIPTextModel lacks, so the
    embeddings are made here by that rule and fed to it); the image records A1111's "Clip skip: 2"."""
    import torch

    from engine.png import parameters_text
    from tests.a1111 import parse_a1111

    pair = [("a watercolor lighthouse on a rocky coast", "blurry")]

    def penultimate(text: str) -> torch.Tensor:
        ids = reference.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            out = reference.text_encoder(ids, output_hidden_states=True)
            return reference.text_encoder.get_submodule("final_layer_norm")(out.hidden_states[-2])

    want = to_uint8(reference(prompt_embeds=penultimate(pair[0][0]), negative_prompt_embeds=penultimate(pair[0][1]),
                              num_inference_steps=4, height=SIZE, width=SIZE, output_type="np",
                              generator=torch.Generator().manual_seed(8)).images)
    req = Request(prompt=pair[0][0], negative_prompt=pair[0][1], steps=4, sampler="euler", seed=8, height=SIZE,
                  width=SIZE, clip_skip=2)
    (got,) = ours.run(req, progress=False)
    assert max_diff(got.pixels[None], want) <= 2
    assert max_diff(got.pixels[None], our_images(ours, pair, [8])) > 8  # another layer, another image
    assert parse_a1111(parameters_text(got.params))["Clip skip"] == "2"
    assert "Clip skip" not in parse_a1111(parameters_text(ours.run(Request(**{**vars(req), "clip_skip": 1}),
                                                                   progress=False)[0].params))


def test_plain_prompts_give_the_plain_syntax_images_bit_for_bit(ort_pipeline):
    texts = ["a watercolor painting of a lighthouse", "red, green, blue: a bicycle", "word " * 75]
    reqs = [Request(prompt=t, negative_prompt="fog", steps=3, sampler="euler", seed=i, height=SIZE, width=SIZE)
            for i, t in enumerate(texts)]
    got = stack_pixels(ort_pipeline.run(reqs, progress=False))
    plain = stack_pixels(ort_pipeline.run([Request(**{**vars(r), "prompt_syntax": "plain"}) for r in reqs],
                                          progress=False))
    np.testing.assert_array_equal(got, plain)


@pytest.mark.parametrize("request_,field,words", [
    (Request(prompt="word " * 301), "prompt", "needs 5 chunks of 75 tokens"),
    (Request(negative_prompt="a BREAK b BREAK c BREAK d BREAK e"), "negative_prompt", "these engines take 4 (308"),
    (Request(negative_prompt="(x:.)"), "negative_prompt", "attention weight '.' is not a number"),
    (Request(prompt_syntax="comfy"), "prompt_syntax", "'comfy' is not one of a1111, plain"),
    (Request(clip_skip=3), "clip_skip", "clip_skip 3 is past the text encoder's 2 layers"),
    (Request(clip_skip=0), "clip_skip", "clip_skip 0 must be an integer >= 1"),
])
def test_bad_prompts_are_named(ort_pipeline, request_, field, words):
    with pytest.raises(RequestError, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
        ort_pipeline.prepare(Request(**{**vars(request_), "height": SIZE, "width": SIZE}))
    assert info.value.field == field


def test_the_cli_and_the_server_take_the_syntax(ort_engines, tmp_path, capsys):
    from engine import generate
    from engine.server.schemas import GenerateBody

    argv = ["--engine-dir", str(ort_engines), "--prompt", "a (red:1.3) bike", "--steps", "1", "--height", str(SIZE),
            "--width", str(SIZE), "--output", str(tmp_path / "a.png")]
    assert generate.main([*argv, "--prompt-syntax", "plain"]) == 0
    assert json.loads(json.dumps(GenerateBody(prompt="x", prompt_syntax="plain").to_request().prompt_syntax)) == "plain"
    assert generate.main([*argv[:-2], "--output", str(tmp_path / "b.png"), "--prompt", "word " * 301]) == 2
    assert "the prompt needs 5 chunks of 75 tokens" in capsys.readouterr().err
