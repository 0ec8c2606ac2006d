"""torch -> ONNX for one component, with dynamic batch and size, checked and validated.

The graph's tensor names, dtypes and dynamic axes come from export/specs.py. Spatial sizes are
exported as multiples of the model's size granularity (`Dims.size_multiple` pixels), the only sizes
for which a diffusers UNet takes one code path; the runtime rejects other sizes with a clear error.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export import attention, control, feature_cache
from export.families import Family, detect_family
from export.models import (
    LoadedModel,
    component_module,
    default_size,
    folder_dims,
    meta_component,
)
from export.optimize import EXTERNAL_DATA_LIMIT
from export.specs import (
    CUSTOM_TOKEN,
    EXPORT_MAX_BATCH,
    EXPORT_MAX_UNITS,
    MAX_CHUNKS,
    TEXT,
    ComponentSpec,
    Dims,
    Shape,
    precision_torch_dtype,
)

OPSET = {"decomposed": 18, "plugin": 18, "onnx": 23}  # opset 23 brings the Attention op
PROGRESS_BYTES = 256 * 1024**2  # a weights progress bar only for graphs with more weight bytes than this
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int32": torch.int32}


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"  # "fp32" | "fp16": fp16 graphs are what TensorRT 11 builds fp16 engines from
    attention: str = "decomposed"  # see export/attention.py
    shape: Shape | None = None  # example shape (batch is traced as 2); None = the model's default size
    optimize: bool = True  # constant folding + shape inference (export/optimize.py)
    residuals: int = 0  # a UNet that takes this many ControlNet residuals (export/control.py); 0 = none
    text_chunks: int = 0  # a denoiser whose text input takes 1..this many chunks of 77 tokens; 0 = a fixed 77

    @property
    def opset(self) -> int:
        return OPSET[self.attention]

    def to_json(self) -> dict:
        residuals = {"residuals": self.residuals} if self.residuals else {}  # absent: earlier keys stay valid
        residuals |= {"text_chunks": self.text_chunks} if self.text_chunks else {}
        return {"precision": self.precision, "attention": self.attention, "opset": self.opset,
                "optimize": self.optimize, "torch": torch.__version__, "onnx": onnx.__version__,
                "weights": "named-external", **residuals}  # export/lean.py's layout (part of the cache key)


def example_inputs(spec: ComponentSpec, dims: Dims, shape: Shape, precision: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs of the spec's shapes: ids in the vocabulary, timesteps in [0, 1000), SDXL time_ids
    (sizes and crop offsets in pixels) in [0, 1024), the upscaler's noise levels (class labels) in [0, 350], class ids
    in the model's table."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    batch = shape.batch * spec.batch_factor
    for t, s in spec.input_shapes(dims, batch, shape.height, shape.width, shape.chunks).items():
        dtype = TORCH_DTYPES[str(spec.inputs[spec.input_names.index(t)].numpy_dtype(precision))]
        if t == "input_ids":
            bos = min(49406, dims.text_vocab - 1)  # CLIP's start token; the last id of a smaller vocabulary
            x = torch.randint(0, bos, s, generator=g, dtype=torch.int32)
            x[:, 0] = bos
            x[:, 1] = CUSTOM_TOKEN  # a token whose vector is token_embeds' (textual inversion): validated too
        elif t == "timestep":
            x = torch.randint(0, 1000, s, generator=g).float()
        elif t == "class_labels":  # the x4 upscaler's noise levels
            x = torch.randint(0, 351, s, generator=g)
        elif t in ("class_ids", "labels"):  # a class-conditional LDM's classes; a semantic map's
            x = torch.randint(0, max(dims.n_classes, 1), s, generator=g)
        elif t == "layout_tokens":  # a layout model's: labels and corner tokens, 8191 = none
            x = torch.randint(0, 8192, s, generator=g)
        elif t == "time_ids":
            x = torch.randint(0, 1024, s, generator=g).float()
        else:
            x = torch.randn(s, generator=g)
        out[t] = x.to(dtype)
    return out


def dynamic_shapes(spec: ComponentSpec, dims: Dims) -> dict[str, dict[int, object]]:
    """torch.export Dims for each input: batch, and height/width in units of the size granularity."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=EXPORT_MAX_BATCH)
    hu, wu = Dim("height_units", min=1, max=EXPORT_MAX_UNITS), Dim("width_units", min=1, max=EXPORT_MAX_UNITS)
    chunks = Dim("text_chunks", min=1, max=MAX_CHUNKS)
    out: dict[str, dict[int, object]] = {}
    for t in spec.inputs:
        axes: dict[int, object] = {}
        for axis, sym in t.dynamic_axes.items():
            if sym == "batch":
                axes[axis] = batch
            elif sym == TEXT:
                axes[axis] = dims.text_len * chunks
            else:
                pixels = t.shape(dims, 1, dims.size_multiple, dims.size_multiple)[axis]  # size of one unit
                axes[axis] = pixels * (hu if sym == "height" else wu)
        out[t.name] = axes
    return out


def export_component(model: LoadedModel | Path, name: str, path: Path, opts: ExportOptions,
                     progress: Callable[[int, int], None] | None = None, family: Family | None = None) -> dict:
    """Export one component to `path` (+ `path`.data past EXTERNAL_DATA_LIMIT), optimized and checked; summarise.

    Memory-lean (export/lean.py): the graph is traced from the component built on the meta device and its
    weights are streamed one tensor at a time, from the loaded model's modules when `model` is a LoadedModel,
    else from the safetensors files of the model folder `model`. `progress(done, total)` follows the weights."""
    from export import lean

    folder = model.path if isinstance(model, LoadedModel) else Path(model)
    family = model.family if isinstance(model, LoadedModel) else family  # None: the folder's
    if opts.attention == "plugin" and opts.precision != "fp16":
        raise ValueError("attention 'plugin' needs --precision fp16 (the fused kernel is fp16/bf16)")
    dtype = precision_torch_dtype(opts.precision)
    module, prefix = meta_component(folder, name, dtype, family)
    family = family or detect_family(folder)
    spec, dims = family.spec(name), folder_dims(folder)
    files: dict[str, Path] = {}
    if not isinstance(model, LoadedModel):  # a missing or misshapen weight is named before the trace
        files = lean.tensor_index(folder / spec.model_folder)
        lean.check_files(module, prefix, files)
    size = default_size(folder)
    shape = opts.shape or Shape(1, size, size)
    # example batch 2 and 2 prompt chunks (not 1) keep torch.export from specialising those axes to 1
    example = {k: v.to("meta") for k, v in
               example_inputs(spec, dims, Shape(2, shape.height, shape.width, 2), opts.precision).items()}
    # ControlNet residuals reach the UNet wrappers as one tuple; the graph's inputs keep the spec's flat names
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad(), attention.emission(module, opts.attention):  # this module's processors only
        program = torch.onnx.export(
            module,
            kwargs=feature_cache.pack(control.pack(example)),
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opts.opset,
            dynamic_shapes=feature_cache.pack(control.pack(dynamic_shapes(spec, dims))),
            dynamo=True,
            optimize=False,  # lean.optimize below: the weights have no values yet
            verbose=False,
        )
    assert program is not None
    if isinstance(model, LoadedModel):
        sources = lean.attach_weights(program.model, module, prefix, {}, loaded=component_module(model, name))
    else:
        sources = lean.attach_weights(program.model, module, prefix, files)
    if opts.optimize:
        lean.optimize(program.model)
    trace_s = time.perf_counter() - t0
    nbytes = lean.weight_bytes(program.model, sources)
    lean.save(program.model, path, external=nbytes > EXTERNAL_DATA_LIMIT,
              progress=progress if nbytes > PROGRESS_BYTES else None)  # small graphs are written in a blink
    export_s = time.perf_counter() - t0
    onnx.checker.check_model(str(path), full_check=True)
    return {
        "component": name,
        "precision": opts.precision,
        "attention": opts.attention,
        "opset": opts.opset,
        "trace_seconds": round(trace_s, 2),
        "export_seconds": round(export_s, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "weight_bytes": nbytes,
        "weights_from": {src: sum(1 for s in sources.values() if s == src) for src in sorted(set(sources.values()))},
        "files": {p.name: p.stat().st_size for p in sorted(path.parent.glob(path.name + "*"))},
        "inputs": describe(spec, "inputs", opts.precision),
        "outputs": describe(spec, "outputs", opts.precision),
    }


def describe(spec: ComponentSpec, which: str, precision: str) -> list[dict]:
    return [
        {"name": t.name, "dtype": str(t.numpy_dtype(precision)), "dynamic_axes": t.dynamic_axes}
        for t in getattr(spec, which)
    ]


def run_onnx(path: Path, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Run an ONNX graph on the CPU with ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {k: v.numpy() for k, v in inputs.items()}), strict=True))


def validate(module: torch.nn.Module, spec: ComponentSpec, dims: Dims, path: Path, shape: Shape,
             precision: str = "fp32") -> float:
    """Max abs difference between ONNX Runtime and the component's torch `module` at one shape, over every
    output."""
    inputs = example_inputs(spec, dims, shape, precision, seed=1)
    with torch.no_grad():
        ref = module(**feature_cache.pack(control.pack(inputs)))
    refs = ref if isinstance(ref, tuple) else (ref,)
    onnx_out = run_onnx(path, inputs)
    err = 0.0
    for out_name, r in zip(spec.output_names, refs, strict=True):
        got, want = onnx_out[out_name].astype(np.float32), r.float().numpy()
        if got.shape != want.shape:
            raise AssertionError(f"{spec.name}.{out_name}: ONNX output shape {got.shape} != torch {want.shape}")
        err = max(err, float(np.abs(got - want).max()))
    return err
