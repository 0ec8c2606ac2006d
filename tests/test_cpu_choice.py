"""`--backend auto` on a CPU: the table it reads equals what the committed benchmark results give, and the pick
follows the table's order under each constraint (installed backends, native bf16/int8, quality gate, LoRA)."""
from __future__ import annotations

import math

import pytest

from benchmarks import cpu_table
from benchmarks.schema import load
from engine.backends import cpu, cpu_choice
from engine.build import _prepare
from engine.config import BuildConfig

ALL = {"openvino", "onnxruntime", "torch"}
ZEN4 = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]


def test_table_is_the_committed_results():
    assert cpu_table.render(cpu_table.build_table()) == cpu_choice.TABLE.read_text(), \
        "engine/backends/cpu_table.json is stale: run python -m benchmarks.cpu_table"


def test_table_rows_come_from_the_results_they_name():
    """Each time ratio is the geometric mean of the sd15 rows of the named files (recomputed here by hand)."""
    doc = cpu_choice.table()
    steps = [r for name in doc["sources"] for r in load(cpu_table.RESULTS / name)["rows"]
             if r["bench"] == "unet_step" and r["metric"] == "time_vs_ref" and r["config"]["model"] == "sd15"]
    for row in doc["rows"]:
        mine = [r["value"] for r in steps if (r["config"]["backend"], r["config"]["precision"])
                == (row["backend"], row["precision"])]
        assert len(mine) >= 2, row  # 256² and 512²
        assert row["time_vs_fp32"] == pytest.approx(math.prod(mine) ** (1 / len(mine)), abs=1e-3)
    reference = [r for r in doc["rows"] if (r["backend"], r["precision"]) == ("onnxruntime", "fp32")]
    assert reference and reference[0]["time_vs_fp32"] == 1.0 and reference[0]["psnr_db"] is None


def _table(*rows) -> dict:
    return {"device": "test cpu", "workload": "w",
            "rows": [{"backend": b, "precision": p, "time_vs_fp32": t, "psnr_db": q} for b, p, t, q in rows]}


DOC = _table(("openvino", "bf16", 0.5, 48.0), ("torch", "bf16", 0.7, 49.0), ("onnxruntime", "int8", 0.8, 50.0),
             ("openvino", "fp32", 0.9, None), ("onnxruntime", "fp32", 1.0, None), ("torch", "fp32", 1.2, None))


@pytest.mark.parametrize("installed, flags, precision, expected", [
    (ALL, ZEN4, None, ("openvino", "bf16")),  # the fastest row
    ({"onnxruntime", "torch"}, ZEN4, None, ("torch", "bf16")),  # openvino not installed
    (ALL, ["avx2", "avx512_vnni"], None, ("openvino", "fp32")),  # no native bf16; int8 is never auto (LoRA)
    ({"onnxruntime", "torch"}, ["avx2"], None, ("onnxruntime", "fp32")),
    (ALL, ZEN4, "fp32", ("openvino", "fp32")),  # a precision asked for restricts the rows
    (ALL, ZEN4, "int8", ("onnxruntime", "int8")),  # asked for: the fallback, onnxruntime, builds it
])
def test_pick_follows_the_table(installed, flags, precision, expected):
    got = cpu_choice.pick(precision, installed=installed, flags=flags, doc=DOC)
    assert (got.backend, got.precision) == expected
    assert got.why.startswith(f"auto: {got.backend} {got.precision}")


def test_a_path_under_the_quality_gate_is_skipped():
    doc = _table(("openvino", "bf16", 0.5, cpu_choice.QUALITY_GATE_DB - 0.1), ("onnxruntime", "fp32", 1.0, None))
    assert cpu_choice.pick(installed=ALL, flags=ZEN4, doc=doc).backend == "onnxruntime"
    row = cpu_choice.rows(doc)[0]
    assert "quality gate" in (cpu_choice.why_not(row, ALL, ZEN4) or "")


def test_fp16_on_a_cpu_falls_back_to_onnxruntime():
    got = cpu_choice.pick("fp16", installed=ALL, flags=ZEN4, doc=DOC)
    assert (got.backend, got.precision) == ("onnxruntime", "fp16") and "no measured CPU path" in got.why


def test_auto_build_plan_is_the_pick_here(tmp_path):
    """What `python -m engine.build` resolves `auto` to on this machine's CPU is the table's pick."""
    import torch

    from engine.backends.tensorrt.build import trt_available

    if trt_available() and torch.cuda.is_available():
        pytest.skip("TensorRT with a GPU: auto picks tensorrt whatever the device")
    job = _prepare(BuildConfig(model="tiny", engine_dir=tmp_path, device="cpu"))
    want = cpu_choice.pick()
    assert (job.plan.backend, job.plan.precision) == (want.backend, want.precision)
    assert job.why == want.why and cpu_choice.TABLE.name in job.why
    if "openvino" in cpu_choice.installed_backends() and cpu.has_native_bf16():
        assert (want.backend, want.precision) == ("openvino", "bf16")  # the measured table's first row
    compiled = _prepare(BuildConfig(model="tiny", engine_dir=tmp_path, compile=True))  # --compile is torch's
    assert compiled.plan.backend == "torch" and compiled.why.startswith("auto: torch")
    explicit = _prepare(BuildConfig(model="tiny", engine_dir=tmp_path, backend="onnxruntime"))
    assert (explicit.plan.backend, explicit.plan.precision, explicit.why) == ("onnxruntime", "fp32", "")
