"""benchmarks.run / benchmarks.report: the quick suite runs on tiny and renders; the schema holds; the README's
measured block matches the committed results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import report
from benchmarks.schema import ROW_KEYS, Results, load, percentiles

REPO = Path(__file__).resolve().parents[1]


def test_percentiles_are_nearest_rank_like_numpy():
    xs = [float(x) for x in np.random.default_rng(0).normal(10, 3, 37)]
    got = percentiles(xs)
    for p in (50, 90, 99):
        assert got[f"p{p}"] == np.percentile(xs, p, method="inverted_cdf")
    assert got["mean"] == pytest.approx(np.mean(xs))
    with pytest.raises(ValueError):
        percentiles([])


def test_results_never_overwrite_and_refuse_nan(tmp_path):
    r = Results(suite="unit")
    r.add("x", {"a": 1}, "ms", 1.5, "ms")
    r.skip("y", {"a": 2}, "no GPU here")
    with pytest.raises(ValueError, match="NaN"):
        r.add("x", {}, "ms", float("nan"), "ms")
    first, second = r.write(tmp_path), r.write(tmp_path)  # same start time: a second name, not an overwrite
    assert first != second and first.exists() and second.exists()
    doc = load(first)
    assert [row["metric"] for row in doc["rows"]] == ["ms", None]
    assert all(set(ROW_KEYS) <= set(row) for row in doc["rows"])
    assert doc["rows"][1]["skipped"] == "no GPU here" and doc["rows"][0]["device"] == r.device_name
    assert doc["run"]["env"]["torch"]


def test_load_names_a_file_of_another_shape(tmp_path):
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"model": "tiny", "rows": [{"backend": "torch"}]}))
    with pytest.raises(ValueError, match="old.json"):
        load(bad)


def test_compare_shows_ratios(tmp_path):
    a, b = Results(suite="unit"), Results(suite="unit")
    a.add("pipeline", {"backend": "torch"}, "e2e_ms_p50", 200.0, "ms")
    b.add("pipeline", {"backend": "torch"}, "e2e_ms_p50", 100.0, "ms")
    b.add("pipeline", {"backend": "onnxruntime"}, "e2e_ms_p50", 50.0, "ms")  # not in a: no row
    lines = report.compare_table(report.Run(a.write(tmp_path)), report.Run(b.write(tmp_path)))
    body = [line for line in lines if line.startswith("| pipeline")]
    assert body == ["| pipeline | backend=torch | e2e_ms_p50 | 200.0 ms | 100.0 ms | 0.500 |"]


@pytest.mark.slow
def test_smoke_suite_runs_on_tiny_and_its_report_renders(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "smoke", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("*.json")
    doc = load(path)
    rows = [x for x in doc["rows"] if x["value"] is not None]
    benches = {x["bench"] for x in rows}
    assert {"pipeline", "unet_step", "build", "cold_start"} <= benches
    assert all(x["value"] >= 0 and x["device"] and x["ts"] for x in rows)
    for backend in ("onnxruntime", "torch"):  # every stage of each CPU backend, and throughput at each batch
        got = {x["metric"] for x in rows if x["bench"] == "pipeline" and x["config"]["backend"] == backend}
        for stage in ("tokenize_ms", "clip_ms", "unet_step_ms", "vae_ms", "png_ms", "e2e_ms"):
            assert {f"{stage}_p50", f"{stage}_p90", f"{stage}_p99"} <= got
        assert {"unet_its", "images_per_s", "peak_rss_gib"} <= got
        batches = {x["config"]["batch"] for x in rows if x["metric"] == "images_per_s"
                   and x["config"]["backend"] == backend}
        assert batches == {1, 2, 4, 8}
    skipped = {x["bench"]: x["skipped"] for x in doc["rows"] if x["value"] is None}
    assert "no CUDA GPU" in skipped["attention"]  # this machine has none: a reason, not a number
    unet = [x for x in rows if x["bench"] == "unet_step" and x["metric"] == "max_abs_err"]
    fp32 = [x["value"] for x in unet if x["config"]["precision"] == "fp32"]
    assert len(fp32) >= 2 and max(fp32) < 1e-3  # the fp32 backends agree
    assert all(x["value"] < 0.5 for x in unet)  # bf16 / int8 near it (their quality gate: tests/test_quality.py)
    r = subprocess.run([sys.executable, "-m", "benchmarks.report", str(path), "--out", str(tmp_path / "report")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| onnxruntime | fp32 |" in md and "Not measured on this device" in md
    for name in ("latency_breakdown", "throughput_vs_batch", "latency_cdf", "unet_step"):
        assert f"({name}.png)" in md
        with Image.open(tmp_path / "report" / f"{name}.png") as im:
            assert im.size[0] > 200 and im.size[1] > 100


def test_readme_measured_block_matches_the_committed_results():
    r = subprocess.run([sys.executable, "-m", "benchmarks.report", "--readme", "README.md", "--check"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    assert report.readme_runs(), "no committed full run in benchmarks/results"


def test_pipeline_cli_takes_backend_precision_specs(ort_engines, tmp_path):
    """`python -m benchmarks.pipeline --backends onnxruntime,openvino:bf16,openvino:fp16`: rows per backend and
    precision (the precision asked for, or the backend's default); a precision the backend lacks is a skipped row."""
    import importlib.util
    import shutil

    from engine.backends import cpu

    engines = tmp_path / "engines"
    shutil.copytree(ort_engines, engines)  # tiny 64²: its fp32 exports are reused
    have_ov = importlib.util.find_spec("openvino") is not None
    specs = ["onnxruntime", "openvino:fp16"] + (["openvino:bf16"] if have_ov and cpu.has_native_bf16() else [])
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--model", "tiny", "--size", "64", "--steps", "2",
                        "--runs", "1", "--batch-sizes", "1", "--backends", ",".join(specs), "--engine-dir", str(engines),
                        "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = out.glob("*-pipeline-*.json")
    rows = load(path)["rows"]
    measured = {(x["config"]["backend"], x["config"]["precision"]) for x in rows if x["metric"] == "e2e_ms_p50"}
    assert measured == {("onnxruntime", "fp32")} | ({("openvino", "bf16")} if "openvino:bf16" in specs else set())
    (skipped,) = [x for x in rows if x["value"] is None]
    why = "not available with the openvino backend" if have_ov else "OpenVINO is not installed"
    assert skipped["config"]["precision"] == "fp16" and why in skipped["skipped"]
