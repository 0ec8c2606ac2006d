"""Continuous batching with batch-size buckets (engine/continuous.py): each step's batch padded to a bucket with
copies of a live row, the stacked tables to a static width, so one CUDA graph per key serves every step.

On the CPU the padded step runs eager (`Flight(..., buckets=True)`): its images must equal the unpadded flight's
and each request's run alone. On a CUDA GPU the padded step is captured and replayed (torch backend)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.continuous import Flight, bucket_for, buckets, table_width
from engine.pipeline import Pipeline
from engine.request import Request
from tests.helpers import Wrapped, alone, assert_same_pixels, drive, max_diff


@pytest.fixture(scope="module")
def pipe(ort_pipeline):
    return ort_pipeline


def spied(pipe: Pipeline):
    """Count the UNet's calls (and their input shapes) while a flight runs; `restore()` puts the UNet back."""
    unet = pipe.runners["unet"]
    spy = Wrapped(unet)
    pipe.runners["unet"] = spy

    def restore() -> None:
        pipe.runners["unet"] = unet

    return spy, restore


def drive_spied(flight: Flight, plan: dict, pipe: Pipeline) -> tuple[dict, list, list[int]]:
    """`drive` the flight through the plan with the UNet spied: (images, errors, the UNet's input batch sizes)."""
    spy, restore = spied(pipe)
    try:
        images, errors = drive(flight, plan, pipe)
    finally:
        restore()
    return images, errors, [call["sample"][0] for call in spy.calls]


def by_owner(images: dict[str, list]) -> dict[str, list[np.ndarray]]:
    return {owner: [px for _, px in sorted(got, key=lambda kp: kp[0])] for owner, got in images.items()}


# ---- buckets and table widths ----


def test_buckets_are_powers_of_two_then_max_batch():
    assert buckets(1) == (1,)
    assert buckets(2) == (1, 2)
    assert buckets(6) == (1, 2, 4, 6)
    assert buckets(8) == (1, 2, 4, 8)
    assert buckets(9) == (1, 2, 4, 8, 9)
    assert [bucket_for(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [bucket_for(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    for max_batch in range(1, 13):
        for n in range(1, max_batch + 1):
            b = bucket_for(n, max_batch)
            assert n <= b <= max_batch and b in buckets(max_batch)
            assert all(smaller < n for smaller in buckets(max_batch) if smaller < b)  # the smallest that fits
    with pytest.raises(ValueError):
        bucket_for(7, 6)
    with pytest.raises(ValueError):
        bucket_for(0, 6)


def test_table_width_leaves_room_for_the_longest_table():
    assert [table_width(n) for n in (1, 3, 7, 8, 15, 16, 30, 50)] == [8, 8, 8, 16, 16, 32, 32, 64]
    for n in range(1, 200):
        w = table_width(n)
        assert w >= n + 1 and w >= 8 and w & (w - 1) == 0  # [N + 1] tables fit; a power of two


# ---- the padded step on the CPU (eager) ----


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a", "ddim"])
def test_padded_buckets_match_the_unpadded_flight_and_each_request_alone(pipe, sampler):
    reqs = {
        "a": Request(prompt="a red barn", steps=6, sampler=sampler, seed=11),
        "b": Request(prompt="a blue lake", negative_prompt="fog", steps=4, sampler=sampler, seed=22,
                     guidance_scale=5.0),
        "c": Request(prompt="a green hill", steps=3, sampler=sampler, seed=33, guidance_scale=9.0),
    }
    plan = {0: [(reqs["a"], "a")], 2: [(reqs["b"], "b")], 3: [(reqs["c"], "c")]}  # 1, 2 then 3 rows (bucket 4)
    padded_images, errors, sizes = drive_spied(Flight(pipe, max_batch=8, buckets=True), plan, pipe)
    assert not errors
    assert sorted(set(sizes)) == [2, 4, 8]  # guidance on: [uncond; cond] of buckets 1, 2 and 4 (3 rows + 1 pad)
    eager_images, errors = drive(Flight(pipe, max_batch=8, buckets=False), plan, pipe)
    assert not errors
    padded, eager = by_owner(padded_images), by_owner(eager_images)
    for owner, req in reqs.items():
        (want,) = alone(pipe, req)
        assert_same_pixels(padded[owner][0], eager[owner][0])
        assert_same_pixels(padded[owner][0], want)


def test_padded_buckets_not_a_power_of_two_with_img2img_strengths(pipe):
    """max_batch 6: five rows run in bucket 6; img2img rows of two strengths (own start steps) share it."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    reqs = {"s5": Request(prompt="x", init_image=image, strength=0.5, steps=8, seed=5, images=3),
            "s9": Request(prompt="y", init_image=image, strength=0.9, steps=6, seed=6, images=2)}
    plan = {0: [(reqs["s9"], "s9")], 1: [(reqs["s5"], "s5")]}
    images, errors, sizes = drive_spied(Flight(pipe, max_batch=6, buckets=True), plan, pipe)
    assert not errors
    assert set(sizes) <= {2 * b for b in buckets(6)} and 12 in sizes  # 5 rows: bucket 6
    got = by_owner(images)
    for owner, req in reqs.items():
        want = alone(pipe, req)
        assert len(got[owner]) == req.images
        for px, ref in zip(got[owner], want, strict=True):
            assert_same_pixels(px, ref)


def test_padded_inpainting_blend_reads_the_last_table_column(pipe):
    """4-channel inpainting reads noise_a/noise_b at i + 1 (an [N + 1] table): the padded width must hold it."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    reqs = {"i7": Request(prompt="a door", init_image=image, mask=Image.fromarray(mask), strength=0.75, steps=7,
                          seed=3, sampler="euler_a"),
            "i3": Request(prompt="a window", init_image=image, mask=Image.fromarray(mask), steps=3, seed=4,
                          sampler="euler_a", images=2)}  # 3 rows: bucket 4, one padded
    images, errors = drive(Flight(pipe, max_batch=4, buckets=True), {0: [(reqs["i7"], "i7")], 1: [(reqs["i3"], "i3")]},
                           pipe)
    assert not errors
    got = by_owner(images)
    for owner, req in reqs.items():
        assert len(got[owner]) == req.images
        for px, want in zip(got[owner], alone(pipe, req), strict=True):
            assert_same_pixels(px, want)


def finished(flight: Flight, pipe: Pipeline, req: Request) -> list:
    """Run one request alone in `flight`; its `Finished` rows."""
    rows = pipe.prepare(req).rows()
    flight.admit(rows, ["owner"] * len(rows))
    out = []
    while flight.slots:
        flight.step()
        out += flight.finish()
    return out


def test_cpu_defaults_to_unpadded_eager_and_says_no_graph(pipe):
    assert not Flight(pipe, max_batch=4).buckets  # CPU default
    padded = Flight(pipe, max_batch=4, buckets=True)
    out = finished(padded, pipe, Request(prompt="p", steps=3, seed=1, images=3))  # bucket 4: one padded row
    assert not padded.graphs  # CPU: nothing captured, eager
    assert len(out) == 3 and all(f.image is not None and f.image.params["cuda_graph"] is False for f in out)
    for f, want in zip(sorted(out, key=lambda f: f.row.k), alone(pipe, Request(prompt="p", steps=3, seed=1, images=3)), strict=True):
        assert_same_pixels(f.image.pixels, want)


# ---- the padded step in CUDA graphs (GPU only) ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_graphed_flight_matches_eager_flight(cuda_pipe, sampler):
    reqs = {
        "a": Request(prompt="a red barn", steps=8, sampler=sampler, seed=11, images=2),
        "b": Request(prompt="a blue lake", steps=5, sampler=sampler, seed=22, guidance_scale=5.0),
        "c": Request(prompt="a green hill", steps=3, sampler=sampler, seed=33, guidance_scale=9.0),
    }
    plan = {0: [(reqs["a"], "a")], 2: [(reqs["b"], "b")], 3: [(reqs["c"], "c")]}
    spy, restore = spied(cuda_pipe)
    try:
        want, errors = drive(Flight(cuda_pipe, max_batch=8, buckets=False), plan, cuda_pipe)
        seen = {bucket_for(call["sample"][0] // 2, 8) for call in spy.calls}  # the buckets of the live rows
        spy.calls.clear()
        graphed = Flight(cuda_pipe, max_batch=8)
        assert graphed.buckets  # the CUDA default
        got, errors_graphed = drive(graphed, plan, cuda_pipe)
    finally:
        restore()
    assert not errors and not errors_graphed
    assert graphed.graphs and all(g is not None for g in graphed.graphs.values())
    assert len(graphed.graphs) <= len(seen)  # one capture per bucket (the table width stays 16: a runs 8 steps)
    assert len(spy.calls) == 2 * len(graphed.graphs)  # warm-up + capture per graph, replays after that
    for owner in reqs:
        for g, w in zip(by_owner(got)[owner], by_owner(want)[owner], strict=True):
            assert_same_pixels(g, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_graphs_are_reused_across_flights_and_report_cuda_graph(cuda_pipe):
    flight = Flight(cuda_pipe, max_batch=4)
    spy, restore = spied(cuda_pipe)
    try:
        first = finished(flight, cuda_pipe, Request(prompt="p", steps=4, seed=1, images=2))
        calls_first, graphs_first = len(spy.calls), len(flight.graphs)
        second = finished(flight, cuda_pipe, Request(prompt="p", steps=4, seed=2, images=2))  # same shapes: replay
    finally:
        restore()
    assert graphs_first == 1 and calls_first == 2  # warm-up + capture, then replays only
    assert len(flight.graphs) == 1 and len(spy.calls) == calls_first  # the second flight: no UNet call at all
    assert all(f.image is not None and f.image.params["cuda_graph"] for f in first + second)
    assert max_diff(first[0].image.pixels, second[0].image.pixels) > 10  # new inputs
    eager = finished(Flight(cuda_pipe, max_batch=4, cuda_graph=False), cuda_pipe,
                     Request(prompt="p", steps=4, seed=2, images=2))
    assert not eager[0].image.params["cuda_graph"]
    for f, e in zip(sorted(second, key=lambda f: f.row.k), sorted(eager, key=lambda f: f.row.k), strict=True):
        assert_same_pixels(f.image.pixels, e.image.pixels)
