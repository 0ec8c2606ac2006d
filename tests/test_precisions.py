"""Precisions per backend, checked in one place (build's plan step): what each backend allows, the one-line
refusals (API and CLI), bf16 only on a CPU with native bf16, torch bf16 weights and compute, ONNX Runtime int8
(weight MatMuls only, from the shared fp32 export)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from engine import cache
from engine.backends import cpu
from engine.backends.base import BACKEND_MODULES, get_backend
from engine.build import build_all, export_precision, main
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from engine.request import Request

NO_BF16 = frozenset({"avx2", "fma", "avx512f"})


def test_every_backend_declares_its_precisions():
    allowed = {"torch": ("fp32", "fp16", "bf16"), "onnxruntime": ("fp32", "fp16", "int8"),
               "tensorrt": ("fp16", "fp32"), "openvino": ("fp32", "bf16", "int8")}
    assert set(BACKEND_MODULES) == set(allowed)
    for name in ("torch", "onnxruntime"):  # importable everywhere (tensorrt / openvino: their own tests)
        backend = get_backend(name)
        assert backend.precisions == allowed[name]
        assert backend.default_precision("cpu") in backend.precisions
    assert [export_precision(p) for p in ("fp16", "fp32", "bf16", "int8")] == ["fp16", "fp32", "fp32", "fp32"]


@pytest.mark.parametrize("backend, precision, allowed", [
    ("torch", "int8", "fp32, fp16, bf16"),
    ("onnxruntime", "bf16", "fp32, fp16, int8"),
    ("onnxruntime", "fp8", "fp32, fp16, int8"),
])
def test_wrong_combination_is_refused_before_any_work(tmp_path, tiny_folder, capsys, backend, precision, allowed):
    message = f"precision '{precision}' is not available with the {backend} backend; choose from {allowed}"
    with pytest.raises(ValueError) as e:
        build_all(BuildConfig(model="tiny", backend=backend, precision=precision, engine_dir=tmp_path), progress=False)
    assert str(e.value) == message
    assert main(["--backend", backend, "--precision", precision, "--engine-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "tiny").exists()


def test_torch_bf16_needs_native_bf16(tmp_path, tiny_folder, monkeypatch, capsys):
    monkeypatch.setattr(cpu, "_all_flags", lambda: NO_BF16)
    with pytest.raises(ValueError, match=r"^precision 'bf16' needs a CPU with avx512_bf16 or amx_bf16, which this "
                                         r"one lacks \(backend torch\); use --precision fp32$"):
        build_all(BuildConfig(model="tiny", backend="torch", precision="bf16", engine_dir=tmp_path), progress=False)
    assert main(["--backend", "torch", "--precision", "bf16", "--engine-dir", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.skipif(not cpu.has_native_bf16(), reason="this CPU has no avx512_bf16 / amx_bf16")
def test_torch_bf16_runs_in_bf16(tmp_path, tiny_folder, monkeypatch):
    record = build_all(BuildConfig(model="tiny", backend="torch", precision="bf16", engine_dir=tmp_path,
                                   height=64, width=64), progress=False).record
    assert record["precision"] == "bf16"
    pipe = Pipeline.load(tmp_path, "tiny")
    try:
        from engine.backends.torch_backend import TorchRunner

        unet = pipe.runners["unet"]
        assert isinstance(unet, TorchRunner) and unet.module is not None
        assert {p.dtype for p in unet.module.parameters()} == {torch.bfloat16}  # weights, and so compute
        r = pipe.run(Request(prompt="a red bicycle", steps=3, seed=1), progress=False)[0]
        assert r.pixels.shape == (64, 64, 3) and r.pixels.std() > 10
    finally:
        pipe.close()
    # an engine dir moved to a CPU without native bf16 is refused at load, in one line
    monkeypatch.setattr(cpu, "_all_flags", lambda: NO_BF16)
    with pytest.raises(ValueError, match="precision 'bf16' needs a CPU with avx512_bf16"):
        Pipeline.load(tmp_path, "tiny")


def test_onnxruntime_int8_quantizes_weight_matmuls_of_the_fp32_export(tmp_path, tiny_folder):
    cfg = BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", engine_dir=tmp_path,
                      components=("unet",), height=64, width=64)
    fp32 = build_all(cfg, progress=False)
    cfg.precision = "int8"
    int8 = build_all(cfg, progress=False)
    assert int8.built == ["unet:onnxruntime"]  # the fp32 export was reused: int8 starts from it
    art = tmp_path / "tiny" / int8.record["components"]["unet"]["dir"]
    manifest = cache.verify(art)
    assert manifest["key_parts"]["onnx"] == cache.verify(
        tmp_path / "tiny" / fp32.record["components"]["unet"]["dir"])["key_parts"]["onnx"]
    ops = [n.op_type for n in onnx.load(str(art / "model.onnx"), load_external_data=False).graph.node]
    src = [n.op_type for n in onnx.load(str(tmp_path / "tiny" / fp32.record["components"]["unet"]["dir"] /
                                             "model.onnx"), load_external_data=False).graph.node]
    assert "ConvInteger" not in ops and ops.count("Conv") == src.count("Conv")  # Conv never quantized
    assert ops.count("MatMulInteger") == manifest["int8"]["matmul_integer"] > 0
    assert ops.count("MatMul") == manifest["int8"]["matmul_fp32"] > 0  # attention's activation x activation
    from export.families import get_family

    runner = get_backend("onnxruntime").load(get_family("sd").spec("unet"), art, manifest, "cpu")
    out = runner(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500.0, 500.0]),
                 encoder_hidden_states=torch.randn(2, 77, 32))["latent"]
    assert out.dtype == torch.float32 and np.isfinite(out.numpy()).all()
    with pytest.raises(ValueError, match=r"an int8 \(quantized\) graph: LoRA adapters cannot be merged"):
        runner.base_weights()
