"""`--backend auto` on a CPU: the fastest measured backend and precision that is installed, runs natively on
this CPU and meets the quality gate.

The measurements are `cpu_table.json` beside this file, written from the committed benchmark results by
`python -m benchmarks.cpu_table` (tests/test_cpu_choice.py fails when the two disagree). Each row is a
(backend, precision) with its SD 1.5 UNet step time relative to ONNX Runtime fp32 (batch 2, geometric mean
over the measured sizes) and, for reduced precisions, the whole-pipeline PSNR against the same backend's
fp32 image (the lowest measured). `pick` walks the rows fastest first and takes the first that

- is installed (`openvino` is an optional import; torch and ONNX Runtime are always there),
- runs natively here: bf16 needs avx512_bf16 or AMX-BF16 (emulated bf16 is slower than fp32), int8 needs VNNI,
- meets the gate: PSNR >= QUALITY_GATE_DB (fp32 rows are the reference and pass),
- keeps every feature of the engine: int8 graphs cannot merge LoRA adapters, so `auto` never picks int8
  (ask for it with --precision int8).

A requested precision (`--precision`) restricts the rows to it; with none left (fp16 on a CPU, say), the
answer is ONNX Runtime at that precision, as before this table existed.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from engine.backends import cpu

TABLE = Path(__file__).with_name("cpu_table.json")
QUALITY_GATE_DB = 40.0  # whole-image PSNR vs fp32 a reduced precision must reach (tests/test_quality.py)
FALLBACK = "onnxruntime"  # the answer when no row fits: always installed, every precision it has
NATIVE_FLAGS = {"bf16": cpu.BF16_FLAGS, "int8": ("avx512_vnni", "avx_vnni", "amx_int8")}  # one of these, or emulated
NOT_AUTO = {"int8": "int8 graphs cannot merge LoRA adapters"}  # precisions auto leaves to an explicit --precision
CPU_BACKENDS = ("openvino", "onnxruntime", "torch")  # each imports the module of its name


@dataclass(frozen=True)
class Row:
    backend: str
    precision: str
    time_vs_fp32: float  # UNet step time / ONNX Runtime fp32's, same shapes, same machine
    psnr_db: float | None  # None for fp32: the reference itself


@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str
    why: str  # one line for the build's output


@functools.cache
def table() -> dict:
    return json.loads(TABLE.read_text())


def rows(doc: dict | None = None) -> list[Row]:
    """The table's rows, fastest first."""
    doc = table() if doc is None else doc
    out = [Row(r["backend"], r["precision"], float(r["time_vs_fp32"]), r.get("psnr_db")) for r in doc["rows"]]
    return sorted(out, key=lambda r: r.time_vs_fp32)


def installed_backends() -> frozenset[str]:
    return frozenset(b for b in CPU_BACKENDS if importlib.util.find_spec(b) is not None)


def why_not(row: Row, installed: Collection[str], flags: Collection[str]) -> str | None:
    """Why `auto` may not take this row here, or None when it may."""
    if row.backend not in installed:
        return f"{row.backend} is not installed"
    needs = NATIVE_FLAGS.get(row.precision, ())
    if needs and not any(f in flags for f in needs):
        return f"{row.precision} needs one of {', '.join(needs)}, which this CPU lacks"
    if row.precision in NOT_AUTO:
        return NOT_AUTO[row.precision]
    if row.psnr_db is not None and row.psnr_db < QUALITY_GATE_DB:
        return f"{row.psnr_db:.1f} dB is under the {QUALITY_GATE_DB:.0f} dB quality gate"
    return None


def pick(precision: str | None = None, installed: Collection[str] | None = None,
         flags: Collection[str] | None = None, doc: dict | None = None) -> Choice:
    """The CPU backend and precision for `--backend auto` (facts about this machine unless given)."""
    installed = installed_backends() if installed is None else installed
    flags = cpu.isa_flags() if flags is None else flags
    doc = table() if doc is None else doc
    for row in rows(doc):
        if precision is not None and row.precision != precision:
            continue
        if why_not(row, installed, flags) is None:
            quality = "" if row.psnr_db is None else f", {row.psnr_db:.1f} dB against fp32"
            return Choice(row.backend, row.precision,
                          f"auto: {row.backend} {row.precision}, the fastest CPU path usable here "
                          f"({doc['workload']}: {row.time_vs_fp32:.2f}x onnxruntime fp32{quality}; "
                          f"measured on {doc['device']}, {TABLE.name})")
    asked = precision or "fp32"
    return Choice(FALLBACK, asked, f"auto: {FALLBACK} {asked} (no measured CPU path for {asked} is usable here)")
