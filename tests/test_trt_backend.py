"""TensorRT backend: pure logic here (no TensorRT, no GPU); the real build/run flow under @pytest.mark.trt.

The trt-marked tests have never run in this workplace (no TensorRT, no GPU): they are written against
engine.build.build_all and the backend protocol, for a session that has both. The engine-inspector parser,
ONNX summary and compatibility checks are in tests/test_trt_inspect.py.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import cuda, graphs
from engine.backends import tensorrt as tb
from engine.backends.base import get_backend
from engine.config import BuildConfig, Profile
from export.specs import Dims, Shape, get_spec
from tests.helpers import TRT_ENV, built_manifest, write_kohya

# The tiny preset's dims: 4 latent channels, CLIP width 32, 77 tokens, VAE /8 (4 blocks), UNet /2 (2 blocks).
TINY = Dims(latent_channels=4, text_dim=32, text_len=77, vae_scale=8, unet_scale=2)
STATIC = Profile(Shape(1, 128, 128), Shape(1, 128, 128), Shape(1, 128, 128))
DYNAMIC = Profile(Shape(1, 64, 64), Shape(1, 128, 128), Shape(4, 512, 512))


# ---- profiles from the spec -----------------------------------------------------------------------------

# Hand-derived from export/specs.py: latent [B, 4, H/8, W/8], tokens [B, 77], token and text [B, 77, 32], timestep [B],
# image [B, 3, H, W]; min batch = lo.batch, opt/max batch = batch * batch_factor (2 for clip/unet, CFG).
STATIC_EXPECTED = {
    "clip": {"input_ids": ((1, 77), (2, 77), (2, 77)), "token_embeds": ((1, 77, 32), (2, 77, 32), (2, 77, 32))},
    "unet": {
        "sample": ((1, 4, 16, 16), (2, 4, 16, 16), (2, 4, 16, 16)),
        "timestep": ((1,), (2,), (2,)),
        "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (2, 77, 32)),
    },
    "vae_decoder": {"latent": ((1, 4, 16, 16), (1, 4, 16, 16), (1, 4, 16, 16))},
    "vae_encoder": {"images": ((1, 3, 128, 128), (1, 3, 128, 128), (1, 3, 128, 128))},
}
DYNAMIC_EXPECTED = {
    "clip": {"input_ids": ((1, 77), (2, 77), (8, 77)), "token_embeds": ((1, 77, 32), (2, 77, 32), (8, 77, 32))},
    "unet": {
        "sample": ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 64, 64)),
        "timestep": ((1,), (2,), (8,)),
        "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (8, 77, 32)),
    },
    "vae_decoder": {"latent": ((1, 4, 8, 8), (1, 4, 16, 16), (4, 4, 64, 64))},
    "vae_encoder": {"images": ((1, 3, 64, 64), (1, 3, 128, 128), (4, 3, 512, 512))},
}


@pytest.mark.parametrize("name", sorted(STATIC_EXPECTED))
def test_static_profile_from_spec(name):
    assert tb.input_profiles(get_spec(name), TINY, STATIC) == STATIC_EXPECTED[name]


@pytest.mark.parametrize("name", sorted(DYNAMIC_EXPECTED))
def test_dynamic_profile_from_spec(name):
    assert tb.input_profiles(get_spec(name), TINY, DYNAMIC) == DYNAMIC_EXPECTED[name]


def test_inverted_profile_is_rejected():
    with pytest.raises(ValueError, match="min .* opt .* max"):
        tb.input_profiles(get_spec("vae_decoder"), TINY, Profile(Shape(1, 128, 128), Shape(1, 64, 64), Shape(1, 64, 64)))


def test_input_shape_inside_the_profile_passes():
    lo, _, hi = DYNAMIC_EXPECTED["unet"]["sample"]
    tb.check_input_shape("unet", "sample", (2, 4, 32, 48), lo, hi)


def test_input_shape_outside_the_profile_names_value_and_range():
    lo, _, hi = STATIC_EXPECTED["unet"]["sample"]
    with pytest.raises(ValueError) as e:
        tb.check_input_shape("unet", "sample", (2, 4, 32, 32), lo, hi)
    msg = str(e.value)
    assert "(2, 4, 32, 32)" in msg and "(1..2, 4, 16, 16)" in msg and "--build-dynamic-shape" in msg


def test_input_rank_mismatch_is_rejected():
    with pytest.raises(ValueError, match="'timestep'"):
        tb.check_input_shape("unet", "timestep", (2, 1), (1,), (2,))


# ---- precision and attention decisions -----------------------------------------------------------------


def test_default_attention_and_precision():
    backend = get_backend("tensorrt")
    assert backend.default_attention() == "decomposed"
    assert backend.default_precision(BuildConfig()) == "fp16"


def test_timing_cache_path(tmp_path):
    cfg = BuildConfig(engine_dir=tmp_path)
    assert tb.timing_cache_path(cfg, TRT_ENV) == tmp_path / "timing-trt10.13.0.35-sm90.cache"
    assert tb.timing_cache_path(replace(cfg, timing_cache=tmp_path / "t.cache"), TRT_ENV) == tmp_path / "t.cache"


def test_torch_dtypes_of_tensorrt_types():
    assert tb.torch_dtype("HALF") is torch.float16 and tb.torch_dtype("FLOAT") is torch.float32
    assert tb.torch_dtype("INT32") is torch.int32 and tb.torch_dtype("BF16") is torch.bfloat16
    with pytest.raises(ValueError):
        tb.torch_dtype("FP4")


# ---- activation arena, CUDA-graph cache, cuda helpers ---------------------------------------------------


@pytest.mark.parametrize("current, required, expected", [
    (0, 0, 0), (0, 1, 256), (0, 1000, 1024), (1024, 1000, 1024), (1024, 1025, 1280), (4096, 10, 4096),
])
def test_arena_capacity_grows_aligned_and_never_shrinks(current, required, expected):
    assert cuda.arena_capacity(current, required) == expected
    assert expected % cuda.ALIGNMENT == 0


def test_arena_rebinds_every_user_when_it_grows(monkeypatch):
    class FakeBuffer:
        count = 0

        def __init__(self, size):
            FakeBuffer.count += 1
            self.size, self.ptr = size, (0x1000 * FakeBuffer.count if size else 0)

        def free(self):
            self.ptr = self.size = 0

    class FakeStream:
        syncs = 0

        def synchronize(self):
            FakeStream.syncs += 1

    class User:
        def __init__(self):
            self.bound: list[tuple[int, int]] = []

        def bind_memory(self, ptr, size):
            self.bound.append((ptr, size))

    monkeypatch.setattr(cuda, "DeviceBuffer", FakeBuffer)
    monkeypatch.setattr(cuda, "shared_stream", lambda index: FakeStream())
    arena = cuda.ActivationArena(0)
    a, b, c = User(), User(), User()
    arena.attach(a, 1000)
    arena.attach(b, 5000)
    arena.attach(c, 100)
    assert a.bound == [(0x2000, 1024), (0x3000, 5120)]
    assert b.bound == [(0x3000, 5120)] and c.bound == [(0x3000, 5120)]
    assert FakeStream.syncs == 2 and arena.buffer.size == 5120
    arena.detach(a)  # a closed runner: later growth rebinds only the others
    arena.attach(User(), 9000)
    assert len(a.bound) == 2 and b.bound[-1] == (0x4000, 9216)


def test_graph_cache_warms_captures_then_replays(monkeypatch):
    launched: list[str] = []

    class FakeGraph:
        def replay(self):
            launched.append("graph")

        def reset(self):
            launched.append("destroyed")

    monkeypatch.setattr(graphs, "capture", lambda stream, fn: (FakeGraph(), ""))
    cache = graphs.GraphCache(stream=None, label="unet")
    def eager():
        return launched.append("eager")
    for _ in range(3):
        cache.run((2, 4, 16, 16), eager)
    assert launched == ["eager", "graph", "graph"] and cache.keys == [(2, 4, 16, 16)]
    cache.clear()
    assert launched[-1] == "destroyed" and cache.keys == []


def test_graph_cache_falls_back_to_eager_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(graphs, "capture", lambda stream, fn: (None, "operation not permitted"))
    cache = graphs.GraphCache(stream=None, label="unet")
    calls: list[int] = []
    with caplog.at_level(logging.WARNING, logger="engine.graphs"):
        for key in ("a", "a", "a", "b", "b"):
            cache.run(key, lambda: calls.append(1))
    assert len(calls) == 5 and cache.keys == []
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1


def test_disabled_graph_cache_always_runs_eagerly(monkeypatch):
    monkeypatch.setattr(graphs, "capture", lambda stream, fn: pytest.fail("must not capture"))
    cache = graphs.GraphCache(stream=None, label="vae", enabled=False)
    calls: list[int] = []
    for _ in range(3):
        cache.run("k", lambda: calls.append(1))
    assert len(calls) == 3


def test_check_unpacks_values_and_names_errors():
    from cuda.bindings import runtime as rt

    ok = rt.cudaError_t.cudaSuccess
    assert cuda.check((ok,)) is None and cuda.check((ok, 7)) == 7 and cuda.check((ok, 1, 2)) == (1, 2)
    with pytest.raises(cuda.CudaError, match="^cudaMalloc failed: cudaErrorMemoryAllocation: out of memory$"):
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")


def test_one_error_checker_for_runtime_and_driver_calls():
    """kernels.launcher checks its driver-API calls with engine.cuda.check and raises engine.cuda.CudaError."""
    from cuda.bindings import driver

    from kernels import launcher

    assert launcher.CudaError is cuda.CudaError and launcher.check is cuda.check
    ok = driver.CUresult.CUDA_SUCCESS
    assert cuda.check((ok, 5), "cuDeviceGetCount") == 5
    # the description needs the driver library; without it the error's name is the message
    with pytest.raises(cuda.CudaError, match="^cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE"):
        cuda.check((driver.CUresult.CUDA_ERROR_INVALID_IMAGE, None), "cuModuleLoadData")


def test_align_up():
    assert [cuda.align_up(n) for n in (0, 1, 255, 256, 257)] == [0, 256, 256, 256, 512]
    with pytest.raises(ValueError):
        cuda.align_up(1, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_helpers_without_a_gpu():
    assert cuda.device_count() == 0
    with pytest.raises(cuda.CudaError, match="cudaGetDeviceProperties"):
        cuda.device_info(0)


# ---- without TensorRT -----------------------------------------------------------------------------------

no_trt = pytest.mark.skipif(tb.trt_available(), reason="TensorRT is installed here")


@no_trt
def test_version_without_tensorrt_raises_one_clear_error():
    with pytest.raises(tb.TensorRTUnavailable) as e:
        get_backend("tensorrt").version()
    assert str(e.value) == tb.INSTALL_HINT and "pip install 'sd-engine[trt]'" in str(e.value)
    assert isinstance(e.value, RuntimeError)


@no_trt
def test_fingerprint_build_load_without_tensorrt_raise_the_same_error(tmp_path):
    backend = get_backend("tensorrt")
    with pytest.raises(tb.TensorRTUnavailable):
        backend.fingerprint(BuildConfig())
    with pytest.raises(tb.TensorRTUnavailable):
        backend.build(get_spec("unet"), tmp_path / "model.onnx", tmp_path, TINY, STATIC, BuildConfig())
    with pytest.raises(tb.TensorRTUnavailable):
        backend.load(get_spec("unet"), tmp_path, built_manifest(), "cuda")


# ---- integration: real TensorRT on a GPU (never executed in this workplace) ----------------------------

_SKIP_REASON = "TensorRT not installed" if not tb.trt_available() else "no CUDA GPU"
_HAVE_TRT = tb.trt_available() and torch.cuda.is_available()


def requires_trt(fn):
    """@pytest.mark.trt, skipped (before any fixture builds engines) without TensorRT and a GPU."""
    return pytest.mark.trt(pytest.mark.skipif(not _HAVE_TRT, reason=_SKIP_REASON)(fn))


REL_TOL = 2e-2  # fp16 engine vs fp32 ONNX Runtime: max abs error / max abs reference


def _build(engine_dir: Path, **kw):
    from engine.build import build_all

    return build_all(BuildConfig(engine_dir=engine_dir, **kw), progress=False)


def _runner(engine_dir: Path, result, name: str, backend: str = "tensorrt", device: str = "cuda"):
    from engine import cache

    art = engine_dir / result.record["components"][name]["dir"]
    manifest = cache.verify(art)
    return get_backend(backend).load(get_spec(name), art, manifest, device), manifest


def _inputs(result, name: str, precision: str):
    from export.onnx_export import example_inputs

    dims, opt = Dims(**result.record["dims"]), Profile.from_json(result.record["profile"]).opt
    return example_inputs(get_spec(name), dims, opt, precision)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


@pytest.fixture(scope="module")
def trt_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    return d, _build(d, backend="tensorrt")


@pytest.fixture(scope="module")
def ort_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ort")
    return d, _build(d, backend="onnxruntime", precision="fp32", device="cpu")


@requires_trt
@pytest.mark.parametrize("name", ["clip", "unet", "vae_decoder"])
def test_trt_matches_onnxruntime_fp32(trt_tiny, ort_tiny, name):
    (td, tr), (od, orr) = trt_tiny, ort_tiny
    trt_runner, manifest = _runner(td, tr, name)
    ort_runner, _ = _runner(od, orr, name, backend="onnxruntime", device="cpu")
    ref = ort_runner(**_inputs(orr, name, "fp32"))
    feeds = {k: v.cuda() for k, v in _inputs(tr, name, tr.record["precision"]).items()}
    out = trt_runner(**feeds)
    torch.cuda.synchronize()
    for k in get_spec(name).output_names:
        assert _rel_err(out[k], ref[k]) < REL_TOL, k
    rec = manifest[tb.MANIFEST_KEY]
    assert rec["version"] and rec["compute_capability"] and rec["attention"]["mode"] == "decomposed"
    assert (td / tr.record["components"][name]["dir"] / tb.LAYERS_FILE).is_file()


@requires_trt
def test_cuda_graph_replay_equals_eager(trt_tiny):
    d, r = trt_tiny
    runner, _ = _runner(d, r, "unet")
    feeds = {k: v.cuda() for k, v in _inputs(r, "unet", r.record["precision"]).items()}
    eager = runner(**feeds)["latent"].clone()  # first call per shape: eager
    runner(**feeds)  # second: captured, then launched
    replay = runner(**feeds)["latent"].clone()  # third: replayed
    torch.cuda.synchronize()
    assert runner.graph_shapes, "the UNet call was not captured in a CUDA graph"
    assert _rel_err(replay, eager) < 1e-3


@requires_trt
def test_shape_outside_the_built_profile_is_a_value_error(trt_tiny):
    d, r = trt_tiny
    runner, _ = _runner(d, r, "vae_decoder")
    with pytest.raises(ValueError, match="built for"):
        runner(latent=torch.zeros(1, 4, 24, 24, device="cuda", dtype=torch.float16))


@requires_trt
def test_engine_of_another_tensorrt_is_refused(trt_tiny):
    from engine import cache

    d, r = trt_tiny
    art = d / r.record["components"]["clip"]["dir"]
    manifest = cache.verify(art)
    manifest[tb.MANIFEST_KEY] = {**manifest[tb.MANIFEST_KEY], "version": "0.0.0"}
    with pytest.raises(tb.EngineIncompatible, match="rebuild"):
        get_backend("tensorrt").load(get_spec("clip"), art, manifest, "cuda")


@requires_trt
def test_plugin_attention_matches_decomposed(trt_tiny, tmp_path):
    pytest.importorskip("kernels.trt_plugin", reason="our TensorRT plugin (kernels.trt_plugin) is not built")
    d, r = trt_tiny
    plugin_dir = tmp_path / "plugin"
    pr = _build(plugin_dir, backend="tensorrt", attention="plugin", components=("unet",))
    plugin_runner, manifest = _runner(plugin_dir, pr, "unet")
    assert manifest[tb.MANIFEST_KEY]["attention"]["plugged"] > 0
    native_runner, _ = _runner(d, r, "unet")
    feeds = {k: v.cuda() for k, v in _inputs(r, "unet", r.record["precision"]).items()}
    native = native_runner(**feeds)["latent"].clone()
    plugged = plugin_runner(**feeds)["latent"].clone()
    torch.cuda.synchronize()
    assert _rel_err(plugged, native) < REL_TOL


# ---- LoRA: refit ----

def test_build_enable_refit_reaches_the_plan_and_the_fingerprint_key():
    """--build-enable-refit is a build choice of its own: it changes the plan (and so the artifact key)."""
    from engine.build import make_plan, parse_args

    cfg = parse_args(["--backend", "onnxruntime", "--build-enable-refit"])
    assert cfg.build_enable_refit and not parse_args([]).build_enable_refit
    profile = Profile(Shape(1, 64, 64), Shape(1, 64, 64), Shape(1, 64, 64))
    assert make_plan(cfg, get_backend("onnxruntime"), profile).enable_refit


@requires_trt
def test_refit_applies_a_lora_and_restores_the_built_weights(tmp_path, tiny_folder):
    """A refittable UNet engine takes merged weights by their ONNX names and goes back exactly; an engine built
    without refit refuses, naming the flag."""
    from engine.lora import load_lora, merged_tensors, parts_for

    lora = load_lora(write_kohya(tmp_path, 31, r=4, alpha=2.0))
    refit = _build(tmp_path / "refit", backend="tensorrt", components=("unet",), build_enable_refit=True)
    runner, _ = _runner(tmp_path / "refit", refit, "unet")
    feeds = {k: v.cuda() for k, v in _inputs(refit, "unet", refit.record["precision"]).items()}
    base = runner(**feeds)["latent"].clone()
    merged = merged_tensors(runner.base_weights(), parts_for([(lora, 1.0)], "unet"), "unet")
    runner.set_weights(merged)
    adapted = runner(**feeds)["latent"].clone()
    runner.set_weights(None)
    again = runner(**feeds)["latent"].clone()
    torch.cuda.synchronize()
    assert _rel_err(adapted, base) > 1e-3 and torch.equal(again, base)
    plain = _build(tmp_path / "plain", backend="tensorrt", components=("unet",))
    runner, _ = _runner(tmp_path / "plain", plain, "unet")
    with pytest.raises(ValueError, match="--build-enable-refit"):
        runner.set_weights(merged)
