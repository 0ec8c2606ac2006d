"""What several test modules share, and test-only helpers that product code does not need, written once:
prompts, seeded generators and images, pixel comparisons, bounded waits, the server launcher and its metrics, runner
wrappers, ONNX graph checks and op counts, LoRA files and their merge into torch modules, the continuous-batching
driver and TensorRT manifests. No test module imports another test module.

Helper modules of their own: tests/ldm_layout.py (the LDM single-file writer of the single-file tests),
tests/sampler_cases.py (the sampler parity cases and the diffusers reference scheduler), tests/a1111.py (A1111's
infotext parsing) and tests/kernel_cases.py (the attention kernel cases shared by the CPU and GPU tests).
"""
from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from benchmarks.serve_process import (  # noqa: F401 (re-exported: the server tests' launcher)
    Server,
    free_port,
    http,
    running_server,
    wait_ready,
)
from engine.lora import TARGETS, AppliedLora, LoraWeights, merged_weights, parts_for
from export.specs import Shape

T = TypeVar("T")

# ---- prompts, generators, images ----------------------------------------------------------------------------

PROMPTS = ["a watercolor painting of a lighthouse", "a red bicycle"]
SIZE = 64  # the side of the small test images (and of `ort_engines`' default)


def gens(seeds) -> list[torch.Generator]:
    """One seeded CPU generator per seed, as diffusers' pipelines take them."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def init_image(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A smooth random picture (blurred noise), seeded."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def mask_image(size: int = SIZE) -> Image.Image:
    """A white rectangle (the region to repaint) on black."""
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((size // 4, size // 8, 3 * size // 4, size // 2), fill=255)
    return m


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def b64_png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode()


def png_pixels(png: bytes | str) -> np.ndarray:
    """RGB pixels of a PNG, given as bytes or as base64 text (a `b64_png` / `b64_json` field)."""
    data = base64.b64decode(png) if isinstance(png, str) else png
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---- pixel comparisons --------------------------------------------------------------------------------------


def to_uint8(x: np.ndarray) -> np.ndarray:
    """diffusers' float images in [0, 1] as 8-bit pixels (what its numpy_to_pil does)."""
    return (x * 255).round().astype(np.uint8)


def stack_pixels(results) -> np.ndarray:
    """The pixels of a list of GeneratedImage as one array (N, H, W, 3)."""
    return np.stack([r.pixels for r in results])


def max_diff(a, b) -> int:
    """The largest absolute difference of two pixel arrays (uint8 or not), as an int."""
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def assert_same_pixels(got, want, tolerance: int = 1) -> None:
    """Same shape and at most `tolerance`/255 apart (1: the batch-invariance bound)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = max_diff(got, want)
    assert diff <= tolerance, f"max pixel difference {diff} > {tolerance}/255"


# ---- waiting ------------------------------------------------------------------------------------------------


def wait_until(pred: Callable[[], T], timeout_s: float, message: str | Callable[[], str] = "",
               interval_s: float = 0.02) -> T:
    """Poll `pred` until it returns something truthy (returned), failing after `timeout_s` seconds with `message`
    (a string or a callable giving one, e.g. a server's log)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"not true after {timeout_s} s: {text or pred}")
        time.sleep(interval_s)


# ---- a running server's metrics -----------------------------------------------------------------------------


def metric(server: Server, name: str, *, required: bool = False) -> float:
    """The value of one series of the server's /metrics (e.g. `sd_inference_count_total`, or a labelled
    `sd_inference_request_failure_total{reason="queue_full"}`); 0 when absent, unless `required`."""
    status, text, _ = server.get("/metrics", 10.0)
    assert status == 200, text
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    if required:
        raise AssertionError(f"{name} not in /metrics")
    return 0.0


def wait_for_metric(server: Server, name: str, at_least: float, timeout_s: float = 60.0) -> None:
    """Until the series reaches `at_least`."""
    wait_until(lambda: metric(server, name) >= at_least, timeout_s, f"{name} stayed below {at_least}")


# ---- runners ------------------------------------------------------------------------------------------------


class Wrapped:
    """Behaves as `runner` (attributes, graph_safe, close) but calls `call(runner, **inputs)` instead, and
    records each call's input shapes in `calls` (to count a runner's calls or change its outputs)."""

    def __init__(self, runner, call: Callable | None = None, graph_safe: bool | None = None):
        self.runner, self.calls = runner, []
        self._call = call or (lambda r, **inputs: r(**inputs))
        self._graph_safe = graph_safe

    @property
    def graph_safe(self) -> bool:
        return self.runner.graph_safe if self._graph_safe is None else self._graph_safe

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __call__(self, **inputs):
        self.calls.append({k: tuple(v.shape) for k, v in inputs.items()})
        return self._call(self.runner, **inputs)


# ---- ONNX graphs vs their torch modules ---------------------------------------------------------------------


EXPORT_SHAPES = (Shape(1, 128, 128), Shape(3, 64, 96))  # a graph's export shape, and another batch and size


def check_parity(model, name: str, path, precision: str = "fp32", atol: float = 1e-4) -> None:
    """Every output of the ONNX graph in ONNX Runtime vs the torch module, at EXPORT_SHAPES (spec from the
    model's family)."""
    from export import control, feature_cache
    from export.models import component_module
    from export.onnx_export import example_inputs, run_onnx

    spec = model.family.spec(name)
    for shape in EXPORT_SHAPES:
        inputs = example_inputs(spec, model.dims, shape, precision, seed=3)
        with torch.no_grad():  # ControlNet residuals and a feature cache reach the wrappers as tuples
            ref = component_module(model, name)(**feature_cache.pack(control.pack(inputs)))
        refs = ref if isinstance(ref, tuple) else (ref,)
        onnx_out = run_onnx(path, inputs)
        expected = spec.output_shapes(model.dims, shape.batch * spec.batch_factor, shape.height, shape.width)
        assert len(refs) == len(spec.output_names)
        for out_name, want in zip(spec.output_names, refs, strict=True):
            got = torch.from_numpy(onnx_out[out_name])
            assert tuple(got.shape) == expected[out_name] == tuple(want.shape)
            torch.testing.assert_close(got, want, atol=atol, rtol=0)


def check_graph(path, spec) -> None:
    """The graph's input/output names are the spec's, and every dynamic axis of the spec is symbolic."""
    import onnx

    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == spec.input_names
    assert [o.name for o in graph.graph.output] == spec.output_names
    for t, vi in zip(spec.inputs, graph.graph.input, strict=True):
        dims = vi.type.tensor_type.shape.dim
        for axis in t.dynamic_axes:
            assert dims[axis].dim_param, f"{spec.name}.{t.name} axis {axis} should be dynamic"


def count_ops(path: Path) -> dict[str, int]:
    """op_type (prefixed by its domain when custom) -> count, over the main graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---- LoRA files on `tiny` (seeded, random) ------------------------------------------------------------------

KOHYA_UNET = [f"down_blocks_0_attentions_0_transformer_blocks_0_attn{i}_{p}" for i in (1, 2)
              for p in ("to_q", "to_k", "to_v", "to_out_0")]
KOHYA_TE = [f"text_model_encoder_layers_{i}_{p}" for i in (0, 1)
            for p in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1")]


def sd_pipe(folder: Path):
    """diffusers' StableDiffusionPipeline on a tiny folder (no safety checker, no progress bars)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_peft(folder: Path, out: Path, seed: int, alpha: int, metadata: bool) -> Path:
    """UNet attention + text-encoder attention LoRA via PEFT, B randomised; with or without PEFT's config."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = sd_pipe(folder)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=alpha, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj", "fc1"]))
    unet, te = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    for sd in (unet, te):
        for k in sd:
            if "lora_B" in k:
                sd[k] = torch.randn_like(sd[k]) * 0.1
    meta = {}
    if metadata:
        meta = dict(unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
                    text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    name = f"peft_{seed}.safetensors"
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=unet, text_encoder_lora_layers=te,
                                              weight_name=name, **meta)
    return out / name


def kohya_pair(sd: dict, key: str, shape_out: int, shape_in: int, r: int, alpha: float, g, kernel: int = 0):
    down_shape = (r, shape_in, kernel, kernel) if kernel else (r, shape_in)
    up_shape = (shape_out, r, 1, 1) if kernel else (shape_out, r)
    sd[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.1
    sd[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.1
    sd[f"{key}.alpha"] = torch.tensor(float(alpha))


def write_kohya(out: Path, seed: int, r: int, alpha: float) -> Path:
    """kohya-ss keys: UNet attention (Linear), a 3x3 resnet conv and a 1x1 proj_in conv; text-encoder attn + MLP.
    One alpha per file: diffusers (the oracle) only honours per-module alphas that all agree."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key in KOHYA_UNET:
        in_ = 32 if "attn2" in key and key.endswith(("to_k", "to_v")) else 64
        kohya_pair(sd, f"lora_unet_{key}", 64, in_, r, alpha, g)
    kohya_pair(sd, "lora_unet_down_blocks_0_resnets_0_conv1", 64, 64, r, alpha, g, kernel=3)
    kohya_pair(sd, "lora_unet_down_blocks_0_attentions_0_proj_in", 64, 64, r, alpha, g, kernel=1)
    for key in KOHYA_TE:
        kohya_pair(sd, f"lora_te_{key}", 64 if key.endswith("fc1") else 32, 32, r, alpha, g)
    path = out / f"kohya_{seed}.safetensors"
    save_file(sd, str(path))
    return path


def fused_pipe(folder: Path, adapters: list[tuple[Path, float]]):
    """diffusers' answer: load_lora_weights + set_adapters + fuse_lora, adapters unloaded (fused weights kept)."""
    pipe = sd_pipe(folder)
    names = [f"a{i}" for i in range(len(adapters))]
    for name, (path, _) in zip(names, adapters, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, [s for _, s in adapters])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return pipe


def apply_to_models(models: Mapping[str, nn.Module], loras: Sequence[tuple[LoraWeights, float]]) -> AppliedLora:
    """Merge whole adapters into sub-models by name ("unet", "text_encoder", ...); one handle undoes all."""
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for target in TARGETS:
        parts = parts_for(loras, target)
        if parts and target not in models:
            raise ValueError(f"LoRA {parts[0][0].adapter!r} has {target} weights but the model has no {target}")
        if parts:
            merged[target] = merged_weights(models[target], parts)  # all checks before any swap
    handle = AppliedLora()
    for target, tensors in merged.items():
        handle.swap(models[target], tensors)
    return handle


# ---- step-level continuous batching (engine/continuous.py) --------------------------------------------------


def alone(pipe, req) -> list[np.ndarray]:
    """The pixels of `req` run by itself through `Pipeline.run`: the oracle of every flight."""
    return [g.pixels for g in pipe.run(req, progress=False)]


def drive(flight, schedule: dict, pipe, limit: int = 200):
    """Admit requests at the given step boundaries (boundary -> [(request, owner)]), step until all done.
    Returns owner -> list of (k, pixels) and owner -> error."""
    images: dict[str, list] = {}
    errors: dict[str, str] = {}
    for boundary in range(limit):
        for req, owner in schedule.get(boundary, []):
            rows = pipe.prepare(req).rows()
            flight.admit(rows, [owner] * len(rows))
        for f in flight.finish():
            if f.image is None:
                errors[f.owner] = f.error
            else:
                images.setdefault(f.owner, []).append((f.row.k, f.image.pixels))
        if not flight.slots and boundary > max(schedule):
            return images, errors
        flight.step()
    raise AssertionError("the flight did not finish")


# ---- TensorRT engine manifests (no TensorRT needed) ---------------------------------------------------------

TRT_ENV = {"version": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
           "plugin_ptx_sha256": "a" * 64}


def built_manifest(**changes) -> dict:
    """A TensorRT engine's manifest as built in TRT_ENV, with `changes` to its environment."""
    from engine.backends import tensorrt as tb

    return {"key": "abc", tb.MANIFEST_KEY: {**TRT_ENV, "engine": tb.ENGINE_FILE, **changes}}


# ---- TensorRT against ONNX Runtime (GPU tests: they skip without TensorRT and CUDA) ----------------------------


def trt_matches_onnxruntime(tmp_path: Path, component: str, extend: Callable, **config) -> None:
    """Build `component` of the same BuildConfig(**config) with ONNX Runtime (fp32, CPU) and TensorRT (its default
    precision, CUDA); on the spec's example inputs at the profile's opt shape every output agrees within 2 % of the
    ONNX Runtime output's largest magnitude. `extend(family, dims)` gives the family that has the component."""
    from engine import cache
    from engine.backends.base import get_backend
    from engine.build import build_all
    from engine.config import BuildConfig, Profile
    from export.families import get_family
    from export.onnx_export import example_inputs
    from export.specs import Dims

    outs = {}
    for backend, device in (("onnxruntime", "cpu"), ("tensorrt", "cuda")):
        d = tmp_path / backend
        record = build_all(BuildConfig(engine_dir=d, backend=backend, precision="fp32" if device == "cpu" else None,
                                       device=device, **config), progress=False).record
        dims = Dims(**record["dims"])
        spec = extend(get_family(record["family"]), dims).spec(component)
        art = d / record["model_id"] / record["components"][component]["dir"]
        runner = get_backend(backend).load(spec, art, cache.verify(art), device)
        feeds = example_inputs(spec, dims, Profile.from_json(record["profile"]).opt, record["precision"])
        outs[backend] = {k: v.float().cpu() for k, v in runner(**{k: v.to(device) for k, v in feeds.items()}).items()}
    for k, ref in outs["onnxruntime"].items():
        got = outs["tensorrt"][k]
        assert float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)) < 2e-2, k


# ---- a model folder whose text encoders are changed (prompt tests) ---------------------------------------------


def with_text_encoders(source: Path, out: Path, change: Callable[[str, nn.Module], None]) -> Path:
    """A copy of model folder `source` at `out` with `change(sub_folder, encoder)` applied to each text encoder (in
    place, under no_grad) and saved again as safetensors."""
    import shutil

    from transformers import AutoModel, CLIPTextModelWithProjection

    shutil.copytree(source, out)
    for sub in ("text_encoder", "text_encoder_2"):
        if not (out / sub).is_dir():
            continue
        cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else AutoModel
        encoder = cls.from_pretrained(out / sub)
        with torch.no_grad():
            change(sub, encoder)
        shutil.rmtree(out / sub)
        encoder.save_pretrained(out / sub, safe_serialization=True)
    return out


def ort_pipeline_of(engine_dir: Path, model: Path, size: int = 64):
    """The Pipeline of `model` built for ONNX Runtime fp32 at `size` into `engine_dir` (close it when done)."""
    from engine.build import build_all
    from engine.config import BuildConfig
    from engine.pipeline import Pipeline

    build_all(BuildConfig(model=str(model), backend="onnxruntime", precision="fp32", height=size, width=size,
                          engine_dir=engine_dir), progress=False)
    return Pipeline.load(engine_dir)
