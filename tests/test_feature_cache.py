"""Feature caching (DeepCache) vs DeepCache's own `DeepCacheSDHelper` on diffusers' pipelines, the same seeded tiny
model: txt2img with two samplers, img2img, LoRA; interval 1 is today's image exactly; the center schedule is
DeepCache's; step batching; the other CPU backends; the graphs vs torch; bad input by field."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.pipeline import Pipeline
from engine.request import Request, RequestError
from tests.helpers import PROMPTS, Wrapped, alone, drive, gens, init_image, max_diff, to_uint8
from tests.sampler_cases import diffusers_scheduler

SEEDS = [21, 8]
SIZE = 64


@pytest.fixture(scope="module")
def components(cache_pipeline):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(cache_pipeline.info["source"], safety_checker=None,
                                                   local_files_only=True).components


def deepcache(ref_pipe, interval: int, branch: int = 0, **call) -> np.ndarray:
    """diffusers' pipeline with DeepCache's helper enabled (its images as uint8), then the helper disabled."""
    from DeepCache import DeepCacheSDHelper

    ref_pipe.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=ref_pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return to_uint8(ref_pipe(PROMPTS, guidance_scale=7.5, generator=gens(SEEDS), output_type="np", **call).images)
    finally:
        helper.disable()


def ours(pipe: Pipeline, **fields) -> np.ndarray:
    reqs = [Request(prompt=p, seed=s, guidance_scale=7.5, height=SIZE, width=SIZE, **fields)
            for p, s in zip(PROMPTS, SEEDS, strict=True)]
    return np.stack([g.pixels for g in pipe.run(reqs, progress=False, batch_size=2)])


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_txt2img_matches_deepcache_helper(cache_pipeline, components, sampler):
    from diffusers import StableDiffusionPipeline

    ref_pipe = StableDiffusionPipeline(**components)
    ref_pipe.scheduler = diffusers_scheduler(sampler, cache_pipeline.scheduler_config)
    want = deepcache(ref_pipe, 3, num_inference_steps=10, height=SIZE, width=SIZE)
    got = ours(cache_pipeline, sampler=sampler, steps=10, cache_interval=3)
    assert max_diff(got, want) <= 2, sampler
    full = ours(cache_pipeline, sampler=sampler, steps=10)
    assert max_diff(got, full) > 5  # the shallow steps changed the image: the cache was used, not recomputed


def test_img2img_matches_deepcache_helper(cache_pipeline, components):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref_pipe = StableDiffusionImg2ImgPipeline(**components)
    ref_pipe.scheduler = diffusers_scheduler("ddim", cache_pipeline.scheduler_config)
    image = init_image()
    want = deepcache(ref_pipe, 2, image=image, strength=0.6, num_inference_steps=10)
    got = ours(cache_pipeline, sampler="ddim", steps=10, cache_interval=2, init_image=image, strength=0.6)
    assert max_diff(got, want) <= 2


def test_interval_one_is_todays_image(cache_pipeline, ort_pipeline):
    """Engines built with the cache, run without it, give the image of engines built without it, exactly."""
    got = ours(cache_pipeline, sampler="dpmpp_2m", steps=6)
    want = ours(ort_pipeline, sampler="dpmpp_2m", steps=6)
    assert np.array_equal(got, want)


def test_lora_swaps_both_graphs(cache_pipeline, tiny_folder, tmp_path):
    from engine.lora import Adapter
    from tests.helpers import fused_pipe, write_peft

    lora = write_peft(tiny_folder, tmp_path, 1, alpha=8, metadata=True)
    ref_pipe = fused_pipe(tiny_folder, [(lora, 0.9)])
    ref_pipe.scheduler = diffusers_scheduler("euler", cache_pipeline.scheduler_config)
    want = deepcache(ref_pipe, 3, num_inference_steps=8, height=SIZE, width=SIZE)
    got = ours(cache_pipeline, sampler="euler", steps=8, cache_interval=3, loras=(Adapter(lora, 0.9),))
    assert max_diff(got, want) <= 2
    plain = ours(cache_pipeline, sampler="euler", steps=8, cache_interval=3)  # adapters off: both graphs as built
    assert max_diff(plain, got) > 2


# DeepCache's sample_from_quad_center(steps, ceil(steps / interval), center, pow=1.4) indices, from DeepCache 0.1.1's
# own function (DeepCache/sd/pipeline_stable_diffusion.py) run on these arguments
CENTER = {(20, 2, 10): [0, 3, 5, 7, 9, 10, 11, 13, 15, 17], (20, 3, 10): [0, 4, 7, 9, 11, 13, 16],
          (20, 5, 10): [0, 6, 10, 14], (20, 3, 15): [0, 4, 8, 11, 14, 15, 17],
          (50, 3, 25): [0, 4, 7, 10, 13, 16, 19, 21, 24, 26, 29, 31, 34, 37, 40, 43, 46],
          (50, 5, 15): [0, 5, 9, 13, 17, 21, 26, 31, 37, 43], (10, 3, 5): [0, 3, 5, 7]}


@pytest.mark.parametrize("case", list(CENTER))
def test_center_schedule_is_deepcaches(case):
    from engine.feature_cache import center_steps

    steps, interval, center = case
    assert center_steps(steps, -(-steps // interval), center) == CENTER[case]


def test_uniform_schedule_counts_from_the_first_step_run():
    from engine.feature_cache import full_steps

    plan = full_steps(Request(cache_interval=3), 4, 12)  # img2img: steps 4 .. 11 run
    assert [i for i, f in enumerate(plan or ()) if f] == [4, 7, 10]
    assert full_steps(Request(), 0, 10) is None


def test_center_run_uses_the_full_graph_on_deepcaches_steps(cache_engines):
    pipe = Pipeline.load(cache_engines)
    try:
        unet, shallow = Wrapped(pipe.runners["unet"]), Wrapped(pipe.runners["unet_shallow"])
        pipe.runners.update(unet=unet, unet_shallow=shallow)
        order: list[str] = []
        unet._call = lambda r, **x: (order.append("full"), r(**x))[1]
        shallow._call = lambda r, **x: (order.append("shallow"), r(**x))[1]
        pipe.run(Request(prompt="a", steps=20, cache_interval=3, cache_schedule="center", sampler="euler",
                         height=SIZE, width=SIZE), progress=False)
        assert [i for i, k in enumerate(order) if k == "full"] == CENTER[(20, 3, 10)]
        assert len(order) == 20
    finally:
        pipe.close()


def test_step_batched_rows_match_each_alone(cache_pipeline):
    """Rows that join a flight at other steps (so one is at a full step while another is at a shallow one) give the
    images each request gives alone."""
    from engine.continuous import Flight

    a = Request(prompt=PROMPTS[0], steps=9, seed=3, sampler="euler", cache_interval=3, height=SIZE, width=SIZE)
    b = Request(prompt=PROMPTS[1], steps=7, seed=4, sampler="euler", cache_interval=3, height=SIZE, width=SIZE)
    images, errors = drive(Flight(cache_pipeline, max_batch=4), {0: [(a, "a")], 2: [(b, "b")]}, cache_pipeline)
    assert not errors
    for owner, req in (("a", a), ("b", b)):
        (want,) = alone(cache_pipeline, req)
        assert max_diff(images[owner][0][1], want) <= 1, owner


@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_other_backends_match_onnxruntime(tmp_path_factory, cache_pipeline, backend):
    import importlib.util

    from engine.build import build_all
    from engine.config import BuildConfig

    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("OpenVINO is not installed (a dependency on x86_64 and ARM64 only)")
    engine_dir = tmp_path_factory.mktemp(f"cache-{backend}")
    build_all(BuildConfig(model="tiny", backend=backend, precision="fp32", height=SIZE, width=SIZE, cache_branch=0,
                          engine_dir=engine_dir), progress=False)
    pipe = Pipeline.load(engine_dir)
    try:
        got = ours(pipe, sampler="euler", steps=8, cache_interval=2)
    finally:
        pipe.close()
    assert max_diff(got, ours(cache_pipeline, sampler="euler", steps=8, cache_interval=2)) <= 2


def test_graphs_match_torch(cache_engines, tiny_folder):
    """The full graph's cache output and the shallow graph vs their torch modules (ONNX Runtime, two shapes)."""
    import dataclasses

    from engine import cache
    from export.feature_cache import with_feature_cache
    from export.models import load_model
    from tests.helpers import check_parity

    record = cache.read_record(next(cache_engines.iterdir()) / cache.BUILD_RECORD)
    model = load_model(tiny_folder)
    model = dataclasses.replace(model, family=with_feature_cache(model.family, record["feature_cache"]))
    for name in ("unet", "unet_shallow"):
        path = next(cache_engines.iterdir()) / record["components"][name]["dir"] / "model.onnx"
        check_parity(model, name, path)


def test_bad_input_is_named(cache_pipeline, ort_pipeline):
    for value in (0, 101, True, 1.5, "3"):
        with pytest.raises(RequestError) as e:
            cache_pipeline.prepare(Request(prompt="a", cache_interval=value))
        assert e.value.field == "cache_interval"
    with pytest.raises(RequestError) as e:
        cache_pipeline.prepare(Request(prompt="a", cache_interval=2, cache_schedule="middle"))
    assert e.value.field == "cache_schedule"
    with pytest.raises(RequestError) as e:  # engines built without the shallow graph: say how to build it
        ort_pipeline.prepare(Request(prompt="a", cache_interval=2))
    assert e.value.field == "cache_interval" and "--cache-branch" in str(e.value)


def test_build_refuses_what_it_cannot_split(tiny_folder):
    from export.control import with_controls
    from export.families import SD
    from export.feature_cache import check_family, unet_split
    from export.specs import Dims

    unet = {"_class_name": "UNet2DConditionModel", "block_out_channels": [64, 128], "layers_per_block": 1}
    with pytest.raises(ValueError, match="cache branch 2 is not a skip branch"):
        unet_split(2, unet)
    dims = Dims(residual_channels=(64, 64, 64, 128, 128), residual_scales=(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="down_residual"):
        check_family(with_controls(SD, ("edges",), dims), unet)


def test_sd15_split_is_hand_worked():
    """SD 1.5's UNet (4 blocks of 2 resnets, up blocks of 3): branch 0 caches the 320-channel feature entering the
    last up block's last layer at the latent size; branch 4 the 640-channel one entering up block 2's second layer at
    1/2; no branch reads a cached skip (each runs as many layers down as up)."""
    from export.feature_cache import layout, unet_split

    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}
    assert layout(0, sd15) == [(320, 1)]
    assert layout(2, sd15) == [(640, 1)]  # the whole last up block runs: its input, up block 2's output
    assert layout(4, sd15) == [(640, 2)]
    s = unet_split(4, sd15)
    assert (s.down_run, s.up_block, s.first_layer, s.down_layers, s.cached_skips) == (1, 2, 1, 1, ())
    assert layout(11, sd15) == [(1280, 8)]  # the deepest branch: the mid block's output enters up block 0


def test_cli_writes_the_cache_into_the_image(cache_engines, tmp_path, capsys):
    from PIL import Image

    from engine.generate import main

    out = tmp_path / "cached.png"
    assert main(["--engine-dir", str(cache_engines), "--prompt", "a fox", "--steps", "6", "--cache-interval", "3",
                 "--cache-schedule", "center", "--output", str(out)]) == 0
    text = Image.open(out).text["parameters"]
    assert "Cache interval: 3" in text and "Cache schedule: center" in text
    capsys.readouterr()
    assert main(["--engine-dir", str(cache_engines), "--prompt", "a fox", "--cache-interval", "0",
                 "--output", str(tmp_path / "no.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --cache-interval 0 must be an integer in [1, 100] (1 = every step in full)"]


def test_the_server_body_carries_the_cache_fields():
    from pydantic import ValidationError

    from engine.server.schemas import GenerateBody

    r = GenerateBody(prompt="x", cache_interval=4, cache_schedule="center").to_request()
    assert (r.cache_interval, r.cache_schedule) == (4, "center")
    for bad in ({"cache_interval": 0}, {"cache_interval": 101}, {"cache_schedule": "middle"}):
        with pytest.raises(ValidationError) as e:
            GenerateBody(prompt="x", **bad)
        assert e.value.errors()[0]["loc"] == (next(iter(bad)),)


def _helper_steps(pipe, inputs: list[dict], branch: int) -> list[torch.Tensor]:
    """The UNet's outputs on two steps under DeepCache's helper (interval 2: the first full, the second from its
    cache), each step at the scheduler's timestep of its index."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=branch)
    helper.enable()
    try:
        with torch.no_grad():
            return [_unet(pipe, x) for x in inputs]
    finally:
        helper.disable()


def _unet(pipe, x: dict) -> torch.Tensor:
    rest = {k: v for k, v in x.items() if k not in ("sample", "timestep")}
    return pipe.unet(x["sample"], x["timestep"], **rest).sample  # positional, as the pipelines call it (and DeepCache
    # reads the timestep from there)


@pytest.mark.parametrize(("preset", "branches"), [("tiny", (0, 1, 3, 4)), ("tiny-xl", (0, 1, 3))])
def test_split_matches_deepcache_on_sd_and_sdxl_unets(preset, branches, engine_cache):
    """Our full/shallow torch modules against DeepCache's helper, step by step, for every branch of the tiny SD UNet
    and the tiny SDXL UNet (added text and time conditioning): the full step equals the plain UNet and the shallow
    step equals the helper's cached step."""
    from diffusers import DiffusionPipeline

    from export.families.cache_wrappers import CacheUNet
    from export.models import materialize_preset
    from export.presets import ALL_PRESETS

    pipe = DiffusionPipeline.from_pretrained(materialize_preset(ALL_PRESETS[preset]), local_files_only=True)
    pipe.scheduler.set_timesteps(10)
    c = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    ehs = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    added = {}
    if c.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim,
                                            generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    steps = [{"sample": torch.randn(2, c.in_channels, 8, 8, generator=g), "timestep": pipe.scheduler.timesteps[i],
              "encoder_hidden_states": ehs, **({"added_cond_kwargs": added} if added else {})} for i in (0, 1)]
    for branch in branches:
        want = _helper_steps(pipe, steps, branch)
        full, shallow = CacheUNet(pipe.unet, branch, False), CacheUNet(pipe.unet, branch, True)
        with torch.no_grad():
            args = [(x["sample"], x["timestep"].expand(2), ehs, added.get("text_embeds"), added.get("time_ids"))
                    for x in steps]
            first, *cache = full(*args[0])
            second = shallow(*args[1], cache=tuple(cache))
            plain = _unet(pipe, steps[1])
        torch.testing.assert_close(first, want[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(second, want[1], rtol=0, atol=1e-6)
        assert (second - plain).abs().max() > 1e-4, branch  # the second step really read the cache
