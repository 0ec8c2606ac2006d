"""LoRA through the engine: adapters merged into built ONNX Runtime, torch and OpenVINO engines (no re-export, no
rebuild) vs diffusers' load_lora_weights + fuse_lora on the same seeded `tiny`; switching back to no adapter gives
the base image bit for bit (the "residue" bug); a bad adapter leaves the engine as it was; PNG metadata names the
adapters."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("peft")

from engine.lora import Adapter
from engine.pipeline import Pipeline
from engine.png import parameters_text
from engine.request import Request
from tests.helpers import PROMPTS, fused_pipe, gens, max_diff, to_uint8, write_kohya, write_peft
from tests.sampler_cases import diffusers_scheduler

SEEDS = [5, 17]
SIZE, STEPS = 64, 4


@pytest.fixture(scope="module")
def adapters(tiny_folder, tmp_path_factory) -> list[Adapter]:
    out = tmp_path_factory.mktemp("pipeline_loras")
    return [Adapter(write_peft(tiny_folder, out, 11, alpha=8, metadata=True), 0.8),
            Adapter(write_kohya(out, 12, r=4, alpha=2.0), 0.6)]


ENGINES = {"onnxruntime": "ort_engines", "torch": "torch_engines", "openvino": "ov_engines"}


def _requests(sampler: str, loras: tuple[Adapter, ...] = ()) -> list[Request]:
    return [Request(prompt=p, steps=STEPS, guidance_scale=6.0, sampler=sampler, seed=s, height=SIZE, width=SIZE,
                    loras=loras) for p, s in zip(PROMPTS, SEEDS, strict=True)]


def _run(pipe: Pipeline, reqs: list[Request]) -> tuple[np.ndarray, list[dict]]:
    out = pipe.run(reqs, progress=False, batch_size=2)
    return np.stack([g.pixels for g in out]), [g.params for g in out]


def _reference(folder, adapters: list[Adapter], sampler: str, config: dict) -> np.ndarray:
    ref = fused_pipe(folder, [(a.path, a.scale) for a in adapters])
    ref.scheduler = diffusers_scheduler(sampler, config)
    return to_uint8(ref(PROMPTS, num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE,
                        generator=gens(SEEDS), output_type="np").images)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "openvino"])
def test_adapters_match_diffusers_and_unload_exactly(backend, request, tiny_folder, adapters):
    pipe = Pipeline.load(request.getfixturevalue(ENGINES[backend]))
    try:
        base, _ = _run(pipe, _requests("ddim"))
        for stack in ([adapters[0]], adapters):  # one adapter, two stacked
            got, params = _run(pipe, _requests("ddim", tuple(stack)))
            ref = _reference(tiny_folder, stack, "ddim", pipe.scheduler_config)
            assert ref.std() > 5 and max_diff(got, ref) <= 2, f"{backend}: {len(stack)} adapter(s)"
            assert max_diff(got, base) > 2  # the adapters do change the image
            assert [a["scale"] for a in params[0]["loras"]] == [a.scale for a in stack]
        again, params = _run(pipe, _requests("ddim"))
        assert np.array_equal(again, base), "switching back to no adapter left residue"
        assert "loras" not in params[0]
    finally:
        pipe.close()


def test_requests_with_different_adapters_in_one_run(ort_engines, adapters):
    """Requests are grouped by their adapters: each image equals the same request run alone."""
    pipe = Pipeline.load(ort_engines)
    try:
        mixed = [Request(prompt=PROMPTS[0], steps=STEPS, seed=3, height=SIZE, width=SIZE, loras=(adapters[1],)),
                 Request(prompt=PROMPTS[0], steps=STEPS, seed=3, height=SIZE, width=SIZE)]
        together, _ = _run(pipe, mixed)
        alone = [_run(pipe, [r])[0][0] for r in mixed]
        assert np.array_equal(together[0], alone[0]) and np.array_equal(together[1], alone[1])
        assert max_diff(together[0], together[1]) > 2
    finally:
        pipe.close()


def test_png_parameters_name_the_adapters(ort_engines, adapters):
    from engine.lora import file_digest

    pipe = Pipeline.load(ort_engines)
    try:
        _, params = _run(pipe, _requests("euler", tuple(adapters))[:1])
    finally:
        pipe.close()
    want = [{"name": a.path.stem, "hash": file_digest(a.path), "scale": a.scale} for a in adapters]
    assert params[0]["loras"] == want
    text = parameters_text(params[0])
    assert f"<lora:{adapters[0].path.stem}:0.8> <lora:{adapters[1].path.stem}:0.6>" in text.splitlines()[0]
    assert f"Lora hashes: \"{want[0]['name']}: {want[0]['hash']}, {want[1]['name']}: {want[1]['hash']}\"" in text


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_bad_adapter_leaves_the_engine_unchanged(backend, request, tmp_path, adapters):
    import torch
    from safetensors.torch import save_file

    wrong = tmp_path / "other_arch.safetensors"  # a module tiny's UNet lacks
    save_file({"lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}, str(wrong))
    misfit = tmp_path / "misfit.safetensors"  # a module tiny has (64 x 64 conv), with the wrong shapes
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 48, 3, 3),
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(48, 2, 1, 1)}, str(misfit))
    pipe = Pipeline.load(request.getfixturevalue(ENGINES[backend]))
    try:
        before, _ = _run(pipe, _requests("ddim", (adapters[0],)))
        with pytest.raises(ValueError, match="lacks"):
            _run(pipe, _requests("ddim", (Adapter(wrong, 1.0),)))
        with pytest.raises(ValueError, match="does not fit"):
            _run(pipe, _requests("ddim", (Adapter(misfit, 1.0),)))
        after, _ = _run(pipe, _requests("ddim", (adapters[0],)))
        assert np.array_equal(before, after)
        with pytest.raises(ValueError, match="pickle"):
            Request(loras=(Adapter(tmp_path / "x.ckpt", 1.0),)).check()
    finally:
        pipe.close()


def test_openvino_runner_refuses_weights_that_do_not_fit(ov_engines):
    """The runner's own checks: a name with no weight constant, or a shape that differs, is refused naming the weight,
    and the compiled model in use stays as it was (same image before and after)."""
    import torch

    pipe = Pipeline.load(ov_engines)
    try:
        before, _ = _run(pipe, _requests("ddim"))
        unet = pipe.runners["unet"]
        name = "conv_in.weight"
        base = unet.base_weights()
        assert name in base and base[name].dtype == torch.float32 and not any(n.startswith("unet.") for n in base)
        with pytest.raises(ValueError, match=r"weight 'down_blocks\.9\.conv\.weight' is not a constant of the IR"):
            unet.set_weights({name: base[name] + 1, "down_blocks.9.conv.weight": torch.zeros(1)})
        with pytest.raises(ValueError, match=rf"weight '{name}' has shape"):
            unet.set_weights({name: base[name].flatten()})
        after, _ = _run(pipe, _requests("ddim"))
        assert np.array_equal(before, after)
        unet.set_weights({name: base[name] + 0.05})  # a good swap does change the image; None puts it back exactly
        assert max_diff(_run(pipe, _requests("ddim"))[0], before) > 2
        unet.set_weights(None)
        assert np.array_equal(_run(pipe, _requests("ddim"))[0], before)
    finally:
        pipe.close()


def test_generate_cli_takes_lora_flags(ort_engines, adapters, tmp_path):
    """`--lora path:scale` (repeatable) reaches the PNG's parameters; a pickle is refused with one line, exit 2."""
    from PIL import Image

    from engine.generate import main

    out = tmp_path / "out"
    args = ["--engine-dir", str(ort_engines), "--steps", "2", "--prompt", "a cat", "--output", str(out)]
    assert main(args + ["--lora", f"{adapters[0].path}:0.5", "--lora", str(adapters[1].path)]) == 0
    (png,) = sorted(out.glob("*.png"))
    text = Image.open(png).text["parameters"]
    assert f"<lora:{adapters[0].path.stem}:0.5> <lora:{adapters[1].path.stem}:1>" in text
    assert main(args + ["--lora", str(tmp_path / "evil.ckpt")]) == 2
