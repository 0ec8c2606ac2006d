"""Shared fixtures: one private cache, and each preset materialised and each engine set built once per test
run (tiny on ONNX Runtime, torch and OpenVINO; tiny-xl on ONNX Runtime). Helpers: tests/helpers.py.

Under pytest-xdist (tests/run.sh runs `-n 2`) every worker is its own session: the cache and the engine dirs
live in one folder of the run that all workers share (pytest-xdist's documented pattern), and each is made
under a lock, so the first worker builds and the others find the build cached."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TINY_SD_COMPONENTS = ("clip", "unet", "vae_decoder", "vae_encoder")  # with the VAE encoder: img2img, inpainting


def _build(engine_dir: Path, **config):
    """engine.build.build_all on `config` (BuildConfig fields) into `engine_dir`; its BuildResult."""
    from engine.build import build_all
    from engine.config import BuildConfig

    return build_all(BuildConfig(engine_dir=engine_dir, **config), progress=False)


def _run_root(tmp_path_factory) -> Path:
    """The folder every worker of this test run shares: the basetemp's parent under xdist, else the basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def _shared(tmp_path_factory, name: str) -> Iterator[Path]:
    """`<run root>/<name>`, held under an exclusive lock for the block (one worker makes it at a time)."""
    from export.store import file_lock

    root = _run_root(tmp_path_factory)
    with file_lock(root / f".{name}.lock", f"the test fixture {name}"):
        yield root / name


def _shared_build(tmp_path_factory, name: str, **config) -> Path:
    """engine.build into the run's shared `name` dir; the first worker builds, the others find it cached."""
    with _shared(tmp_path_factory, name) as engine_dir:
        _build(engine_dir, **config)
    return engine_dir


def _loaded(engine_dir: Path):
    """The library's Pipeline on `engine_dir`, closed when the fixture that yields from this ends."""
    from engine.pipeline import Pipeline

    pipe = Pipeline.load(engine_dir)
    yield pipe
    pipe.close()


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory) -> Iterator[Path]:
    """Keep presets and conversions out of the user's ~/.cache for the whole session."""
    with _shared(tmp_path_factory, "sd_engine_cache") as root:
        root.mkdir(exist_ok=True)
    old = os.environ.get("SD_ENGINE_CACHE")
    os.environ["SD_ENGINE_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SD_ENGINE_CACHE", None)
    else:
        os.environ["SD_ENGINE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_folder(engine_cache) -> Path:
    from export.models import materialize_preset
    from export.presets import PRESETS

    return materialize_preset(PRESETS["tiny"])  # concurrent workers wait for one another (its own lock)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_folder):
    from export.models import load_model

    return load_model(tiny_folder)


@pytest.fixture(scope="session")
def ort_engines(tmp_path_factory, tiny_folder) -> Path:
    """tiny built for ONNX Runtime fp32 with the VAE encoder (img2img), default 64x64 (the e2e and CLI tests
    share it; ONNX Runtime takes any exported batch and size, the default only fills in what a request omits)."""
    return _shared_build(tmp_path_factory, "engines", model="tiny", backend="onnxruntime", precision="fp32",
                         height=64, width=64, components=TINY_SD_COMPONENTS)


@pytest.fixture(scope="session")
def ort_pipeline(ort_engines):
    """The library's Pipeline on `ort_engines`: the oracle the server and batching tests compare pixels with."""
    yield from _loaded(ort_engines)


@pytest.fixture(scope="session")
def torch_engines(tmp_path_factory, tiny_folder) -> Path:
    """tiny built for the torch backend on the CPU (fp32), default components (no VAE encoder), default 64x64."""
    return _shared_build(tmp_path_factory, "torch_engines", model="tiny", backend="torch", precision="fp32",
                         height=64, width=64)


@pytest.fixture(scope="session")
def ov_build(tmp_path_factory, ort_engines):
    """(engine dir, BuildResult) of tiny built for OpenVINO fp32 with the VAE encoder, 64x64, in a copy of
    `ort_engines` (so its fp32 ONNX exports are reused); skips where OpenVINO is not installed."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:  # not importorskip: a bare `import openvino` phones home
        pytest.skip("OpenVINO is not installed (a dependency on x86_64 and ARM64 only)")
    with _shared(tmp_path_factory, "ov_engines") as engine_dir:
        if not engine_dir.exists():
            shutil.copytree(ort_engines, engine_dir)
        return engine_dir, _build(engine_dir, model="tiny", backend="openvino", precision="fp32", height=64,
                                  width=64, components=TINY_SD_COMPONENTS)


@pytest.fixture(scope="session")
def ov_engines(ov_build) -> Path:
    return ov_build[0]


@pytest.fixture(scope="session")
def ov_int8_build(tmp_path_factory, ov_engines):
    """(engine dir, BuildResult) of tiny built for OpenVINO int8 (NNCF int8 weights) with the VAE encoder, 64x64, in
    a copy of `ov_engines` (its fp32 ONNX exports reused); skips where NNCF is not installed."""
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        pytest.skip("NNCF is not installed (a dependency where OpenVINO is: pip install nncf)")
    with _shared(tmp_path_factory, "ov_int8_engines") as engine_dir:
        if not engine_dir.exists():
            shutil.copytree(ov_engines, engine_dir)
        return engine_dir, _build(engine_dir, model="tiny", backend="openvino", precision="int8", height=64,
                                  width=64, components=TINY_SD_COMPONENTS)


@pytest.fixture(scope="session")
def xl_folder(engine_cache) -> Path:
    """The materialised `tiny-xl` diffusers folder."""
    from export.models import materialize_preset
    from export.presets import ALL_PRESETS

    return materialize_preset(ALL_PRESETS["tiny-xl"])


@pytest.fixture(scope="session")
def xl_engines(tmp_path_factory, xl_folder) -> Path:
    """tiny-xl built for ONNX Runtime fp32 with the VAE encoder, batch 2, 64x64 (txt2img, img2img, inpainting
    and LoRA tests share it)."""
    return _shared_build(tmp_path_factory, "xl_engines", model="tiny-xl", backend="onnxruntime", precision="fp32",
                         batch_size=2, height=64, width=64,
                         components=("clip", "clip2", "unet", "vae_decoder", "vae_encoder"))


@pytest.fixture(scope="session")
def xl_pipeline(xl_engines):
    """The library's Pipeline on `xl_engines` (tests that change its adapters or runners load their own)."""
    yield from _loaded(xl_engines)


@pytest.fixture(scope="session")
def xl_refiner_folder(engine_cache) -> Path:
    """The materialised `tiny-xl-refiner` diffusers folder (SDXL's refiner on tiny-xl's scale)."""
    from export.models import materialize_preset
    from export.presets import ALL_PRESETS

    return materialize_preset(ALL_PRESETS["tiny-xl-refiner"])


@pytest.fixture(scope="session")
def xl_pair_engines(tmp_path_factory, xl_engines, xl_refiner_folder) -> Path:
    """One engine dir holding tiny-xl (a copy of `xl_engines`' model) and tiny-xl-refiner built beside it for ONNX
    Runtime fp32, batch 2, 64x64 (the refiner and the base -> refiner handoff tests share it; load with a model)."""
    with _shared(tmp_path_factory, "xl_pair_engines") as engine_dir:
        for model_dir in xl_engines.iterdir():
            if model_dir.is_dir() and not (engine_dir / model_dir.name).exists():
                shutil.copytree(model_dir, engine_dir / model_dir.name)
        _build(engine_dir, model="tiny-xl-refiner", backend="onnxruntime", precision="fp32", batch_size=2, height=64,
               width=64)
    return engine_dir


@pytest.fixture(scope="session")
def upscaler_folder(engine_cache) -> Path:
    """The seeded tiny-upscaler preset as a StableDiffusionUpscalePipeline folder."""
    from export.models import resolve_model

    return resolve_model("tiny-upscaler")[0]


@pytest.fixture(scope="session")
def upscaler_engines(tmp_path_factory, upscaler_folder) -> Path:
    """tiny-upscaler built for ONNX Runtime fp32 (clip, unet, vae_decoder), default 64x64 out (16x16 in)."""
    return _shared_build(tmp_path_factory, "upscaler-engines", model="tiny-upscaler", backend="onnxruntime",
                         precision="fp32", height=64, width=64)


@pytest.fixture(scope="session")
def ldm_sr_engines(tmp_path_factory, engine_cache) -> Path:
    """tiny-ldm-sr (LDMSuperResolutionPipeline: UNet2DModel + VQ-f4) built for ONNX Runtime fp32, 128x128 out."""
    return _shared_build(tmp_path_factory, "ldm-sr-engines", model="tiny-ldm-sr", backend="onnxruntime",
                         precision="fp32", height=128, width=128)


@pytest.fixture(scope="session")
def upscaler_pair_engines(tmp_path_factory, ort_engines, upscaler_engines) -> Path:
    """One engine dir holding tiny (a copy of `ort_engines`' model, with its VAE encoder) and tiny-upscaler (a copy of
    `upscaler_engines`' model): the hires fix's x4 upscaler finds it beside the model (load with a model)."""
    with _shared(tmp_path_factory, "upscaler_pair_engines") as engine_dir:
        for source in (ort_engines, upscaler_engines):
            for model_dir in source.iterdir():
                if model_dir.is_dir() and not (engine_dir / model_dir.name).exists():
                    shutil.copytree(model_dir, engine_dir / model_dir.name)
    return engine_dir


@pytest.fixture(scope="session")
def weighted_folder(tmp_path_factory, tiny_folder) -> Path:
    """`tiny` whose text encoder's final LayerNorm has a bias around 0.5 (hidden states with a mean off zero, as a
    trained CLIP's; A1111's emphasis rescales by that mean): the prompt and embedding tests' model."""
    import torch

    from tests.helpers import with_text_encoders

    g = torch.Generator().manual_seed(3)

    def shift(sub, encoder) -> None:
        norm = encoder.get_submodule("final_layer_norm")
        norm.bias.copy_(0.5 + 0.1 * torch.randn(norm.bias.shape, generator=g))

    with _shared(tmp_path_factory, "tiny-weighted") as folder:
        return folder if folder.is_dir() else with_text_encoders(tiny_folder, folder, shift)


@pytest.fixture(scope="session")
def weighted_engines(tmp_path_factory, weighted_folder) -> Path:
    """`weighted_folder` built for ONNX Runtime fp32, 64x64 (the prompt and textual-inversion tests share it)."""
    return _shared_build(tmp_path_factory, "weighted_engines", model=str(weighted_folder), backend="onnxruntime",
                         precision="fp32", height=64, width=64)


@pytest.fixture(scope="module")
def cuda_pipe(tmp_path_factory, tiny_folder):
    """tiny on the torch backend on CUDA, fp16 (GPU tests only: they skip before asking for it)."""
    from engine.pipeline import Pipeline

    d = tmp_path_factory.mktemp("cuda_engines")
    _build(d, model="tiny", backend="torch", device="cuda", precision="fp16", batch_size=2)
    return Pipeline.load(d)


@pytest.fixture(scope="session")
def conditioned_parts(tmp_path_factory, tiny_folder) -> dict[str, Path]:
    """tiny's seeded random ControlNets `edges` and `depth` and its IP-Adapter `ip-tiny` (with its image encoder),
    made once per run in a folder every worker shares."""
    from export.control import random_controlnet
    from export.ip_adapter import random_ip_adapter

    with _shared(tmp_path_factory, "conditioned_parts") as root:
        return {"edges": random_controlnet(tiny_folder, root / "edges", 11, (8, 16, 16, 32), std=0.3),
                "depth": random_controlnet(tiny_folder, root / "depth", 12, (8, 16, 16, 32), std=0.3),
                "ip": random_ip_adapter(tiny_folder, root / "ip-tiny", seed=5)}


@pytest.fixture(scope="session")
def conditioned_engines(tmp_path_factory, conditioned_parts) -> Path:
    """tiny built for ONNX Runtime fp32, 64x64, with the VAE encoder, both ControlNets and the IP-Adapter: the
    ControlNet and IP-Adapter tests share it (a request without control or image prompt is the plain image)."""
    parts = conditioned_parts
    return _shared_build(tmp_path_factory, "conditioned_engines", model="tiny", backend="onnxruntime",
                         precision="fp32", height=64, width=64, components=TINY_SD_COMPONENTS,
                         controlnets=(str(parts["edges"]), str(parts["depth"])), ip_adapter=str(parts["ip"]))


@pytest.fixture(scope="session")
def xl_conditioned_parts(tmp_path_factory, xl_folder) -> dict[str, Path]:
    """tiny-xl's seeded random ControlNet `xl_edges` and IP-Adapter `ip-xl`, made once per run."""
    from export.control import random_controlnet
    from export.ip_adapter import random_ip_adapter

    with _shared(tmp_path_factory, "xl_conditioned_parts") as root:
        return {"edges": random_controlnet(xl_folder, root / "xl_edges", 21, (8, 16, 16, 32), std=0.3),
                "ip": random_ip_adapter(xl_folder, root / "ip-xl", seed=7)}


@pytest.fixture(scope="session")
def xl_conditioned_engines(tmp_path_factory, xl_conditioned_parts) -> Path:
    """tiny-xl built for ONNX Runtime fp32, 64x64, with its ControlNet and its IP-Adapter: the SDXL ControlNet and
    IP-Adapter tests share it (a request without control or image prompt is the plain image)."""
    parts = xl_conditioned_parts
    return _shared_build(tmp_path_factory, "xl_conditioned_engines", model="tiny-xl", backend="onnxruntime",
                         precision="fp32", height=64, width=64, controlnets=(str(parts["edges"]),),
                         ip_adapter=str(parts["ip"]))


@pytest.fixture(scope="session")
def ldm_uncond_engines(tmp_path_factory, engine_cache) -> Path:
    """tiny-ldm-uncond (LDMPipeline: UNet2DModel + VQ-f4, no condition) built for ONNX Runtime fp32, 64x64."""
    return _shared_build(tmp_path_factory, "ldm-uncond-engines", model="tiny-ldm-uncond", backend="onnxruntime",
                         precision="fp32", height=64, width=64)


@pytest.fixture(scope="session")
def ldm_class_engines(tmp_path_factory, engine_cache) -> Path:
    """tiny-ldm-cin (the class-conditional LDM: class table -> UNet2DConditionModel context, VQ-f4) built for ONNX
    Runtime fp32 with its VQ encoder (img2img), 64x64."""
    return _shared_build(tmp_path_factory, "ldm-class-engines", model="tiny-ldm-cin", backend="onnxruntime",
                         precision="fp32", height=64, width=64,
                         components=("class_embedder", "unet", "vae_decoder", "vae_encoder"))


@pytest.fixture(scope="session")
def ldm_text_engines(tmp_path_factory, engine_cache) -> Path:
    """tiny-ldm-text (LDMTextToImagePipeline: LDMBert, UNet2DConditionModel, KL-f8) for ONNX Runtime fp32, 64x64."""
    return _shared_build(tmp_path_factory, "ldm-text-engines", model="tiny-ldm-text", backend="onnxruntime",
                         precision="fp32", height=64, width=64)


@pytest.fixture(scope="session")
def ldm_semantic_engines(tmp_path_factory, engine_cache) -> Path:
    """tiny-ldm-semantic (spatial rescaler over 182 classes, UNet2DModel on latents + condition, VQ-f4) for ONNX
    Runtime fp32, 64x64 as built (any multiple of 8 runs)."""
    return _shared_build(tmp_path_factory, "ldm-semantic-engines", model="tiny-ldm-semantic", backend="onnxruntime",
                         precision="fp32", height=64, width=64)


@pytest.fixture(scope="session")
def ldm_layout_engines(tmp_path_factory, engine_cache) -> Path:
    """tiny-ldm-layout (LDMBert's encoder over 92 layout tokens -> UNet2DConditionModel, VQ-f4) for ONNX Runtime fp32,
    64x64."""
    return _shared_build(tmp_path_factory, "ldm-layout-engines", model="tiny-ldm-layout", backend="onnxruntime",
                         precision="fp32", height=64, width=64)


@pytest.fixture(scope="session")
def cache_engines(tmp_path_factory, tiny_folder) -> Path:
    """tiny for ONNX Runtime fp32 with the feature cache of skip branch 0 (DeepCache: the full UNet that returns the
    cache, and its shallow graph) and the VAE encoder, 64x64."""
    return _shared_build(tmp_path_factory, "cache-engines", model="tiny", backend="onnxruntime", precision="fp32",
                         height=64, width=64, components=TINY_SD_COMPONENTS, cache_branch=0)


@pytest.fixture(scope="session")
def cache_pipeline(cache_engines):
    yield from _loaded(cache_engines)


@pytest.fixture(scope="session")
def tiny_vae_engines(tmp_path_factory, tiny_folder, engine_cache) -> Path:
    """tiny for ONNX Runtime fp32 with a seeded random AutoencoderTiny (TAESD's architecture) as its preview decoder,
    64x64 (the other components' exports are the shared ones of `ort_engines`)."""
    from export.tiny_vae import random_tiny_vae

    taesd = random_tiny_vae(engine_cache / "taesd-random", seed=0)
    return _shared_build(tmp_path_factory, "tiny-vae-engines", model="tiny", backend="onnxruntime", precision="fp32",
                         height=64, width=64, tiny_vae=str(taesd))


@pytest.fixture(scope="session")
def tiny_vae_pipeline(tiny_vae_engines):
    yield from _loaded(tiny_vae_engines)
