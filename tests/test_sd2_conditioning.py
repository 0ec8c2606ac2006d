"""ControlNet and IP-Adapter together on an SD 2.x-shaped model: `tiny` with SD 2.x's UNet traits (linear
projections in the transformer blocks, upcast attention, v-prediction), seeded random weights, a random ControlNet
and a random IP-Adapter built into one ONNX Runtime engine set, against diffusers' StableDiffusionControlNetPipeline
with `load_ip_adapter` on the same folders (≤ 2/255)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.control import Control
from engine.pipeline import Pipeline
from engine.request import Request
from export.control import random_controlnet
from export.ip_adapter import random_ip_adapter
from tests.helpers import PROMPTS, gens, max_diff, stack_pixels, to_uint8
from tests.sampler_cases import diffusers_scheduler

SIZE = 64


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory, tiny_folder) -> Path:
    """`tiny` with an SD 2.x-style UNet (use_linear_projection, upcast_attention; new seeded weights) and a
    v-prediction scheduler."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("sd2") / "tiny-sd2"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config.update(use_linear_projection=True, upcast_attention=True)
    torch.manual_seed(7)
    unet = UNet2DConditionModel.from_config(config)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler.update(prediction_type="v_prediction")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory, sd2_folder) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd2_parts")
    return (random_controlnet(sd2_folder, root / "edges2", 3, (8, 16, 16, 32), std=0.3),
            random_ip_adapter(sd2_folder, root / "ip-sd2", seed=4))


@pytest.fixture(scope="module")
def ours(tmp_path_factory, sd2_folder, parts):
    from engine.build import build_all
    from engine.config import BuildConfig

    net, adapter = parts
    engine_dir = tmp_path_factory.mktemp("sd2_engines")
    build_all(BuildConfig(model=str(sd2_folder), backend="onnxruntime", precision="fp32", height=SIZE, width=SIZE,
                          engine_dir=engine_dir, controlnets=(str(net),), ip_adapter=str(adapter)), progress=False)
    pipe = Pipeline.load(engine_dir)
    yield pipe
    pipe.close()


def test_controlnet_and_image_prompt_together_match_diffusers(ours, sd2_folder, parts):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    net, adapter = parts
    rng = np.random.default_rng(5)
    control = (rng.random((SIZE, SIZE, 3)) > 0.9).astype(np.uint8) * 255
    prompt_image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(sd2_folder, controlnet=ControlNetModel.from_pretrained(net),
                                                             safety_checker=None, requires_safety_checker=False,
                                                             local_files_only=True)
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name,
                         image_encoder_folder="image_encoder", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("euler", ours.scheduler_config)
    pipe.set_ip_adapter_scale(0.7)
    want = to_uint8(pipe(PROMPTS, image=Image.fromarray(control), ip_adapter_image=Image.fromarray(prompt_image),
                         num_inference_steps=5, height=SIZE, width=SIZE, output_type="np", generator=gens([3, 4]),
                         controlnet_conditioning_scale=0.8).images)
    reqs = [Request(prompt=p, steps=5, sampler="euler", seed=s, height=SIZE, width=SIZE,
                    controls=(Control("edges2", control, 0.8),), ip_image=prompt_image, ip_scale=0.7)
            for p, s in zip(PROMPTS, [3, 4], strict=True)]
    got = stack_pixels(ours.run(reqs, progress=False))
    assert max_diff(got, want) <= 2
    plain = stack_pixels(ours.run([Request(prompt=r.prompt, steps=5, sampler="euler", seed=r.seed, height=SIZE,
                                           width=SIZE) for r in reqs], progress=False))
    assert max_diff(got, plain) > 8  # the net and the image prompt change the image
