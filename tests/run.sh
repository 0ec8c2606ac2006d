#!/usr/bin/env bash
# Install everything into ./.venv (CPU torch) and run the checks: ruff, pyright on the TensorRT code, then pytest.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is the CPU wheel here; an unpinned torch would pull GBs of CUDA wheels.
.venv/bin/python -m pip install -q "torch==2.13.0"
# setuptools warns on every editable install of a flat layout (nothing to act on): silenced. Any other
# build warning (e.g. a package folder missing from pyproject.toml) fails the run, so install noise stays out.
install_log=$(PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".[dev]" 2>&1) \
  || { echo "$install_log"; exit 1; }
noise=$(echo "$install_log" | grep -v "^WARNING: Location .* is ignored" || true)  # this machine's pip config
if [ -n "$noise" ]; then
  echo "$noise"
  echo "tests/run.sh: installing the project printed the lines above; fix their cause" >&2
  exit 1
fi
# TensorRT itself cannot be installed here; its API stubs type-check our TensorRT code (they would pull tensorrt).
.venv/bin/python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
# The playground page is tested in Debian's chromium (never Playwright's download); without apt the test skips.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "tests/run.sh: could not install chromium with apt-get; the playground test will skip" >&2
fi
.venv/bin/ruff check .  # lint: the rules in pyproject.toml's [tool.ruff]
if [ -f pyrightconfig.json ]; then
  .venv/bin/pyright
fi
# Two workers (pytest-xdist), each given whole files so that module fixtures are made once; session fixtures
# are shared between them (tests/conftest.py). Measured on 2 cores: 21.6 min instead of 35 in one process (2026-12-04).
# --durations: the slowest tests, in the log, for whoever cuts the suite time next.
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
