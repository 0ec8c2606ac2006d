"""The torch fast path's compile step, on the CPU: `python -m engine.build --backend torch --compile` makes the
UNet runner call `torch.compile` (inductor, C++ kernels here, Triton on a GPU), which matches eager.

What stays GPU-only (tests/test_gpu_pipeline.py, tests/test_kernels_gpu.py): our attention kernel inside the compiled
graph, channels_last on CUDA, and capturing the whole denoise step around the compiled UNet in a CUDA graph.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.backends.base import get_backend
from engine.config import BuildConfig, Profile
from export.specs import Shape, get_spec

PROFILE = Profile(Shape(1, 64, 64), Shape(1, 64, 64), Shape(1, 64, 64))


def _unet_inputs(folder: Path) -> dict[str, torch.Tensor]:
    from export.models import default_size, folder_dims
    from export.onnx_export import example_inputs

    size = default_size(folder)
    return example_inputs(get_spec("unet"), folder_dims(folder), Shape(1, size, size), "fp32")


def test_compile_is_a_torch_build_option():
    from engine.build import make_plan, parse_args

    cfg = parse_args(["--backend", "torch", "--compile"])
    assert cfg.compile and not parse_args([]).compile and not BuildConfig().compile
    torch_backend = get_backend("torch")
    on = make_plan(cfg, torch_backend, PROFILE)
    off = make_plan(parse_args(["--backend", "torch"]), torch_backend, PROFILE)
    assert on.compile and not off.compile
    # part of the artifact key when set, absent when not (keys of earlier torch builds stay valid)
    assert torch_backend.fingerprint(on)["compile"] is True and "compile" not in torch_backend.fingerprint(off)
    with pytest.raises(ValueError, match="torch backend only"):
        make_plan(parse_args(["--backend", "onnxruntime", "--compile"]), get_backend("onnxruntime"), PROFILE)


def test_compiled_build_compiles_the_unet_runner_only(tmp_path):
    from engine import cache
    from engine.build import build_all

    result = build_all(BuildConfig(model="tiny", backend="torch", device="cpu", compile=True, engine_dir=tmp_path,
                                   components=("unet", "vae_decoder")), progress=False)
    runners = {}
    for name in ("unet", "vae_decoder"):
        art = tmp_path / result.record["model_id"] / result.record["components"][name]["dir"]
        runners[name] = get_backend("torch").load(get_spec(name), art, cache.verify(art), "cpu")
    assert runners["unet"].compiled and not runners["vae_decoder"].compiled  # nothing compiles before a call
    plain = build_all(BuildConfig(model="tiny", backend="torch", device="cpu", engine_dir=tmp_path,
                                  components=("unet",)), progress=False)
    assert plain.record["components"]["unet"]["key"] != result.record["components"]["unet"]["key"]


def test_unet_traces_as_one_graph(tiny_folder):
    """No graph break in the UNet with the engine's attention processor: one compiled graph per shape."""
    from export import attention
    from export.models import load_component

    module = load_component(tiny_folder, "unet", torch.float32, "cpu")
    attention.set_eager(module, "sdpa")  # the processors carry it (read inside the traced code)
    with torch.inference_mode():
        explained = torch._dynamo.explain(module)(**_unet_inputs(tiny_folder))
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow  # inductor generates and compiles C++ kernels: about a minute on 2 CPU cores, seconds when cached
def test_compiled_unet_matches_eager(tiny_folder):
    """The runner's compile (channels_last too, as on CUDA) against the eager module, on the same inputs."""
    from engine.backends.torch_backend import compile_module
    from export.models import load_component

    inputs = _unet_inputs(tiny_folder)
    eager = load_component(tiny_folder, "unet", torch.float32, "cpu")
    compiled = compile_module(load_component(tiny_folder, "unet", torch.float32, "cpu"), channels_last=True)
    try:
        with torch.inference_mode():  # both run SDPA: load_component installs it
            want = eager(**inputs)
            got = compiled(**inputs)
            again = compiled(**inputs)  # the compiled code, no recompilation
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
