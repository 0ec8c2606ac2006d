"""LoRA on SDXL (`tiny-xl`): one PEFT file with UNet, text_encoder and text_encoder_2 weights, merged into built
ONNX Runtime engines vs diffusers' StableDiffusionXLPipeline load_lora_weights + fuse_lora."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from engine.lora import Adapter  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402
from engine.prompts import token_inputs  # noqa: E402
from engine.request import Request  # noqa: E402
from tests.helpers import PROMPTS, gens, max_diff, to_uint8  # noqa: E402
from tests.sampler_cases import diffusers_scheduler  # noqa: E402

SEEDS, SIZE, STEPS = [3, 41], 64, 4


def _xl_pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _write_xl_lora(folder, out) -> Adapter:
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _xl_pipe(folder)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        te.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    layers = {name: get_peft_model_state_dict(getattr(pipe, part)) for name, part in
              (("unet_lora_layers", "unet"), ("text_encoder_lora_layers", "text_encoder"),
               ("text_encoder_2_lora_layers", "text_encoder_2"))}
    for sd in layers.values():
        for k in sd:
            if "lora_B" in k:
                sd[k] = torch.randn_like(sd[k]) * 0.2
    StableDiffusionXLPipeline.save_lora_weights(out, weight_name="xl.safetensors", **layers)
    return Adapter(out / "xl.safetensors", 0.9)


def test_sdxl_lora_matches_diffusers(tmp_path, xl_folder, xl_engines):
    folder = xl_folder
    adapter = _write_xl_lora(folder, tmp_path)
    pipe = Pipeline.load(xl_engines)  # its own: the adapters are merged into this one's runners
    try:
        reqs = [Request(prompt=p, steps=STEPS, guidance_scale=6.0, sampler="euler", seed=s, height=SIZE, width=SIZE,
                        loras=(adapter,)) for p, s in zip(PROMPTS, SEEDS, strict=True)]
        got = np.stack([g.pixels for g in pipe.run(reqs, progress=False, batch_size=2)])
        ref_pipe = _xl_pipe(folder)
        ref_pipe.load_lora_weights(str(adapter.path), adapter_name="a")
        ref_pipe.set_adapters(["a"], [adapter.scale])
        ref_pipe.fuse_lora(adapter_names=["a"])
        ref_pipe.scheduler = diffusers_scheduler("euler", pipe.scheduler_config)
        ref = to_uint8(ref_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE,
                                generator=gens(SEEDS), output_type="np").images)
        assert ref.std() > 5 and max_diff(got, ref) <= 2
        ids = pipe.tokenize(PROMPTS[:1], pipe.tokenizers[-1])
        for name in ("clip", "clip2"):  # both text encoders' parts were merged (and are undone)
            inputs = token_inputs(ids.tolist(), [[]], pipe.text.widths[name], {}, pipe.runners[name].device)
            with_lora = {k: v.clone() for k, v in pipe.runners[name](**inputs).items()}
            pipe.use_adapters(())
            without = pipe.runners[name](**inputs)
            assert all(not torch.equal(with_lora[k], without[k]) for k in without), name
            pipe.use_adapters((adapter,))
    finally:
        pipe.close()
