"""OpenVINO backend: the exported fp32 ONNX compiled by OpenVINO's CPU plugin, fp32, bf16 or int8 weights.

The build converts the component's ONNX (model.onnx + model.onnx.data) once into OpenVINO IR
(model.xml + model.bin, fp32 weights: no fp16 compression) in the artifact dir and test-compiles it;
`load` reads the IR, whose .bin OpenVINO memory-maps (no second in-RAM copy of the file), and compiles it
for the CPU with every core of this process's affinity mask. The precision is a compile-time hint
(`INFERENCE_PRECISION_HINT`: f32, or bf16 where the CPU has avx512_bf16 / AMX: refused elsewhere); the IR
itself stays fp32. int8 (engine/backends/openvino_int8.py): the IR's weights compressed to int8 by NNCF, one scale
per output channel, and compiled with activations at the CPU's best precision (bf16 where it has native bf16, f32
elsewhere; the plugin's dynamic int8 quantization of activations is turned off). The cache key holds the OpenVINO
version and the CPU's ISA flags; an IR written by another OpenVINO version is refused at load, naming both. Any batch
and size the graph was exported for runs.

LoRA: each weight is a `Constant` named after its ONNX initializer (`unet.conv_in.weight`); adapters are merged by
re-reading the pristine IR, swapping the touched weight constants for merged ones and recompiling with the same
config (the IR on disk is untouched; no weights => the pristine IR recompiled, the built weights exactly). A
runner keeps its last few compiled models (engine.lora_cache.variants_limit(), the built one included) by the content of
their merged weights, so alternating between a few adapter sets compiles each once; `compiles` counts compilations.
An int8 IR's weights are 8-bit constants with their scales, not the fp32 tensors a merge replaces: LoRA is refused there
(ValueError naming the precision to build instead), as with ONNX Runtime's int8 graphs.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from engine.backends.cpu import check_bf16, has_native_bf16, isa_flags, threads
from engine.config import BuildPlan
from engine.lora_cache import Lru, variants_limit, weights_key
from export.specs import ComponentSpec, Dims

IR_XML = "model.xml"  # + model.bin (the weights, memory-mapped on load)
ONNX_FILE = "model.onnx"
REBUILD_HINT = "rebuild with python -m engine.build --backend openvino --force-rebuild"
PRECISIONS = ("fp32", "bf16", "int8")  # int8: int8 weights (openvino_int8.py), activations bf16 or f32
_HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision -> the CPU plugin's INFERENCE_PRECISION_HINT
_TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i32": torch.int32,
          "i64": torch.int64}


class IncompatibleIR(RuntimeError):
    """An IR this OpenVINO cannot or must not run: unreadable, another component's, or another version's."""


def _ov():
    """openvino, imported with its usage telemetry off. `import openvino` sends an event to Google Analytics and
    keeps a client id under ~/intel unless the user opted out: openvino_telemetry takes a missing consent file for
    consent, and declines only with a consent file saying 0 or when a CI variable is set. The engine sends
    nothing off the machine, so the first import runs with CI=true (openvino_telemetry's own switch), restored
    right after; a user's consent file is not read or written by us."""
    if "openvino" not in sys.modules:
        saved = os.environ.get("CI")
        os.environ["CI"] = "true"
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise RuntimeError("OpenVINO is not installed: pip install openvino (a dependency of the engine on "
                               "x86_64 and ARM64)") from None
        finally:
            if saved is None:
                os.environ.pop("CI", None)
            else:
                os.environ["CI"] = saved
    return sys.modules["openvino"]


def ov_version() -> str:
    """The full build string (e.g. 2026.4.1-22982-e213a147257-releases/2026/4): what IRs are tagged with."""
    return _ov().get_version()


def activation_precision(precision: str) -> str:
    """The CPU plugin's INFERENCE_PRECISION_HINT for our precision: int8 weights compute with bf16 activations where
    the CPU has native bf16 (engine/backends/cpu.py), f32 elsewhere."""
    if precision == "int8":
        return "bf16" if has_native_bf16() else "f32"
    return _HINTS[precision]


def _compile_config(precision: str) -> dict[str, Any]:
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": activation_precision(precision),
                              "INFERENCE_NUM_THREADS": threads(), "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if precision == "int8":  # weights only: the CPU plugin would otherwise quantize f32 activations of int8-weight
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0  # MatMuls to int8 per group of 32 on the fly
    return config


def read_ir(spec: ComponentSpec, xml: Path):
    """The IR's model (weights memory-mapped), checked: readable, written by this OpenVINO, `spec`'s tensors."""
    core = _ov().Core()
    core.set_property({"ENABLE_MMAP": True})  # the default; the .bin is mapped, not read into a second copy
    try:
        model = core.read_model(str(xml))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IncompatibleIR(f"{xml}: not a readable OpenVINO IR ({reason[:200]}); {REBUILD_HINT}") from None
    tag = "OpenVINO Runtime"  # save_model's tag: the writer's full build string
    written = model.get_rt_info(tag).astype(str) if model.has_rt_info(tag) else "unknown"
    if written != ov_version():
        raise IncompatibleIR(f"{xml}: IR written by OpenVINO {written}, this is OpenVINO {ov_version()}; "
                             f"{REBUILD_HINT}")
    inputs = {n for i in model.inputs for n in i.get_names()}
    outputs = {n for o in model.outputs for n in o.get_names()}
    if (len(model.inputs) != len(spec.input_names) or not set(spec.input_names) <= inputs
            or not set(spec.output_names) <= outputs):
        raise IncompatibleIR(f"{xml}: not an IR of {spec.name} (inputs {sorted(inputs)}, outputs {sorted(outputs)}; "
                             f"expected {spec.input_names} -> {spec.output_names}); {REBUILD_HINT}")
    return model


class IrWeights(Mapping[str, torch.Tensor]):
    """An IR's weight Constants by the sub-model's parameter names, read on access (the .bin stays mapped).

    As in engine.lora.OnnxWeights, `prefix` is the single top-level head of the dotted names (`unet.`), stripped
    from the keys. Weights folded into other ops are not listed (IRs of earlier builds, converted with
    ov.convert_model, had norm scales and some biases folded; Core.read_model keeps every initializer)."""

    def __init__(self, model: Any):
        self.model = model  # keeps the constants (and the mapping they read from) alive
        consts = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
        heads = {n.split(".", 1)[0] for n in consts if "." in n}
        self.prefix = f"{min(heads)}." if len(heads) == 1 else ""
        self.constants = {n.removeprefix(self.prefix): op for n, op in consts.items()
                          if n.startswith(self.prefix) and "." in n}

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.constants[name].get_data().copy())

    def __contains__(self, name: object) -> bool:  # without reading the tensor (Mapping's default reads it)
        return name in self.constants

    def __iter__(self) -> Iterator[str]:
        return iter(self.constants)

    def __len__(self) -> int:
        return len(self.constants)


def _new_constant(old: Any, tensor: torch.Tensor, name: str, xml: Path) -> Any:
    """A Constant holding `tensor` in `old`'s element type, named like `old`; ValueError if the shapes differ."""
    shape = tuple(old.get_output_shape(0))
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{xml}: weight {name!r} has shape {shape} in the IR, the merged tensor "
                         f"{tuple(tensor.shape)}")
    etype = old.get_element_type().get_type_name()
    if etype not in _TORCH:
        raise ValueError(f"{xml}: weight {name!r} is stored as {etype}, which LoRA merging does not handle")
    array = tensor.detach().to("cpu", _TORCH[etype]).contiguous().numpy()
    new = _ov().op.Constant(array)  # a copy: the merged tensor may be freed
    new.set_friendly_name(old.get_friendly_name())
    return new


def swap_weights(model: Any, merged: Mapping[str, torch.Tensor], xml: Path) -> None:
    """Replace `model`'s weight Constants named in `merged` (sub-model parameter names) by the merged tensors.
    Every name and shape is checked before the graph changes; ValueError names the first that does not fit."""
    weights = IrWeights(model)
    missing = [n for n in merged if n not in weights.constants]
    if missing:
        raise ValueError(f"{xml}: weight {missing[0]!r} is not a constant of the IR (folded into another op by "
                         "the conversion, or not this component's), so it cannot be replaced")
    news = {n: _new_constant(weights.constants[n], t, n, xml) for n, t in merged.items()}
    for name, new in news.items():
        weights.constants[name].output(0).replace(new.output(0))  # the users and the tensor names move over


class OpenVinoRunner:
    """One component's compiled model on the CPU; torch tensors in and out (fresh output tensors)."""

    graph_safe = False  # host execution
    device = torch.device("cpu")

    def __init__(self, spec: ComponentSpec, xml: Path, precision: str):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not available with the openvino backend; "
                             f"choose from {', '.join(PRECISIONS)}")
        if precision == "bf16":
            check_bf16("openvino")
        self.spec, self.path, self.precision = spec, xml, precision
        self._weights: IrWeights | None = None  # the IR's own weights, read on first use
        self.compiles = 0  # compile_model calls: the first, then one per adapter set new to `variants`
        self._shapes: set[tuple] = set()  # input shapes since the last compile of all (engine/shape_state.py)
        # (compiled model, its infer request) by weights_key of the merged weights; None = as built
        self.variants: Lru[str | None, tuple[Any, Any]] = Lru(max_entries=variants_limit())
        self._compile_built()
        # by name: a compiled port may carry more names than the IR's (fused tensors), get_any_name() any of them
        self.dtypes = {n: _TORCH[self.compiled.input(n).get_element_type().get_type_name()]
                       for n in spec.input_names}

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.request is not None, "runner closed"
        feeds = {n: inputs[n].to("cpu", self.dtypes[n]).contiguous().numpy() for n in self.spec.input_names}
        self._shapes.add(tuple(f.shape for f in feeds.values()))
        res = self.request.infer(feeds, share_inputs=True, share_outputs=False)  # outputs copied: ours to keep
        return {n: torch.from_numpy(res[n]) for n in self.spec.output_names}

    def _compile(self, model: Any) -> Any:
        self.compiles += 1
        return _ov().Core().compile_model(model, "CPU", _compile_config(self.precision))

    def base_weights(self) -> Mapping[str, torch.Tensor]:
        """The IR's own weights by the sub-model's parameter names (read on access, the .bin memory-mapped).
        ValueError for an int8 IR: its weights are int8 with per-channel scales, which a LoRA merge cannot replace."""
        self._check_mergeable()
        if self._weights is None:  # read once: every switch needs the names and some base tensors
            self._weights = IrWeights(read_ir(self.spec, self.path))
        return self._weights

    def _check_mergeable(self) -> None:
        if self.precision == "int8":
            raise ValueError(f"{self.path}: an int8 (weight-compressed) OpenVINO IR: LoRA adapters cannot be merged "
                             "into it (its weights are int8 constants with per-channel scales, not the fp32 tensors a "
                             "merge replaces); build with --precision fp32 or bf16 for LoRA")

    def set_weights(self, merged: Mapping[str, torch.Tensor] | None) -> None:
        """Recompile the pristine IR with `merged` (sub-model parameter names) replacing its weight constants, or
        as built (None); a compiled model of the same weights kept in `variants` is taken instead. Until the new
        model compiles the old one stays in place: a failure leaves the runner as it was. The IR on disk is
        untouched."""
        if merged:
            self._check_mergeable()
        key = weights_key(merged) if merged else None
        variant = self.variants.get(key)
        if variant is None:
            self.variants.reserve()
            model = read_ir(self.spec, self.path)
            if merged:
                swap_weights(model, merged, self.path)
            compiled = self._compile(model)
            variant = (compiled, compiled.create_infer_request())
            self.variants.put(key, variant)
        self.compiled, self.request = variant

    @property
    def kept_shapes(self) -> int:
        """Distinct input shapes run since the compiled models were last all made anew: the CPU plugin keeps state
        for each (~4 MB on tiny) until then (engine/shape_state.py)."""
        return len(self._shapes)

    def forget_shapes(self) -> None:
        """Drop every compiled model (and what the plugin keeps per shape with it); the built weights compiled
        again. Merged weights are compiled again by the next set_weights."""
        self.variants.clear()
        self.compiled = self.request = None
        self._compile_built()
        self._shapes.clear()

    def _compile_built(self) -> None:
        """The IR as built, compiled, current and kept in `variants` under None."""
        self.compiled = self._compile(read_ir(self.spec, self.path))
        self.request = self.compiled.create_infer_request()
        self.variants.put(None, (self.compiled, self.request))

    def close(self) -> None:
        self.request = None
        self.compiled = None
        self._weights = None
        self.variants.clear()


class OpenVinoBackend:
    name = "openvino"
    needs_onnx = True
    static_shapes = False
    precisions = PRECISIONS

    def version(self) -> str:
        return ov_version()

    def resolve_device(self, device: str) -> str:
        if device in ("auto", "cpu"):
            return "cpu"
        raise ValueError(f"device {device!r} is not supported by the openvino backend; use --device cpu "
                         "(or the onnxruntime / torch backend on a GPU)")

    def default_precision(self, device: str) -> str:
        return "fp32"

    def default_attention(self) -> str:
        return "decomposed"

    def fingerprint(self, plan: BuildPlan) -> dict[str, Any]:
        if plan.precision == "bf16":
            check_bf16("openvino")
        fingerprint = {"openvino": ov_version(), "device": "cpu", "cpu_isa": isa_flags()}
        if plan.precision == "int8":  # the compressed IR is NNCF's work too
            from engine.backends.openvino_int8 import MODE, nncf_version

            fingerprint.update(nncf=nncf_version(), int8_mode=MODE)
        return fingerprint

    def build(self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, plan: BuildPlan,
              source: Path) -> dict[str, Any]:
        if onnx_path is None:
            raise ValueError("the openvino backend builds from ONNX; no ONNX path was given")
        ov = _ov()
        extra: dict[str, Any] = {}
        if plan.precision == "int8":
            from engine.backends.openvino_int8 import compress_int8

            model, extra = compress_int8(onnx_path)
            extra["int8"]["activations"] = activation_precision("int8")  # on this CPU (decided again at load)
        else:
            # the runtime's ONNX reader, not ov.convert_model: that tool sends usage telemetry to the network unless
            # the user has opted out; the IR compiles to the same graph (same outputs and speed, measured on tiny)
            model = ov.Core().read_model(str(onnx_path))  # reads model.onnx.data too
        # out_dir is the build's fresh temp dir, published whole by the cache (engine/cache.py) once this returns
        ov.save_model(model, str(out_dir / IR_XML), compress_to_fp16=False)  # no fp32 weight made f16
        del model
        OpenVinoRunner(spec, out_dir / IR_XML, plan.precision).close()  # fails here, not at generate time
        return {"device": "cpu", "precision": plan.precision, "openvino": ov_version(), "cpu_isa": isa_flags(), **extra}

    def load(self, spec: ComponentSpec, art_dir: Path, manifest: dict[str, Any], device: str) -> OpenVinoRunner:
        self.resolve_device(device)
        built_with = manifest.get("openvino")
        if built_with is not None and built_with != ov_version():
            raise IncompatibleIR(f"{art_dir}: built with OpenVINO {built_with}, this is OpenVINO {ov_version()}; "
                                 f"{REBUILD_HINT}")
        return OpenVinoRunner(spec, art_dir / IR_XML, manifest.get("precision", "fp32"))


BACKEND = OpenVinoBackend()
