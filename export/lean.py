"""Memory-lean export: trace a component on the meta device, stream its weights from safetensors.

Exporting a module that holds its weights costs several copies of them (the module, the exported program,
the folded graph, the serialized proto): 3.9x the weight bytes for the SD 1.5 UNet, which puts the SDXL
UNet out of reach of a 24 GiB machine. Here the weights are never all in memory at once:

1. the component's wrapper is built from its config on the meta device (`meta_component`): no weight is
   allocated, and tracing it gives the same graph as tracing the loaded module;
2. torch.onnx.export (dynamo) names each initializer by its torch parameter name (`unet.conv_in.weight`)
   and gives it no data; `attach_weights` gives each one a lazy value that reads that one tensor from the
   model folder's safetensors file (opened per tensor, so no file stays mapped) and casts it to the graph's
   dtype. A non-persistent buffer the files lack (CLIP's position_ids) is computed by the model's own
   init; a weight the files lack is an error naming it;
3. `optimize` folds shape arithmetic with onnxscript's optimizer, never a node that reads a weight:
   weights stay named and unfolded, which a LoRA swap (initializer overrides, TensorRT refit) relies on;
   ONNX Runtime and TensorRT fold those transposes themselves when they build;
4. `save` writes the weights one tensor at a time, as external data when they are large.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import onnx_ir as ir
import torch

WEIGHT_FILES = ("diffusion_pytorch_model", "model")  # diffusers / transformers: <name>.safetensors[.index.json]
IR_DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16,
             torch.int64: ir.DataType.INT64, torch.int32: ir.DataType.INT32}


def tensor_index(sub_folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for the weights diffusers / transformers load from a
    model sub-folder (a sharded checkpoint through its index). Empty when there is no such file."""
    from safetensors import safe_open

    for stem in WEIGHT_FILES:
        index = sub_folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {key: sub_folder / file for key, file in weight_map.items()}
        single = sub_folder / f"{stem}.safetensors"
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return {key: single for key in f.keys()}
    return {}


def read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor from a safetensors file; the file is unmapped again before returning."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def stored_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors headers (no tensor data read)."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as f:
            out.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return out


def _entry_ir(source: dict, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> ir.Tensor:
    """`source[name]` as an initializer, read when the exporter writes it."""
    return _to_ir(source[name], dtype, name, shape)


def _file_ir(path, key: str, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> ir.Tensor:
    """Tensor `key` of a safetensors file as initializer `name`, read when the exporter writes it."""
    return _to_ir(read_tensor(path, key), dtype, name, shape)


def _to_ir(t: torch.Tensor, dtype: torch.dtype, name: str, shape: tuple[int, ...]) -> ir.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"weight {name}: stored shape {tuple(t.shape)} != the model's {shape}")
    return ir.Tensor(t.detach().to(dtype).contiguous().numpy(), name=name)


def named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by its qualified name, non-persistent buffers included (state_dict has none)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def init_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Values of the meta buffers that transformers models set in their own weight init (CLIP's position_ids,
    which checkpoints do not store), computed without materialising any parameter; qualified names as in
    `module`. A buffer the init leaves unset is left out."""
    out: dict[str, torch.Tensor] = {}
    for owner_name, owner in module.named_modules():
        model = next((m for name, m in module.named_modules() if hasattr(m, "_init_weights")
                      and owner_name.startswith(name)), None)
        metas = {b: t for b, t in owner._buffers.items() if t is not None and t.is_meta}
        if model is None or not metas:
            continue
        for b, t in metas.items():  # a sentinel the init must overwrite
            owner._buffers[b] = torch.full_like(t, -1 if not t.is_floating_point() else float("nan"), device="cpu")
        try:
            model._init_weights(owner)
            for b in metas:
                value = owner._buffers[b]
                assert value is not None
                unset = (value == -1).all() if not value.is_floating_point() else value.isnan().any()
                if not unset:
                    out[f"{owner_name}.{b}" if owner_name else b] = value.clone()
        finally:
            owner._buffers.update(metas)
    return out


def missing_weight(key: str, name: str, files: dict[str, Path]) -> ValueError:
    where = sorted({str(f.parent) for f in files.values()}) or ["(no safetensors weights found)"]
    return ValueError(f"the checkpoint lacks {key!r} ({name}), a tensor the model needs; looked in "
                      f"{', '.join(where)}")


def wrong_shape(name: str, stored: tuple[int, ...], shape: tuple[int, ...], file: Path) -> ValueError:
    return ValueError(f"weight {name}: stored shape {stored} != the model's {shape} (in {file}); is this "
                      "checkpoint for another architecture?")


def check_files(module: torch.nn.Module, prefix: str, files: dict[str, Path]) -> None:
    """Before any tracing (minutes on a full-size UNet): every parameter of the meta `module` is in `files`
    (its name without `prefix`) with the module's shape, as diffusers' loader demands; else the ValueError
    attach_weights would raise after the trace. Buffers are left to attach_weights (some come from the init)."""
    stored = stored_shapes(files)
    for name, meta in module.named_parameters():
        key = name.removeprefix(prefix)
        if key not in files:
            raise missing_weight(key, name, files)
        if stored[key] != tuple(meta.shape):
            raise wrong_shape(name, stored[key], tuple(meta.shape), files[key])


def attach_weights(model: ir.Model, module: torch.nn.Module, prefix: str, files: dict[str, Path],
                   loaded: torch.nn.Module | None = None) -> dict[str, str]:
    """Give each initializer of `model` (exported from the meta `module`) a lazy value, cast to the graph's
    dtype: the tensor of the same name in `loaded` (a module holding the weights) when given; else the tensor
    of that name without `prefix` in `files`, or a buffer the model's own init computes (`init_buffers`).
    Returns initializer name -> where its value comes from ("module" | "file" | "init"). ValueError naming a
    tensor that has no value (a checkpoint lacking a weight: diffusers would leave it uninitialised)."""
    wanted = named_tensors(module)
    computed = {} if loaded is not None else init_buffers(module)
    held = named_tensors(loaded) if loaded is not None else {}
    sources: dict[str, str] = {}
    stored = stored_shapes(files) if loaded is None else {}
    for name, value in model.graph.initializers.items():
        if name not in wanted:
            raise ValueError(f"initializer {name!r} is no parameter or buffer of the module: it has no stored value")
        meta = wanted[name]
        key = name.removeprefix(prefix)
        shape, dtype = tuple(meta.shape), meta.dtype
        if loaded is not None:
            func = partial(_entry_ir, held, name, dtype, shape)
            sources[name] = "module"
        elif key in files:
            if stored[key] != shape:
                raise wrong_shape(name, stored[key], shape, files[key])
            func = partial(_file_ir, files[key], key, name, dtype, shape)
            sources[name] = "file"
        elif name in computed:
            func = partial(_entry_ir, computed, name, dtype, shape)
            sources[name] = "init"
        else:
            raise missing_weight(key, name, files)
        value.const_value = ir.LazyTensor(func, dtype=IR_DTYPES[dtype], shape=ir.Shape(shape), name=name)
    return sources


def optimize(model: ir.Model) -> None:
    """Fold constants and shapes as torch.onnx's own optimizer does, leaving every weight alone: while it runs
    the weights show no value, so no node that reads one is folded (or even reads it into memory)."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    values = {name: v.const_value for name, v in model.graph.initializers.items()}
    for v in model.graph.initializers.values():
        v.const_value = None
    # its initializer de-duplication warns about each weight without a value: that is the point here
    dedup = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup.level
    dedup.setLevel(logging.ERROR)
    try:
        onnxscript.optimizer.optimize_ir(model)
        onnxscript.rewriter.onnx_fusions.fuse(model)
    finally:
        dedup.setLevel(level)
        for name, v in model.graph.initializers.items():
            if name in values:  # the optimizer's own new constants (folded shapes) have theirs
                v.const_value = values[name]


def weight_bytes(model: ir.Model, names) -> int:
    """Bytes of the initializers `names` (the weights) in the graph's dtypes."""
    inits = model.graph.initializers
    return sum(inits[n].const_value.nbytes for n in names if n in inits and inits[n].const_value is not None)


def bar_progress(desc: str, disable: bool = False) -> Callable[[int, int], None]:
    """A `progress(done, total)` callback drawing a tqdm bar, opened at the first weight written (so exports
    whose weights stay in the graph show none) and closed at the last."""
    from tqdm import tqdm

    bars: list = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc=desc, total=total, unit="tensor", leave=False, disable=disable))
        bars[0].update(done - bars[0].n)
        if done >= total:
            bars[0].close()

    return update


def save(model: ir.Model, path: Path, external: bool, progress: Callable[[int, int], None] | None = None) -> None:
    """Write `model` to `path`; with `external`, its weights to `path`.data one tensor at a time (serially, so
    at most one weight is in memory). `progress(done, total)` is called after each weight."""
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    if not external:
        ir.save(model, path)
        return
    done = 0

    def callback(tensor, info) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, info.total)

    ir.save(model, path, external_data=path.name + ".data", callback=callback, max_workers=1,
            max_in_flight_bytes=64 * 1024**2)
