"""A1111's prompt semantics on SDXL (`tiny-xl`): both text encoders read the same chunks, their penultimate hidden
states weighted (A1111's "Original" emphasis) and concatenated, the pooled embedding from `clip2`'s first chunk;
against diffusers' StableDiffusionXLPipeline fed the embeddings of the independent reference tests/a1111_prompts.py
(≤ 2/255). The encoders' token embeddings are shifted off zero (a random CLIP's hidden states have a mean near 0,
where A1111's emphasis divides by it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.request import Request
from tests import a1111_prompts as ref
from tests.helpers import max_diff, ort_pipeline_of, stack_pixels, to_uint8, with_text_encoders
from tests.sampler_cases import diffusers_scheduler

SIZE = 64
LONG = ", ".join(f"{w} {c}" for w, c in zip(["red", "blue", "green", "gold"] * 12, ["cat", "sky", "tree", "sea"] * 12,
                                          strict=True))  # 48 pairs and their commas: two chunks
PAIRS = [("a (lighthouse:1.4) on ((rocks)), [fog] BREAK sunset", "(blurry:1.2)"), (LONG, None)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, xl_folder) -> Path:
    """`tiny-xl` with both text encoders' token embeddings shifted by 0.5 (hidden states with a mean off zero)."""
    def shift(sub, encoder) -> None:
        encoder.get_input_embeddings().weight.add_(0.5)

    return with_text_encoders(xl_folder, tmp_path_factory.mktemp("xl_prompts") / "tiny-xl-weighted", shift)


@pytest.fixture(scope="module")
def ours(tmp_path_factory, folder):
    pipe = ort_pipeline_of(tmp_path_factory.mktemp("xl_prompt_engines"), folder, SIZE)
    yield pipe
    pipe.close()


def _embeds(pipe, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    both = [ref.encode(text, tok, enc, "penultimate") for tok, enc in ((pipe.tokenizer, pipe.text_encoder),
                                                                         (pipe.tokenizer_2, pipe.text_encoder_2))]
    return torch.cat(both, dim=-1), ref.encode_pooled(text, pipe.tokenizer_2, pipe.text_encoder_2)


def test_sdxl_prompts_match_diffusers_fed_a1111_embeddings(ours, folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("euler", ours.scheduler_config)
    empty, _ = _embeds(pipe, "")
    want = []
    for (p, n), seed in zip(PAIRS, [3, 4], strict=True):
        cond, pooled = _embeds(pipe, p)
        extra = {}
        if n is not None:  # no negative prompt: diffusers' zeros (force_zeros_for_empty_prompt), as ours
            uncond, uncond_pooled = _embeds(pipe, n)
            cond, uncond = ref.pad_pair(cond, uncond, empty)
            extra = {"negative_prompt_embeds": uncond, "negative_pooled_prompt_embeds": uncond_pooled}
        want.append(pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, num_inference_steps=4, guidance_scale=5.0,
                         height=SIZE, width=SIZE, output_type="np", generator=torch.Generator().manual_seed(seed),
                         **extra).images[0])
    got = stack_pixels(ours.run([Request(prompt=p, negative_prompt=n, steps=4, sampler="euler", seed=s,
                                         guidance_scale=5.0, height=SIZE, width=SIZE)
                                 for (p, n), s in zip(PAIRS, [3, 4], strict=True)], progress=False))
    assert max_diff(got, to_uint8(np.stack(want))) <= 2


@pytest.mark.parametrize("negative", [None, ""])
def test_sdxl_empty_negative_prompt_given_or_not_is_diffusers(xl_pipeline, xl_folder, negative):
    """No negative prompt: zero unconditional rows (diffusers' force_zeros_for_empty_prompt); an explicit "" is
    encoded like any prompt, as diffusers does with negative_prompt="" (and as A1111 and ComfyUI do)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("euler", xl_pipeline.scheduler_config)
    want = to_uint8(pipe("a red bicycle", negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0,
                         height=SIZE, width=SIZE, output_type="np", generator=torch.Generator().manual_seed(2)).images)
    got = stack_pixels(xl_pipeline.run(Request(prompt="a red bicycle", negative_prompt=negative, steps=4,
                                               sampler="euler", seed=2, guidance_scale=5.0, height=SIZE, width=SIZE),
                                       progress=False))
    assert max_diff(got, want) <= 2
    other = stack_pixels(xl_pipeline.run(Request(prompt="a red bicycle", negative_prompt="" if negative is None else
                                                 None, steps=4, sampler="euler", seed=2, guidance_scale=5.0,
                                                 height=SIZE, width=SIZE), progress=False))
    assert max_diff(got, other) > 8  # the two readings differ


def test_sdxl_refuses_clip_skip(xl_pipeline):
    """SDXL's conditioning is the penultimate layer already (A1111 ignores its clip skip setting there): refused."""
    from engine.request import RequestError

    with pytest.raises(RequestError, match="takes no clip_skip") as info:
        xl_pipeline.prepare(Request(prompt="x", clip_skip=2, height=SIZE, width=SIZE))
    assert info.value.field == "clip_skip"
