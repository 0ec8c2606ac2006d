"""A first run prints our progress bars and our lines only; -v shows the libraries' output too."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS_STDOUT = re.compile(r"^(clip|unet|vae_decoder|vae_encoder): (built|cached)|^build\.json: |^all components|"
                         r"^timings \(ms\)|^wrote |^auto: ")
BAR = re.compile(r"^(build \w+|\w+ weights|denoise \(\w+\)): +\d+%\|")


def run(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SD_ENGINE_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


def lines(text: str) -> list[str]:
    return [x for x in re.split(r"[\r\n]+", text) if x.strip()]


def test_first_build_and_generate_print_only_our_lines(tmp_path):
    cache, engines = tmp_path / "cache", tmp_path / "engines"  # empty cache: the preset is made too
    build = run(cache, "engine.build", "--engine-dir", str(engines), "--components", "clip,unet,vae_decoder",
                "--height", "64", "--width", "64")
    assert build.returncode == 0, build.stderr
    assert [x for x in lines(build.stdout) if not OURS_STDOUT.search(x)] == []
    assert [x for x in lines(build.stderr) if not BAR.search(x)] == []
    gen = run(cache, "engine.generate", "--engine-dir", str(engines), "--steps", "2", "--prompt", "word " * 100,
              "--prompt-syntax", "plain", "--output", str(tmp_path / "out"))  # plain: cut at 77 tokens, warned
    assert gen.returncode == 0, gen.stderr
    assert [x for x in lines(gen.stdout) if not OURS_STDOUT.search(x)] == []
    noise = [x for x in lines(gen.stderr) if not BAR.search(x)]
    assert len(noise) == 1 and noise[0].startswith("warning: prompt longer than 77 tokens was truncated"), noise
    # --force-rebuild: a real export (a new engine dir would otherwise copy the export store's)
    loud = run(cache, "engine.build", "--engine-dir", str(tmp_path / "e2"), "--components", "clip", "-v",
               "--force-rebuild")
    assert loud.returncode == 0 and [x for x in lines(loud.stderr) if not BAR.search(x)]  # the libraries speak
