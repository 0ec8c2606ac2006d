"""`--backend openvino --precision int8` on `tiny`: NNCF's int8 weights (one scale per output channel) in the saved IRs,
built from the shared fp32 export and recorded as int8; compiled with activations at the CPU's best precision; the
image close to OpenVINO fp32's; LoRA refused in one line; NNCF imported without its telemetry."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("openvino") is None:  # not importorskip: a bare `import openvino` phones home
    pytest.skip("OpenVINO is not installed (a dependency on x86_64 and ARM64 only)", allow_module_level=True)
if importlib.util.find_spec("nncf") is None:
    pytest.skip("NNCF is not installed (a dependency where OpenVINO is: pip install nncf)", allow_module_level=True)

from benchmarks.quality import compare
from engine import cache
from engine.backends import cpu, openvino_backend, openvino_int8
from engine.backends.openvino_backend import BACKEND, IR_XML
from engine.lora import Adapter
from engine.pipeline import Pipeline
from engine.request import Request
from tests.helpers import write_kohya

COMPONENTS = ("clip", "unet", "vae_decoder", "vae_encoder")
REQUEST = Request(prompt="a watercolor painting of a lighthouse", negative_prompt="low quality", steps=8,
                  sampler="dpmpp_2m", seed=1234, height=64, width=64)
PSNR_MIN_DB = 40.0  # the quality gate's bound (tests/test_quality.py), here at 64², 8 steps (measured: 46.7 dB, max 6
# px, on a 2-core Xeon with AMX: bf16 activations)


@pytest.fixture(scope="module")
def int8_engines(ov_int8_build) -> Path:
    return ov_int8_build[0]


def _art(engine_dir: Path, name: str) -> Path:
    record = cache.read_json(engine_dir / "tiny" / cache.BUILD_RECORD)
    return engine_dir / "tiny" / record["components"][name]["dir"]


def tiny_spec(name: str):
    from export.families import get_family

    return get_family("sd").spec(name)


def _image(engine_dir: Path) -> np.ndarray:
    pipe = Pipeline.load(engine_dir, "tiny")
    try:
        return pipe.run(REQUEST, progress=False)[0].pixels
    finally:
        pipe.close()


def test_build_reuses_the_fp32_export_and_records_int8(ov_int8_build, ov_engines):
    engine_dir, result = ov_int8_build
    record = result.record
    assert record["backend"] == "openvino" and record["precision"] == "int8"
    assert set(record["components"]) == set(COMPONENTS)
    assert all(c["precision"] == "int8" for c in record["components"].values())
    assert not [s for s in result.built if s.endswith(":onnx")]  # the fp32 export of the ORT build, reused
    activations = "bf16" if cpu.has_native_bf16() else "f32"
    for name in COMPONENTS:
        manifest = cache.verify(_art(engine_dir, name))
        fp32 = cache.verify(_art(ov_engines, name))
        assert manifest["precision"] == "int8" and manifest["key_parts"]["onnx"] == fp32["key_parts"]["onnx"]
        assert manifest["key_parts"]["backend"] == {**fp32["key_parts"]["backend"], "nncf": metadata.version("nncf"),
                                                    "int8_mode": openvino_int8.MODE}
        int8 = manifest["int8"]
        assert int8["nncf"] == metadata.version("nncf") and int8["mode"] == openvino_int8.MODE
        assert int8["activations"] == activations and int8["int8_weights"] > 0
    assert cache.verify(_art(engine_dir, "unet"))["int8"]["folded_transposes"] > 0  # the attention's linears


@pytest.mark.parametrize("name", COMPONENTS)
def test_ir_weights_are_int8_per_output_channel(int8_engines, ov_engines, name):
    """Counted in the saved IR: its int8 Constants; every MatMul / convolution weight among them, each with one scale
    per output channel; the .bin about a quarter of the fp32 IR's."""
    art = _art(int8_engines, name)
    xml = (art / IR_XML).read_text()
    consts = re.findall(r'type="Const"[^>]*>\s*<data [^>]*element_type="(\w+)"', xml)
    assert consts, "no Const layers found in the IR's XML"
    int8_consts = sum(t in openvino_int8.INT8_TYPES for t in consts)
    manifest = cache.verify(art)
    per_weight = 2 if openvino_int8.MODE == "INT8_ASYM" else 1  # + a u8 zero point per channel (asymmetric)
    assert int8_consts == per_weight * manifest["int8"]["int8_weights"] > 0
    model = openvino_backend.read_ir(tiny_spec(name), art / IR_XML)
    layers = list(openvino_int8.layer_weights(model))
    convs = [(op, w) for op, w in layers if op.get_type_name() != "Gather"]
    assert convs and all(w.get_element_type().get_type_name() in openvino_int8.INT8_TYPES for _, w in convs)
    for op, weight in convs:  # i8 -> Convert -> [Subtract] -> Multiply(scale) -> Convert -> layer
        node = op.input_value(1).get_node()
        while node.get_type_name() != "Multiply":
            node = node.input_value(0).get_node()
        scale = node.input_value(1).get_node()
        out_channels = weight.get_output_shape(0)[0]
        assert scale.get_type_name() == "Constant" and math.prod(scale.get_output_shape(0)) == out_channels
        assert scale.get_output_shape(0)[0] == out_channels, (op.get_friendly_name(), scale.get_output_shape(0))
    fp32_bin = (_art(ov_engines, name) / "model.bin").stat().st_size
    assert (art / "model.bin").stat().st_size < 0.4 * fp32_bin


def test_compiles_with_the_cpus_best_activation_precision(int8_engines, monkeypatch):
    """bf16 activations where the CPU has native bf16, f32 elsewhere; the plugin's dynamic int8 quantization of
    activations off (weights only)."""
    art = _art(int8_engines, "unet")
    for flags, want in ((cpu._all_flags(), "bf16" if cpu.has_native_bf16() else "f32"),
                        (frozenset({"avx2", "fma", "avx512f"}), "f32")):
        monkeypatch.setattr(cpu, "_all_flags", lambda flags=flags: flags)
        runner = BACKEND.load(tiny_spec("unet"), art, cache.verify(art), "cpu")  # no refusal without native bf16
        try:
            compiled = runner.compiled
            assert compiled is not None
            hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
            assert hint in ({"<Type: 'bfloat16'>", "bf16"} if want == "bf16" else {"<Type: 'float32'>", "f32"}), hint
            assert int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == 0
        finally:
            runner.close()


def test_image_is_close_to_openvino_fp32(int8_engines, ov_engines):
    int8, fp32 = _image(int8_engines), _image(ov_engines)
    assert fp32.std() > 10  # a real image, not a constant
    f = compare(int8, fp32)
    assert f["psnr_db"] >= PSNR_MIN_DB and 0 < f["max_abs_px"] <= 16, f  # reduced, not identical


def test_lora_is_refused_on_an_int8_ir(int8_engines, tmp_path):
    lora = Adapter(write_kohya(tmp_path, 12, r=4, alpha=2.0), 0.6)
    pipe = Pipeline.load(int8_engines, "tiny")
    try:
        before = pipe.run(REQUEST, progress=False)[0].pixels
        message = r"an int8 \(weight-compressed\) OpenVINO IR: LoRA adapters cannot be merged.*--precision fp32 or bf16"
        with pytest.raises(ValueError, match=message):
            pipe.run(dataclasses.replace(REQUEST, loras=(lora,)), progress=False)
        with pytest.raises(ValueError, match=message):
            pipe.runners["unet"].set_weights({"conv_in.weight": torch.zeros(1)})  # the runner itself, before any work
        assert np.array_equal(pipe.run(REQUEST, progress=False)[0].pixels, before)  # left as it was
    finally:
        pipe.close()


def test_nncf_is_imported_and_run_without_its_telemetry(tmp_path):
    """NNCF builds an openvino_telemetry client at import and sends an event per compress_weights call unless its CI
    switch is on: the engine's import turns it on for the import only, and the client it keeps is the no-op stub."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NNCF_CI", "NNCF_DEV", "TF_BUILD", "JENKINS_URL")}
    code = ("import os, numpy as np\n"
            "from engine.backends.openvino_backend import _ov\n"
            "from engine.backends.openvino_int8 import nncf\n"
            "ov = _ov(); lib = nncf()\n"
            "x = ov.opset13.parameter([1, 16], ov.Type.f32)\n"
            "w = ov.opset13.constant(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))\n"
            "m = lib.compress_weights(ov.Model([ov.opset13.matmul(x, w, False, True)], [x]))\n"
            "assert any(o.get_element_type().get_type_name() == 'u8' for o in m.get_ops())\n"
            "from nncf.telemetry import decorator, wrapper\n"
            "assert isinstance(decorator.telemetry, wrapper.NNCFTelemetryStub), type(decorator.telemetry)\n"
            "assert 'CI' not in os.environ and 'NNCF_CI' not in os.environ, os.environ\n")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path), "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "intel").exists(), sorted(p.name for p in (tmp_path / "intel").iterdir())
