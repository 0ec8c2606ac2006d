"""IP-Adapter on `tiny-xl` (SDXL: the UNet's added conditioning takes the image embeddings beside the pooled text and
time ids): a seeded random adapter built with ONNX Runtime against diffusers' StableDiffusionXLPipeline with
`load_ip_adapter` on the same files, at two scales; scale 0 is the text-only image exactly. The image encoder's
TensorRT profile, hand-derived (no TensorRT needed), and its TensorRT engine under @pytest.mark.trt."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backends import tensorrt as tb
from engine.config import Profile
from engine.pipeline import Pipeline
from engine.request import Request
from export.ip_adapter import IMAGE_ENCODER_SPEC, random_ip_adapter, with_image_inputs
from export.specs import SDXL_SPECS, Dims, Shape
from tests.helpers import PROMPTS, gens, max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

SIZE = 64


@pytest.fixture(scope="module")
def adapter(xl_conditioned_parts):
    return xl_conditioned_parts["ip"]


@pytest.fixture(scope="module")
def ours(xl_conditioned_engines):
    """The session's tiny-xl engines with this adapter (and a ControlNet no request here uses)."""
    pipe = Pipeline.load(xl_conditioned_engines)
    yield pipe
    pipe.close()


def _requests(image, scale: float) -> list[Request]:
    return [Request(prompt=p, steps=5, sampler="euler", seed=s, guidance_scale=5.0, height=SIZE, width=SIZE,
                    ip_image=image, ip_scale=scale) for p, s in zip(PROMPTS, [3, 4], strict=True)]


def test_sdxl_image_prompt_matches_diffusers_at_two_scales(ours, xl_folder, adapter):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    image = np.random.default_rng(2).integers(0, 256, (40, 72, 3), dtype=np.uint8)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_folder, local_files_only=True)
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name,
                         image_encoder_folder="image_encoder", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("euler", ours.scheduler_config)
    plain = stack_pixels(ours.run(_requests(None, 1.0), progress=False))
    for scale in (0.5, 1.0):
        pipe.set_ip_adapter_scale(scale)
        want = to_uint8(pipe(PROMPTS, num_inference_steps=5, guidance_scale=5.0, height=SIZE, width=SIZE,
                             output_type="np", generator=gens([3, 4]), ip_adapter_image=Image.fromarray(image)).images)
        got = stack_pixels(ours.run(_requests(image, scale), progress=False))
        assert max_diff(got, want) <= 2, scale
        assert max_diff(got, plain) > 8, scale  # the image prompt changes the image
    np.testing.assert_array_equal(stack_pixels(ours.run(_requests(image, 0.0), progress=False)), plain)


XL = Dims(text_dim=64, text2_dim=32, pooled_dim=32, time_ids=6, ip_image_size=224, ip_embed_dim=1024)
STATIC = Profile(Shape(2, 1024, 1024), Shape(2, 1024, 1024), Shape(2, 1024, 1024))


def test_tensorrt_profiles_of_the_image_encoder_and_image_prompt_unet():
    assert tb.input_profiles(IMAGE_ENCODER_SPEC, XL, STATIC) == {
        "pixel_values": ((2, 3, 224, 224), (2, 3, 224, 224), (2, 3, 224, 224))}  # one row per image
    unet = tb.input_profiles(with_image_inputs(SDXL_SPECS["unet"]), XL, STATIC)
    assert unet["image_embeds"] == ((2, 1024), (4, 1024), (4, 1024))  # [uncond; cond] rows
    assert unet["ip_scale"] == ((2,), (4,), (4,))


_HAVE_TRT = tb.trt_available() and torch.cuda.is_available()


@pytest.mark.trt
@pytest.mark.skipif(not _HAVE_TRT, reason="TensorRT not installed" if not tb.trt_available() else "no CUDA GPU")
def test_tensorrt_image_encoder_engine_matches_onnxruntime(tmp_path, tiny_folder):
    from export.ip_adapter import with_ip_adapter
    from tests.helpers import trt_matches_onnxruntime

    adapter = random_ip_adapter(tiny_folder, tmp_path / "ip-tiny", seed=5)
    trt_matches_onnxruntime(tmp_path, "image_encoder", with_ip_adapter, ip_adapter=str(adapter))
