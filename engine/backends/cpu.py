"""What the host CPU can do, for the CPU backends' precision checks and cache keys.

bf16 is offered only where the CPU computes it natively (AVX512-BF16 or AMX-BF16): elsewhere the
libraries emulate it, slower than fp32, so a bf16 build there would be a mistake, and is refused.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

# the /proc/cpuinfo flags that change which kernels the CPU libraries pick (part of the CPU backends' cache keys)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _all_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa_flags() -> list[str]:
    """The ISA_FLAGS this CPU has, in ISA_FLAGS' order (empty where /proc/cpuinfo is unreadable)."""
    have = _all_flags()
    return [f for f in ISA_FLAGS if f in have]


def has_native_bf16() -> bool:
    return any(f in _all_flags() for f in BF16_FLAGS)


def check_bf16(backend: str, alternative: str = "fp32") -> None:
    """Refuse bf16 on a CPU without native bf16 (one line naming the value and the alternative)."""
    if not has_native_bf16():
        raise ValueError(f"precision 'bf16' needs a CPU with avx512_bf16 or amx_bf16, which this one lacks "
                         f"(backend {backend}); use --precision {alternative}")


def threads() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
