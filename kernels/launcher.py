"""Load the attention kernels with the CUDA driver API (cuda-python) and launch them on a stream.

No torch here: pointers, sizes and the stream are plain ints, so the engine's own cuda-python runtime
can use it too. Importing this module touches no GPU; the first launch initialises the driver,
builds the kernels if their artifacts are missing (kernels.build.ensure_built) and loads the fatbin
into the *current* CUDA context (torch's primary context when called from the torch op), one module
per context.

    launch_attention(q, k, v, out, batch=B, seq_q=Sq, seq_k=Sk, num_heads=H, head_dim=D,
                     dtype="float16", stream=s, scale=None)

q/out are [B, Sq, H*D], k/v [B, Sk, H*D] device pointers (contiguous, 16-byte aligned). `scale=None`
launches the baked 1/sqrt(D) entry (the same kernel TensorRT runs); a float launches `_scaled`.
Driver results are checked by kernels.cuda_check.check (the one cuda-python error checker, which
engine.cuda re-exports): a failed call raises CudaError (also importable from here) naming the call, the
error and its description.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Any

from kernels import contract
from kernels.build import (
    BUILD_HINT,
    BuildError,
    KernelConfig,
    ensure_built,
    kernel_configs,
)
from kernels.cuda_check import CudaError, check, error_name  # noqa: F401  (CudaError: what failed calls raise)

MAX_GRID_Y = 65535


class KernelUnavailable(RuntimeError):
    """What is needed to run the kernel is missing (GPU, driver, cuda-python, nvcc/artifacts)."""


def _driver() -> Any:
    try:
        from cuda.bindings import driver  # pyright: ignore[reportAttributeAccessIssue]  # compiled module, no stubs
    except ImportError as e:  # pragma: no cover - cuda-bindings is installed in dev and CI
        raise KernelUnavailable(
            "the fused attention kernel needs cuda-python: pip install 'cuda-python>=12.6'"
        ) from e
    return driver


_lock = threading.Lock()


@functools.cache  # done once per process; a failure is not cached (the next call tries again)
def init() -> None:
    """Initialise the driver, or raise KernelUnavailable naming what is missing."""
    drv = _driver()
    with _lock:
        try:
            (err,) = drv.cuInit(0)
        except (RuntimeError, OSError) as e:  # cuda-bindings raises (a RuntimeError) when libcuda.so cannot be found
            raise KernelUnavailable(
                "the fused attention kernel needs an NVIDIA GPU and its driver, but the CUDA driver "
                f"library (libcuda.so) was not found: {e}"
            ) from e
        if err != drv.CUresult.CUDA_SUCCESS:
            raise KernelUnavailable(
                f"the fused attention kernel needs an NVIDIA GPU: cuInit failed with {error_name(err)}"
            )
        if check(drv.cuDeviceGetCount(), "cuDeviceGetCount") < 1:
            raise KernelUnavailable("the fused attention kernel needs an NVIDIA GPU: none was found")


@dataclass
class _Module:
    module: Any
    configs: dict[int, KernelConfig]
    functions: dict[str, Any]


_modules: dict[int, _Module] = {}  # keyed by CUcontext handle


def _current_context(device: int | None) -> Any:
    """The current context; with none current, make `device`'s (default 0) primary context current."""
    drv = _driver()
    ctx = check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if ctx is not None and int(ctx) != 0:
        return ctx
    dev = check(drv.cuDeviceGet(device or 0), "cuDeviceGet")
    ctx = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    check(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return ctx


def load_module(device: int | None = None) -> _Module:
    """The kernels module of the current context (loaded on first use)."""
    init()
    ctx = _current_context(device)
    key = int(ctx)
    if key in _modules:
        return _modules[key]
    with _lock:
        if key in _modules:
            return _modules[key]
        try:
            art = ensure_built()
        except BuildError as e:
            raise KernelUnavailable(f"the fused attention kernels are not built and could not be built: {e}") from e
        assert art.fatbin is not None
        image = art.fatbin.read_bytes()
        buf = ctypes.create_string_buffer(image, len(image))
        drv = _driver()
        module = check(drv.cuModuleLoadData(ctypes.addressof(buf)), f"cuModuleLoadData({art.fatbin})")
        configs = kernel_configs(art.ptx.read_text())
        missing = [d for d in contract.SUPPORTED_HEAD_DIMS if d not in configs]
        if missing:
            raise KernelUnavailable(f"{art.ptx} lacks launch configs for head dims {missing}; rebuild: {BUILD_HINT} --force")
        _modules[key] = _Module(module, configs, {})
        return _modules[key]


def _function(mod: _Module, name: str, smem_bytes: int) -> Any:
    fn = mod.functions.get(name)
    if fn is None:
        drv = _driver()
        fn = check(drv.cuModuleGetFunction(mod.module, name.encode()), f"cuModuleGetFunction({name})")
        if smem_bytes > 48 * 1024:  # the shipped configs stay below; kept for larger future tiles
            attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(drv.cuFuncSetAttribute(fn, attr, smem_bytes), "cuFuncSetAttribute")
        mod.functions[name] = fn
    return fn


def launch_attention(q: int, k: int, v: int, out: int, *, batch: int, seq_q: int, seq_k: int,
                     num_heads: int, head_dim: int, dtype: str, stream: int,
                     scale: float | None = None, device: int | None = None) -> None:
    """Enqueue out = softmax(scale * q k^T) v on `stream` (a CUstream handle as int; 0 = legacy default)."""
    if head_dim not in contract.SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} not supported; supported: {contract.SUPPORTED_HEAD_DIMS}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if batch * num_heads > MAX_GRID_Y:
        raise ValueError(f"batch * num_heads = {batch * num_heads} exceeds {MAX_GRID_Y}")
    if min(batch, seq_q, num_heads) <= 0 or seq_k < 0:
        raise ValueError(f"bad sizes: batch={batch} seq_q={seq_q} seq_k={seq_k} num_heads={num_heads}")
    for name, p in (("q", q), ("k", k), ("v", v), ("out", out)):
        if p % 16:
            raise ValueError(f"{name} pointer {p:#x} is not 16-byte aligned")
    mod = load_module(device)
    cfg = mod.configs[head_dim]
    name = contract.entry_name(dtype, head_dim, scaled=scale is not None)
    fn = _function(mod, name, cfg.smem_bytes)
    args: list[Any] = [ctypes.c_uint64(q), ctypes.c_uint64(k), ctypes.c_uint64(v), ctypes.c_int32(batch),
                       ctypes.c_int32(seq_q), ctypes.c_int32(seq_k), ctypes.c_int32(num_heads)]
    if scale is not None:
        args.append(ctypes.c_float(scale))
    args.append(ctypes.c_uint64(out))
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    drv = _driver()
    grid_x = (seq_q + cfg.block_m - 1) // cfg.block_m
    check(drv.cuLaunchKernel(fn, grid_x, batch * num_heads, 1, cfg.threads, 1, 1, cfg.smem_bytes,
                              drv.CUstream(stream), ctypes.addressof(params), 0), f"cuLaunchKernel({name})")
