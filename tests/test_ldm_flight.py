"""Step batching (engine/continuous.py) for the LDM paper's families whose rows carry their own condition: rows of
different classes (the class table as context, guidance on) and of different label maps (a map's channels
concatenated to the latents) join one flight at different steps, and each image equals its request run alone."""
from __future__ import annotations

import numpy as np
import pytest

from engine.continuous import Flight
from engine.pipeline import Pipeline
from engine.request import Request
from tests.helpers import alone, assert_same_pixels, drive


@pytest.fixture(scope="module")
def class_pipe(ldm_class_engines):
    p = Pipeline.load(ldm_class_engines)
    yield p
    p.close()


@pytest.fixture(scope="module")
def semantic_pipe(ldm_semantic_engines):
    p = Pipeline.load(ldm_semantic_engines)
    yield p
    p.close()


def test_classes_share_a_flight(class_pipe):
    reqs = {"a": Request(class_label=1, seed=3, steps=6, sampler="ddim", guidance_scale=3.0),
            "b": Request(class_label=8, seed=4, steps=6, sampler="ddim", guidance_scale=2.0, images=2)}
    images, errors = drive(Flight(class_pipe, max_batch=4), {0: [(reqs["a"], "a")], 2: [(reqs["b"], "b")]},
                           class_pipe)
    assert not errors
    for owner, req in reqs.items():
        for (_, got), want in zip(sorted(images[owner], key=lambda x: x[0]), alone(class_pipe, req), strict=True):
            assert_same_pixels(got, want)


def test_label_maps_share_a_flight(semantic_pipe):
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 182, (8, 8)).repeat(8, 0).repeat(8, 1) for _ in range(2)]  # 64x64, blocks of 8
    reqs = {"a": Request(semantic_map=maps[0], seed=1, steps=5, sampler="ddim"),
            "b": Request(semantic_map=maps[1], seed=2, steps=5, sampler="ddim")}
    images, errors = drive(Flight(semantic_pipe, max_batch=4), {0: [(reqs["a"], "a")], 1: [(reqs["b"], "b")]},
                           semantic_pipe)
    assert not errors
    for owner, req in reqs.items():
        assert_same_pixels(images[owner][0][1], alone(semantic_pipe, req)[0])
