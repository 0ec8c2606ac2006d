"""Cold start of `python -m engine.generate`: what it imports when, how it exits, and benchmarks/cold_start.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cold_start
from benchmarks.schema import Results
from engine.png import SAMPLER_NAMES
from engine.samplers import SAMPLERS

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_help_and_a_bad_output_answer_before_torch_loads(tmp_path):
    code = f"""
import sys
from engine.generate import main
try:
    main(["--help"])
except SystemExit:
    pass
assert main(["--output", {str(tmp_path / "x.txt")!r}]) == 2
print("loaded:", [m for m in ("torch", "onnxruntime", "diffusers", "transformers", "PIL.Image") if m in sys.modules])
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stdout, out.stdout
    assert "is not an image format" in out.stderr


def test_the_help_lists_every_sampler():
    assert tuple(SAMPLER_NAMES) == SAMPLERS  # the CLI's --scheduler help reads the names from engine.png


def test_generate_process_flushes_its_lines_and_exit_code(ort_engines, tmp_path):
    """The CLI ends with os._exit (no interpreter teardown): its output, its image and its exit code still arrive."""
    out_png = tmp_path / "a.png"
    ok = subprocess.run([sys.executable, "-m", "engine.generate", "--engine-dir", str(ort_engines), "--steps", "2",
                         "--output", str(out_png)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.rstrip().endswith(f"wrote {out_png}") and out_png.stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "engine.generate", "--engine-dir", str(tmp_path / "none"),
                          "--output", str(tmp_path / "b.png")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no engines in")


def test_benchmark_rows(monkeypatch, tmp_path):
    """measure() writes wall / CPU / generate percentiles of its runs under bench cold_start (processes faked)."""
    calls = []

    def fake_run(args, timeout=600):
        calls.append(args)
        engines = Path(args[args.index("--engine-dir") + 1])
        (engines / "tiny").mkdir(parents=True, exist_ok=True)
        (engines / "tiny" / "build.json").write_text(json.dumps({"backend": "onnxruntime", "device": "cpu",
                                                                  "precision": "fp32"}))
        return subprocess.CompletedProcess(args, 0, "", "")

    walls = iter([9.0, 2.0, 3.0, 1.0])  # the first is the untimed warm-up
    monkeypatch.setattr(cold_start, "_run", fake_run)
    monkeypatch.setattr(cold_start, "_generate_once", lambda engines, output: (next(walls), 1.5, 400.0))
    results = Results(suite="unit")
    cold_start.measure(results, runs=3, engine_dir=tmp_path / "engines")
    assert calls[0][0] == "engine.build"
    rows = {r["metric"]: r for r in results.rows}
    assert rows["wall_s_p50"]["value"] == 2.0 and rows["wall_s_p50"]["n"] == 3 and rows["wall_s_p50"]["unit"] == "s"
    assert rows["cpu_s_p50"]["value"] == 1.5 and rows["generate_ms_p50"]["value"] == 400.0
    assert rows["startup_s_p50"]["value"] == pytest.approx(1.6)
    assert {r["bench"] for r in results.rows} == {"cold_start"}
    assert rows["wall_s_p50"]["config"]["backend"] == "onnxruntime"
    with pytest.raises(ValueError, match="runs"):
        cold_start.measure(results, runs=0)
