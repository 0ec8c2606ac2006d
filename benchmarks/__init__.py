"""Benchmarks: measured side by side in one process; results land in benchmarks/results/ as JSON
(one row schema: benchmarks/schema.py)."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).parent / "results"
