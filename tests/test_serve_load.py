"""`python -m benchmarks.serve_load --quick` against real servers on tiny: every phase reported, counts add up."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHASES = ("closed_c1", "closed_c8", "batch1_c8", "overload_poisson")


@pytest.fixture(scope="module")
def load_report(ort_engines, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("serve_load") / "load.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve_load", "--quick", "--engine-dir", str(ort_engines),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| phase |" in proc.stdout and "overload_poisson" in proc.stdout
    return json.loads(out.read_text())


def test_every_phase_is_reported(load_report):
    assert [p["phase"] for p in load_report["phases"]] == list(PHASES)
    assert load_report["machine"]["cpu_count"] >= 1 and load_report["machine"]["onnxruntime"]
    assert load_report["server_info"]["status"] == "ready"


def test_counts_add_up(load_report):
    for p in load_report["phases"]:
        assert p["answered"] + p["lost"] == p["sent"], p
        assert p["ok"] + p["rejected_429"] + p["errors_5xx"] + p["errors_other"] == p["answered"], p
        assert sum(p["statuses"].values()) == p["answered"], p
        assert p["lost"] == 0, p
        assert p["errors_5xx"] == 0, p
        assert p["sent"] > 0 and p["wall_s"] > 0


def test_closed_loop_phases_all_succeed(load_report):
    for p in load_report["phases"]:
        if p["mode"] != "closed":
            continue
        assert p["ok"] == p["sent"] == p["images"], p
        assert p["throughput_img_s"] > 0
        lat = p["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert sum(p["batch_images_hist"].values()) == p["ok"]
        assert all(1 <= int(k) <= (1 if p["phase"].startswith("batch1") else 8) for k in p["batch_images_hist"])


def test_batch1_baseline_never_batches(load_report):
    baseline = next(p for p in load_report["phases"] if p["phase"] == "batch1_c8")
    assert baseline["batch_images_hist"] == {"1": baseline["ok"]}


def test_overload_phase_is_bounded_and_answered(load_report):
    over = load_report["phases"][-1]
    assert over["mode"] == "open" and over["arrival_rate_req_s"] > 0
    assert over["arrival_rate_req_s"] == pytest.approx(2 * over["capacity_img_s"], rel=1e-2)
    assert over["sent"] <= load_report["config"]["overload_requests"]
    assert over["rejections_without_retry_after"] == 0
    if over["rejected_429"]:
        assert over["rejection_ms"]["max"] is not None


def test_summary_and_clean_shutdowns(load_report):
    s = load_report["summary"]
    assert s["batching_ratio_c8"] > 0
    assert s["closed_loop_lost"] == 0 and s["closed_loop_5xx"] == 0
    assert s["servers_exit_codes"] == [0, 0, 0]


def test_out_may_name_a_folder(tmp_path):
    """`--out DIR` crashed at the end (the report was renamed onto the folder) and lost the results."""
    from benchmarks.serve_load import out_path, write_json

    doc = {"machine": {"cuda": False}, "server_info": {"model": "tiny"}}
    path = out_path(tmp_path, doc)
    write_json(path, doc)
    assert path == tmp_path / "serve_load_tiny_cpu.json" and json.loads(path.read_text()) == doc
    assert out_path(tmp_path / "new" / "x.json", doc) == tmp_path / "new" / "x.json"

