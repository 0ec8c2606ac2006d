"""The reduced-precision quality gate (benchmarks/quality.py) on `tiny`: figures computed, finite, and close.

Threshold: PSNR >= 40 dB against the same backend's fp32 image (RMS difference <= 2.55/255), max |Δ| <= 16 px,
mean |Δ| <= 1.5 px. Measured on `tiny` (128², 10 dpmpp_2m steps, seed 0; AMD EPYC Zen 4 with avx512_bf16, 2 shared
cores, OpenVINO 2026.4.1, torch 2.13, ONNX Runtime 1.32): openvino bf16 49.5 dB (mean 0.56, max 5 px), torch bf16
48.9 dB (0.60, 5 px), onnxruntime int8 52.9 dB (0.32, 3 px). For scale, on the same fp32 engine: another prompt
with the same seed is 32.8 dB away (mean 4.4, max 31 px), another seed 12.1 dB. So 40 dB keeps ~9 dB of margin
for other CPUs and library versions, and fails a path whose error is as large as changing the prompt.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from benchmarks import quality
from benchmarks.schema import Results
from engine.backends import cpu
from engine.backends.cpu_choice import QUALITY_GATE_DB as PSNR_MIN_DB  # the gate `--backend auto` applies


def test_compare_figures():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert quality.compare(a, b) == {"mean_abs_px": 0.0, "max_abs_px": 0.0, "psnr_db": quality.PSNR_CAP_DB}
    b[0, 0, 0] = 255
    f = quality.compare(a, b)
    assert f["max_abs_px"] == 255 and f["mean_abs_px"] == pytest.approx(255 / 48)
    assert f["psnr_db"] == pytest.approx(10 * math.log10(48))  # MSE = 255² / 48
    with pytest.raises(ValueError, match="different shapes"):
        quality.compare(a, np.zeros((4, 5, 3), np.uint8))


def test_reduced_precision_images_are_close_to_fp32(tmp_path, tiny_folder):
    results = Results(device="cpu", suite="test")
    figures = quality.measure(results, model="tiny", size=128, steps=10, engine_dir=tmp_path)
    rows = [r for r in results.rows if r["bench"] == "quality"]
    bf16 = cpu.has_native_bf16()
    expected = {("onnxruntime", "int8")} | ({("torch", "bf16")} if bf16 else set())
    if importlib.util.find_spec("openvino") is not None:
        expected |= {("openvino", "int8")} | ({("openvino", "bf16")} if bf16 else set())
    assert set(figures) == expected
    for r in rows:
        assert r["config"]["reference"] == f"{r['config']['backend']} fp32"
        if r.get("skipped"):  # only bf16 on a CPU without it (the reason names the flags), or no OpenVINO
            assert (r["config"]["backend"], r["config"]["precision"]) not in expected, r
            continue
        assert math.isfinite(r["value"]) and r["note"].startswith("random weights")
    for path, f in figures.items():
        assert {k for k in f} == {"mean_abs_px", "max_abs_px", "psnr_db"}
        assert f["psnr_db"] >= PSNR_MIN_DB, (path, f)
        assert 0 < f["max_abs_px"] <= 16 and f["mean_abs_px"] <= 1.5, (path, f)  # reduced, not identical
