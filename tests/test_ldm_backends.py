"""The LDM paper's new graph kinds on OpenVINO (fp32): LDMBert (text and layout), the spatial rescaler's Gather and
bilinear resizing, UNet2DModel, the VQ decoder's ArgMin, each model's image against the ONNX Runtime engines' (the
class-conditional model: tests/test_ldm_class.py). TensorRT: no TensorRT can be installed here;
its profiles for these graphs are checked in tests/test_ldm_export.py."""
from __future__ import annotations

import numpy as np
import pytest

from engine.build import build_all
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from engine.request import Request
from tests.helpers import max_diff

CASES = {
    "tiny-ldm-text": ("ldm_text_engines", Request(prompt="a red boat on a lake", steps=4, sampler="ddim", seed=2)),
    "tiny-ldm-semantic": ("ldm_semantic_engines", Request(semantic_map=np.arange(64 * 64).reshape(64, 64) % 182,
                                                          steps=4, sampler="ddim", seed=2)),
    "tiny-ldm-layout": ("ldm_layout_engines", Request(layout=[{"label": "boat", "box": [0.1, 0.5, 0.9, 0.9]}], steps=4,
                                                      sampler="ddim", seed=2)),
    "tiny-ldm-uncond": ("ldm_uncond_engines", Request(steps=4, sampler="ddim", seed=2)),  # UNet2DModel's attention
}


@pytest.mark.parametrize("preset", list(CASES))
def test_openvino_matches_onnxruntime(preset, request, tmp_path):
    fixture, req = CASES[preset]
    build_all(BuildConfig(engine_dir=tmp_path, model=preset, backend="openvino", precision="fp32", height=64,
                          width=64), progress=False)
    ov, ort = Pipeline.load(tmp_path), Pipeline.load(request.getfixturevalue(fixture))
    try:
        got, want = ov.run(req, progress=False)[0], ort.run(req, progress=False)[0]
        assert got.params["backend"] == "openvino" and want.pixels.std() > 5
        assert max_diff(got.pixels, want.pixels) <= 2
    finally:
        ov.close()
        ort.close()
