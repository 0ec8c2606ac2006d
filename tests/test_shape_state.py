"""Per-shape state bounded (engine/shape_state.py): OpenVINO's CPU plugin keeps ~4 MB per distinct input shape for the
life of a compiled model, so a server answering random sizes grew without end (issue 31 item 2). Past MAX_SHAPES
sizes the runners compile again before the next batch, LoRA adapters merged again, and the images stay the same
bit for bit."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine import shape_state
from engine.lora import Adapter
from engine.pipeline import Pipeline
from engine.request import Request
from tests.helpers import max_diff, write_kohya

SIZES = list(itertools.product((32, 48, 64, 80, 96), (32, 48, 64, 80)))[:shape_state.MAX_SHAPES + 1]


def _image(pipe: Pipeline, loras: tuple[Adapter, ...] = (), size: int = 64) -> np.ndarray:
    req = Request(prompt="a red bicycle", steps=2, seed=7, height=size, width=size, loras=loras)
    return pipe.run(req, progress=False)[0].pixels


@pytest.mark.parametrize("with_lora", [False, True])
def test_openvino_compiles_again_past_max_shapes_with_the_same_images(ov_engines, tmp_path, with_lora):
    loras = (Adapter(write_kohya(tmp_path, 41, r=4, alpha=2.0), 0.8),) if with_lora else ()
    pipe = Pipeline.load(ov_engines)
    unet = pipe.role("denoiser")
    try:
        first = _image(pipe, loras)
        compiles = unet.compiles
        for h, w in SIZES:  # one more distinct size than a compiled model may keep
            pipe.run(Request(prompt="x", steps=1, height=h, width=w, loras=loras), progress=False)
        assert unet.kept_shapes == len(SIZES) > shape_state.MAX_SHAPES and unet.compiles == compiles
        again = _image(pipe, loras)  # over the bound: compiled again before this batch
        assert unet.kept_shapes == 1  # this batch's shape only
        assert unet.compiles == compiles + 1 + with_lora  # the built weights, then the adapter merged again
        assert pipe.adapter_params if with_lora else not pipe.adapter_params
        after = _image(pipe)  # and back to the built weights exactly
    finally:
        pipe.close()
    assert np.array_equal(first, again)
    fresh = Pipeline.load(ov_engines)
    try:
        assert np.array_equal(after, _image(fresh))
        if with_lora:
            assert max_diff(first, after) > 2  # the adapter does change the image
    finally:
        fresh.close()

