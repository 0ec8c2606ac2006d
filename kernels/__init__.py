"""sd_engine CUDA kernels: fused flash-attention forward (fp16/bf16, head dims 40/64/80/128/160).

Lazy on purpose: importing `kernels` (or kernels.contract / .build / .launcher / .torch_op) needs no GPU.

    kernels.contract          ONNX node / plugin names shared with the exporter (dependency-free)
    kernels.build             python -m kernels.build: nvcc/CMake -> PTX + fatbin under kernels/build/
    kernels.launcher          cuda-python loader + launcher (no torch)
    kernels.torch_op          torch.ops.sd_engine.fused_attention + attention_reference
    kernels.trt_plugin        tensorrt.plugin AOT registration (needs TensorRT >= 10.9)
"""
from __future__ import annotations

import functools
import logging
from typing import Any

__all__ = ["is_available"]  # plus lazy attributes: fused_attention, attention_reference

log = logging.getLogger(__name__)


def is_available() -> bool:
    """True only when a CUDA GPU and its driver are present and the kernel module loads (building the
    kernels first if their artifacts are missing). False says why in one warning (once per reason):
    attention then runs SDPA, and a kernel build that failed is never hidden."""
    from kernels import launcher

    try:
        launcher.load_module()
    except (launcher.KernelUnavailable, launcher.CudaError, OSError) as e:
        _warn_unavailable(f"{type(e).__name__}: {e}")
        return False
    return True


@functools.cache  # each distinct reason is logged once per process
def _warn_unavailable(reason: str) -> None:
    log.warning("the fused attention kernel is unavailable, attention falls back to SDPA: %s", reason)


def __getattr__(name: str) -> Any:  # fused_attention / attention_reference import torch only when used
    if name in ("fused_attention", "attention_reference"):
        from kernels import torch_op

        return getattr(torch_op, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
