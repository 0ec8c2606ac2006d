"""Benchmarks: measured side by side in one process; results land in benchmarks/results/ as JSON."""
from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def device_name(device: str = "cpu") -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def save_result(prefix: str, report: dict) -> Path:
    """Write report (which should name its device and date) as results/<prefix>-<date>.json."""
    report.setdefault("date", time.strftime("%Y-%m-%d"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', prefix)}-{report['date']}.json"
    dest.write_text(json.dumps(report, indent=2) + "\n")
    return dest
