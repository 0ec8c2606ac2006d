"""Drift check: the README lists every flag the CLIs' --help shows (tests/run.sh checks install noise)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["engine.build", "engine.generate", "engine.serve", "export"])
def test_readme_lists_every_flag_of_help(command):
    help_text = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, cwd=ROOT,
                               timeout=120).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text)) - {"--help"}
    assert len(flags) > 5, help_text
    readme = (ROOT / "README.md").read_text()
    missing = sorted(f for f in flags if f not in readme
                     and not re.search(rf"--(min|max)/(min|max)?-?{f.split('-')[-1]}", readme))
    assert missing == [], f"README does not mention {command} flags {missing}"
