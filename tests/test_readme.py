"""The README's examples run as written (issue 32 item 4: the Python API example named an init image that did not
exist at that point, and its build printed the exporter's warnings)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^(build \w+|denoise \(\w+\)): ")  # our own progress bars (tqdm): build, denoise


def python_block(after_heading: str) -> str:
    """The first ```python block after a README heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after_heading)
    found = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert found, f"no python block after {after_heading!r}"
    return found.group(1)


def test_the_python_api_example_runs_as_written_and_quietly(tmp_path, engine_cache):
    """In an empty folder, in its own process (as a user runs it): it builds tiny, generates, saves a PNG and
    reuses it as an init image. Its output is our progress bars only: no library warning or log line."""
    (tmp_path / "example.py").write_text(python_block("### Python API"))
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "api-0.png").is_file() and (tmp_path / "engines" / "tiny" / "build.json").is_file()
    segments = [part for line in (done.stdout + done.stderr).splitlines() for part in line.split("\r")]
    noise = [part for part in segments if part.strip() and not PROGRESS.match(part)]
    assert noise == [], noise[:10]
