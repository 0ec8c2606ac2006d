"""ControlNet components' shapes (export/control.py): the residual layout of real UNet configs, and the TensorRT
profiles of the ControlNet and residual-UNet specs, hand-derived (no TensorRT needed); the TensorRT build of a
ControlNet engine under @pytest.mark.trt (skipped without TensorRT and a GPU, as tests/test_trt_backend.py)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.backends import tensorrt as tb
from engine.config import Profile
from export.control import controlnet_spec, residual_layout, with_residuals
from export.presets import PRESETS
from export.specs import SPECS, Dims, Shape


def test_sd15_residual_layout_is_the_down_path_of_its_unet():
    channels, scales = residual_layout(PRESETS["sd15"].unet_config())
    # conv_in, 3 blocks x (2 resnets + downsampler), the last block's 2 resnets, then the mid block
    assert channels == (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280)
    assert scales == (1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8)


def test_tiny_residual_layout():
    assert residual_layout(PRESETS["tiny"].unet_config()) == ((64, 64, 64, 128, 128), (1, 1, 2, 2, 2))


TINY = replace(Dims(latent_channels=4, text_dim=32, text_len=77, vae_scale=8, unet_scale=2),
               residual_channels=(64, 64, 64, 128, 128), residual_scales=(1, 1, 2, 2, 2))
STATIC = Profile(Shape(1, 128, 128), Shape(1, 128, 128), Shape(1, 128, 128))


def test_tensorrt_profiles_of_the_controlnet_and_residual_unet_specs():
    net = controlnet_spec("edges", SPECS["unet"], 5)
    assert tb.input_profiles(net, TINY, STATIC) == {
        "sample": ((1, 4, 16, 16), (2, 4, 16, 16), (2, 4, 16, 16)),
        "timestep": ((1,), (2,), (2,)),
        "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (2, 77, 32)),
        "controlnet_cond": ((1, 3, 128, 128), (2, 3, 128, 128), (2, 3, 128, 128)),
    }
    assert net.output_names == ["down_residual_0", "down_residual_1", "down_residual_2", "down_residual_3",
                                "mid_residual"]
    unet = tb.input_profiles(with_residuals(SPECS["unet"], 5), TINY, STATIC)
    assert unet["down_residual_1"] == ((1, 64, 16, 16), (2, 64, 16, 16), (2, 64, 16, 16))
    assert unet["down_residual_3"] == ((1, 128, 8, 8), (2, 128, 8, 8), (2, 128, 8, 8))
    assert unet["mid_residual"] == ((1, 128, 8, 8), (2, 128, 8, 8), (2, 128, 8, 8))


_HAVE_TRT = tb.trt_available() and torch.cuda.is_available()


@pytest.mark.trt
@pytest.mark.skipif(not _HAVE_TRT, reason="TensorRT not installed" if not tb.trt_available() else "no CUDA GPU")
def test_tensorrt_controlnet_engine_matches_onnxruntime(tmp_path, tiny_folder):
    from export.control import random_controlnet, with_controls
    from tests.helpers import trt_matches_onnxruntime

    net = random_controlnet(tiny_folder, tmp_path / "edges", 1, (8, 16, 16, 32), std=0.3)
    trt_matches_onnxruntime(tmp_path, "controlnet.edges", lambda family, dims: with_controls(family, ("edges",), dims),
                            controlnets=(str(net),))
