"""`--backend openvino --precision int8`: the fp32 ONNX's weights compressed to int8 by NNCF, per output channel.

`nncf.compress_weights(model, mode=INT8_ASYM)` on the OpenVINO model read from the component's fp32 ONNX: every
weight of a MatMul, Convolution or embedding Gather becomes a u8 Constant (named as before: `unet.conv_in.weight`)
with one u8 zero point and one f16 scale per output channel, dequantized in the graph by Convert, Subtract and
Multiply; the CPU plugin runs the layers from the int8 weights, activations at the precision of the compile hint
(bf16 where the CPU computes it natively, f32 elsewhere: engine/backends/openvino_backend.py). Weights only, no
calibration data; biases, norm scales and the position embedding stay fp32. Asymmetric, NNCF's default, rather
than INT8_SYM (i8, no zero point): measured closer to fp32 at the same speed in a one-off comparison of the two
(tiny, 128², 10 steps: 48.2 vs 47.4 dB against OpenVINO fp32's image; sd15's UNet at 256², batch 2, bf16
activations, 8 interleaved calls: max |error| 0.042 vs 0.051, 884 vs 922 ms per call, within that run's noise;
2-core Intel Xeon with AMX, 2026-12-05).

Our exporter writes linear layers as MatMul(x, Transpose(W)) so that every weight keeps its parameter name; NNCF
takes a weight only as a Constant input of the MatMul, so each such Transpose is first folded into the MatMul
(transpose_b=True on the same Constant: the name and the data stay as they are, no copy).

NNCF, like OpenVINO, sends a usage event to the network unless told not to: it is imported with its CI switches on
(NNCF_CI, and CI for openvino_telemetry's), restored right after, and the client its tracked functions report to
is made the no-op stub where it is not one already (NNCF imported earlier by the program, without the switches).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODE = "INT8_ASYM"  # nncf.CompressWeightsMode: per output channel, u8 weights, u8 zero points, f16 scales
INT8_TYPES = ("i8", "u8")  # element types of compressed weights in an IR
NOT_INSTALLED = ("NNCF is not installed, which --backend openvino --precision int8 needs: pip install nncf (a "
                 "dependency of the engine where openvino is)")
_NNCF_SWITCHES = {"NNCF_CI": "1", "CI": "true"}  # NNCF's own switch; openvino_telemetry's (NNCF builds one)


def nncf():
    """nncf, imported with its usage telemetry off (see the module doc); RuntimeError naming the install if absent."""
    if "nncf" not in sys.modules:
        saved = {k: os.environ.get(k) for k in _NNCF_SWITCHES}
        os.environ.update(_NNCF_SWITCHES)
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise RuntimeError(NOT_INSTALLED) from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    _no_telemetry()
    return sys.modules["nncf"]


def nncf_version() -> str:
    """NNCF's version without importing it (part of an int8 build's cache key); RuntimeError if not installed."""
    from importlib import metadata

    try:
        return metadata.version("nncf")
    except metadata.PackageNotFoundError:
        raise RuntimeError(NOT_INSTALLED) from None


def _no_telemetry() -> None:
    """Make sure NNCF's tracked functions send nothing, even where it was imported before us without the switches."""
    from nncf.telemetry import decorator, wrapper

    if not isinstance(decorator.telemetry, wrapper.NNCFTelemetryStub):
        decorator.telemetry = wrapper.NNCFTelemetryStub()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NNCF's statistics table (its logger, to stdout) and its rich progress bar (stdout) kept off the console."""
    logger = logging.getLogger("nncf")
    levels = [logger.level] + [h.level for h in logger.handlers]
    logger.setLevel(logging.ERROR)
    for h in logger.handlers:
        h.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(levels[0])
        for h, level in zip(logger.handlers, levels[1:], strict=False):
            h.setLevel(level)


def fold_weight_transposes(model: Any) -> int:
    """MatMul(x, Transpose(W, [1, 0])) with W a 2-D Constant -> MatMul(x, W, transpose_b=True); how many MatMuls."""
    from openvino import opset13

    folded = 0
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        transpose = op.input_value(1).get_node()
        if transpose.get_type_name() != "Transpose":
            continue
        weight, perm = (transpose.input_value(i).get_node() for i in (0, 1))
        if weight.get_type_name() != "Constant" or perm.get_type_name() != "Constant":
            continue
        if len(weight.get_output_shape(0)) != 2 or list(perm.get_data()) != [1, 0]:
            continue
        attrs = op.get_attributes()
        if attrs["transpose_b"]:
            continue
        new = opset13.matmul(op.input_value(0), weight.output(0), attrs["transpose_a"], True)
        new.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(new.output(0))  # the Transpose, left without users, drops out of the model
        folded += 1
    model.validate_nodes_and_infer_types()
    return folded


WEIGHTED = {"MatMul": 1, "Convolution": 1, "GroupConvolution": 1, "Gather": 0}  # op -> the input its weight feeds
_DEQUANTIZE = ("Convert", "Subtract", "Multiply")  # compressed weight -> f32: Convert, (- zero point), * scale, Convert


def layer_weights(model: Any) -> Iterator[tuple[Any, Any]]:
    """(layer, its weight Constant) for each MatMul, convolution and Gather of `model` whose weight input is a Constant
    of rank >= 2, directly or through NNCF's dequantization (the Constant is then the int8 one)."""
    for op in model.get_ops():
        port = WEIGHTED.get(op.get_type_name())
        if port is None:
            continue
        node = op.input_value(port).get_node()
        while node.get_type_name() in _DEQUANTIZE:
            node = node.input_value(0).get_node()
        if node.get_type_name() == "Constant" and len(node.get_output_shape(0)) >= 2:
            yield op, node


def weight_types(model: Any) -> Counter[str]:
    """How many layer weights (layer_weights) of each element type (`i8`, `f32`, ...) `model` holds."""
    return Counter(w.get_element_type().get_type_name() for _, w in layer_weights(model))


def compress_int8(onnx_path: Path) -> tuple[Any, dict[str, Any]]:
    """The OpenVINO model of `onnx_path` (fp32 ONNX with external data) with its weights in int8, and what the build
    records of it (the manifest's `int8`)."""
    from engine.backends.openvino_backend import _ov

    ov = _ov()
    lib = nncf()
    model = ov.Core().read_model(str(onnx_path))  # as the fp32 build reads it (no convert_model: telemetry)
    folded = fold_weight_transposes(model)
    with _quiet():
        model = lib.compress_weights(model, mode=getattr(lib.CompressWeightsMode, MODE))
    types = weight_types(model)
    compressed = sum(types[t] for t in INT8_TYPES)
    if compressed == 0:
        raise RuntimeError(f"{onnx_path}: NNCF found no weight to compress to int8")
    return model, {"int8": {"scheme": f"nncf.compress_weights {MODE}: 8-bit weights, one scale (and zero point) per "
                                      "output channel (MatMul, Convolution, embedding Gather); weights only, "
                                      "activations at the compile hint's precision",
                            "nncf": lib.__version__, "mode": MODE, "folded_transposes": folded,
                            "int8_weights": compressed, "other_weights": sum(types.values()) - compressed}}
