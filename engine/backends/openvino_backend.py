"""OpenVINO backend: the exported fp32 ONNX compiled by OpenVINO's CPU plugin, fp32 or bf16.

The build converts the component's ONNX (model.onnx + model.onnx.data) once into OpenVINO IR
(model.xml + model.bin, fp32 weights: no fp16 compression) in the artifact dir and test-compiles it;
`load` reads the IR, whose .bin OpenVINO memory-maps (no second in-RAM copy of the file), and compiles it
for the CPU with every core of this process's affinity mask. The precision is a compile-time hint
(`INFERENCE_PRECISION_HINT`: f32, or bf16 where the CPU has avx512_bf16 / AMX: refused elsewhere); the IR
itself stays fp32. The cache key holds the OpenVINO version and the CPU's ISA flags; an IR written by
another OpenVINO version is refused at load, naming both. Any batch and size the graph was exported for runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.backends.cpu import check_bf16, isa_flags, threads
from engine.config import BuildPlan
from export.specs import ComponentSpec, Dims

IR_XML = "model.xml"  # + model.bin (the weights, memory-mapped on load)
ONNX_FILE = "model.onnx"
REBUILD_HINT = "rebuild with python -m engine.build --backend openvino --force-rebuild"
_HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision -> the CPU plugin's INFERENCE_PRECISION_HINT
_TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i32": torch.int32,
          "i64": torch.int64}


class IncompatibleIR(RuntimeError):
    """An IR this OpenVINO cannot or must not run: unreadable, another component's, or another version's."""


def _ov():
    try:
        import openvino
    except ImportError:
        raise RuntimeError("OpenVINO is not installed: pip install openvino (or the engine's [openvino] "
                           "extra)") from None
    return openvino


def ov_version() -> str:
    """The full build string (e.g. 2026.4.1-22982-e213a147257-releases/2026/4): what IRs are tagged with."""
    return _ov().get_version()


def _compile_config(precision: str) -> dict[str, Any]:
    return {"INFERENCE_PRECISION_HINT": _HINTS[precision], "INFERENCE_NUM_THREADS": threads(),
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}


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


class OpenVinoRunner:
    """One component's compiled model on the CPU; torch tensors in and out (fresh output tensors)."""

    graph_safe = False  # host execution
    device = torch.device("cpu")

    def __init__(self, spec: ComponentSpec, xml: Path, precision: str):
        if precision not in _HINTS:
            raise ValueError(f"precision {precision!r} is not available with the openvino backend; "
                             f"choose from {', '.join(_HINTS)}")
        if precision == "bf16":
            check_bf16("openvino")
        self.spec, self.path, self.precision = spec, xml, precision
        self.compiled = _ov().Core().compile_model(read_ir(spec, xml), "CPU", _compile_config(precision))
        self.request = self.compiled.create_infer_request()
        # by name: a compiled port may carry more names than the IR's (fused tensors), get_any_name() any of them
        self.dtypes = {n: _TORCH[self.compiled.input(n).get_element_type().get_type_name()]
                       for n in spec.input_names}

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.request is not None, "runner closed"
        feeds = {n: inputs[n].to("cpu", self.dtypes[n]).contiguous().numpy() for n in self.spec.input_names}
        res = self.request.infer(feeds, share_inputs=True, share_outputs=False)  # outputs copied: ours to keep
        return {n: torch.from_numpy(res[n]) for n in self.spec.output_names}

    def close(self) -> None:
        self.request = None
        self.compiled = None


class OpenVinoBackend:
    name = "openvino"
    needs_onnx = True
    static_shapes = False
    precisions = ("fp32", "bf16")

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
        return {"openvino": ov_version(), "device": "cpu", "cpu_isa": isa_flags()}

    def build(self, spec: ComponentSpec, onnx_path: Path | None, out_dir: Path, dims: Dims, plan: BuildPlan,
              source: Path) -> dict[str, Any]:
        if onnx_path is None:
            raise ValueError("the openvino backend builds from ONNX; no ONNX path was given")
        ov = _ov()
        model = ov.convert_model(str(onnx_path))  # reads model.onnx.data too
        ov.save_model(model, str(out_dir / IR_XML), compress_to_fp16=False)  # fp32 weights, as exported
        del model
        OpenVinoRunner(spec, out_dir / IR_XML, plan.precision).close()  # fails here, not at generate time
        return {"device": "cpu", "precision": plan.precision, "openvino": ov_version(), "cpu_isa": isa_flags()}

    def load(self, spec: ComponentSpec, art_dir: Path, manifest: dict[str, Any], device: str) -> OpenVinoRunner:
        self.resolve_device(device)
        built_with = manifest.get("openvino")
        if built_with is not None and built_with != ov_version():
            raise IncompatibleIR(f"{art_dir}: built with OpenVINO {built_with}, this is OpenVINO {ov_version()}; "
                                 f"{REBUILD_HINT}")
        return OpenVinoRunner(spec, art_dir / IR_XML, manifest.get("precision", "fp32"))


BACKEND = OpenVinoBackend()
