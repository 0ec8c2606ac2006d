"""Step-level continuous batching (engine/continuous.py): rows join and leave at step boundaries, each image
equal to the same request run alone, for every sampler, with mixed step counts and img2img strengths."""
from __future__ import annotations

import numpy as np
import pytest

from engine.continuous import Flight, flex_key
from engine.request import Request
from engine.samplers import SAMPLERS
from tests.helpers import alone, assert_same_pixels, drive


@pytest.fixture(scope="module")
def pipe(ort_pipeline):
    return ort_pipeline


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_rows_joining_at_different_steps_match_each_request_alone(pipe, sampler):
    reqs = {
        "a": Request(prompt="a red barn", steps=6, sampler=sampler, seed=11, images=2),
        "b": Request(prompt="a blue lake", negative_prompt="fog", steps=4, sampler=sampler, seed=22,
                     guidance_scale=5.0),
        "c": Request(prompt="a green hill", steps=3, sampler=sampler, seed=33, guidance_scale=9.0),
    }
    flight = Flight(pipe, max_batch=8)
    images, errors = drive(flight, {0: [(reqs["a"], "a")], 2: [(reqs["b"], "b")], 3: [(reqs["c"], "c")]}, pipe)
    assert not errors
    for owner, req in reqs.items():
        want = alone(pipe, req)
        got = sorted(images[owner], key=lambda kp: kp[0])
        assert [k for k, _ in got] == list(range(req.images))
        for (_, px), ref in zip(got, want, strict=True):
            assert_same_pixels(px, ref)


def test_img2img_rows_with_different_strengths_share_steps(pipe):
    init = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    from PIL import Image

    image = Image.fromarray(init)
    reqs = {"s5": Request(prompt="x", init_image=image, strength=0.5, steps=8, seed=5),
            "s9": Request(prompt="y", init_image=image, strength=0.9, steps=6, seed=6)}
    flight = Flight(pipe, max_batch=4)
    images, errors = drive(flight, {0: [(reqs["s9"], "s9")], 1: [(reqs["s5"], "s5")]}, pipe)
    assert not errors
    for owner, req in reqs.items():
        assert_same_pixels(images[owner][0][1], alone(pipe, req)[0])


def test_admission_is_bounded_and_keyed(pipe):
    flight = Flight(pipe, max_batch=2)
    rows = pipe.prepare(Request(prompt="x", steps=3, images=2)).rows()
    flight.admit(rows, ["a", "a"])
    assert flight.free == 0 and not flight.accepts(pipe.prepare(Request(prompt="y", steps=3)).rows()[0])
    with pytest.raises(ValueError, match="free slots"):
        flight.admit(pipe.prepare(Request(prompt="y", steps=3)).rows(), ["b"])
    other = pipe.prepare(Request(prompt="y", steps=3, sampler="euler")).rows()
    assert flex_key(other[0].request) != flight.key
    with pytest.raises(ValueError, match="flex key"):
        flight.admit(other, ["c"])
    while flight.slots:
        flight.step()
        flight.finish()
    assert flight.key is None and flight.accepts(other[0])  # an empty flight takes any key


def test_cancelled_rows_free_their_slot_and_the_others_are_unchanged(pipe):
    keep = Request(prompt="stay", steps=5, seed=1)
    gone = Request(prompt="leave", steps=5, seed=2, images=2)
    flight = Flight(pipe, max_batch=3)
    flight.admit(pipe.prepare(keep).rows(), ["keep"])
    flight.admit(pipe.prepare(gone).rows(), ["gone", "gone"])
    flight.step()
    flight.step()
    assert flight.drop("gone") == 2 and flight.free == 2
    out = []
    while flight.slots:
        flight.step()
        out += flight.finish()
    assert [f.owner for f in out] == ["keep"]
    assert_same_pixels(out[0].image.pixels, alone(pipe, keep)[0])


def test_a_row_that_turns_nan_fails_only_its_request(pipe):
    flight = Flight(pipe, max_batch=2)
    flight.admit(pipe.prepare(Request(prompt="ok", steps=3, seed=1)).rows(), ["ok"])
    (bad,) = flight.admit(pipe.prepare(Request(prompt="bad", steps=3, seed=2)).rows(), ["bad"])
    flight.step()
    bad.bufs["latents"] = bad.bufs["latents"] * float("nan")  # what an fp16 overflow in this row leaves behind
    out = []
    while flight.slots:
        flight.step()
        out += flight.finish()
    by = {f.owner: f for f in out}
    assert by["bad"].image is None and "NaN" in by["bad"].error
    assert by["ok"].error is None
    assert_same_pixels(by["ok"].image.pixels, alone(pipe, Request(prompt="ok", steps=3, seed=1))[0])


def test_guidance_off_rows_step_without_the_unconditional_half(ort_pipeline):
    from engine.continuous import Flight

    flight = Flight(ort_pipeline, max_batch=2)
    (slot,) = flight.admit(ort_pipeline.prepare(Request(prompt="x", steps=2, guidance_scale=1.0)).rows(), ["a"])
    assert "guidance" not in slot.bufs and slot.bufs["cond.encoder_hidden_states"].shape[0] == 1
