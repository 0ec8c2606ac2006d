"""Small cuda-python helpers: error checks, streams, raw allocations, device info, the shared arena.

cuda-python (`cuda.bindings`) is imported inside each function, never at module top, so CPU code paths
can import this module without a driver. Every binding call returns a tuple `(err, *values)`;
`check()` turns a non-success `err` (runtime `cudaError_t` or driver `CUresult`) into a `CudaError`
carrying the error's name and CUDA's description. It is the one error checker and lives in
kernels/cuda_check.py (the lowest layer: kernels.launcher's driver calls use it too); it is re-exported
here. CUDA graphs are engine/graphs.py's (torch.cuda.CUDAGraph).

Only the runtime API is used here (`cuda.bindings.runtime`): it works on the primary context
that PyTorch also uses, so pointers and streams made here are valid in torch and in TensorRT.
"""
from __future__ import annotations

import importlib
import logging
import weakref
from typing import Any

from kernels.cuda_check import CudaError, check  # the one checker (re-exported: engine.cuda.check)

log = logging.getLogger(__name__)

ALIGNMENT = 256  # bytes: what TensorRT asks of user-managed activation memory (set_device_memory)


def _runtime() -> Any:
    """`cuda.bindings.runtime`, imported by name: it is a compiled module without type stubs, so
    pyright cannot see it (typed Any here, the one place that touches it)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError as e:  # pragma: no cover - cuda-python is a declared dependency of the gpu extra
        raise CudaError("cuda-python is not installed: pip install 'sd-engine[gpu]'") from e


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """Round `nbytes` up to a multiple of `alignment` (a power of two or any positive int)."""
    if alignment <= 0:
        raise ValueError(f"alignment must be positive, got {alignment}")
    return -(-max(0, int(nbytes)) // alignment) * alignment


def device_count() -> int:
    """Number of visible CUDA devices; 0 without a driver or GPU."""
    try:
        err, n = _runtime().cudaGetDeviceCount()
    except CudaError:
        return 0
    return int(n) if int(err) == 0 else 0


def set_device(index: int) -> None:
    check(_runtime().cudaSetDevice(index), f"cudaSetDevice({index})")


def device_info(index: int = 0) -> dict[str, Any]:
    """{'name', 'compute_capability' ('9.0'), 'total_memory', 'multiprocessors'} of one device."""
    prop = check(_runtime().cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {
        "name": str(name),
        "compute_capability": f"{prop.major}.{prop.minor}",
        "total_memory": int(prop.totalGlobalMem),
        "multiprocessors": int(prop.multiProcessorCount),
    }


class Stream:
    """A non-blocking CUDA stream owned by this object (never the legacy default stream)."""

    def __init__(self, nonblocking: bool = True):
        rt = _runtime()
        flags = rt.cudaStreamNonBlocking if nonblocking else rt.cudaStreamDefault
        self._handle: Any = check(rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")

    @property
    def ptr(self) -> int:
        """The raw cudaStream_t as an int (what TensorRT's execute_async_v3 and torch take)."""
        return int(self._handle)

    def synchronize(self) -> None:
        check(_runtime().cudaStreamSynchronize(self._handle), "cudaStreamSynchronize")



class DeviceBuffer:
    """A raw cudaMalloc allocation (256-byte aligned by CUDA's guarantee); `free()` releases it."""

    def __init__(self, size: int):
        self.size = int(size)
        self.ptr = 0
        if self.size > 0:
            self.ptr = int(check(_runtime().cudaMalloc(self.size), f"cudaMalloc({self.size})"))

    def free(self) -> None:
        if self.ptr:
            check(_runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0
            self.size = 0

    def __repr__(self) -> str:
        return f"DeviceBuffer(ptr=0x{self.ptr:x}, size={self.size})"


# ---- one stream and one activation arena per device, shared by engines that run one after another ----

_STREAMS: dict[int, Stream] = {}
_ARENAS: dict[int, ActivationArena] = {}


def shared_stream(index: int) -> Stream:
    """The non-default stream every TensorRT runner of device `index` enqueues on (lazily created)."""
    if index not in _STREAMS:
        set_device(index)
        _STREAMS[index] = Stream(nonblocking=True)
    return _STREAMS[index]


def arena_capacity(current: int, required: int, alignment: int = ALIGNMENT) -> int:
    """Capacity after a user needing `required` bytes joins: never shrinks, else `required` aligned up."""
    return max(int(current), align_up(required, alignment))


class ActivationArena:
    """One scratch allocation shared by users that run in order on `shared_stream(index)` (TensorRT
    contexts with USER_MANAGED memory). A user is any object with `bind_memory(ptr, size)`; growing
    synchronizes the stream, reallocates, and rebinds every user still alive."""

    def __init__(self, index: int):
        self.index = index
        self.buffer = DeviceBuffer(0)
        self._users: weakref.WeakSet[Any] = weakref.WeakSet()

    def attach(self, user: Any, required: int) -> None:
        size = arena_capacity(self.buffer.size, required)
        if size != self.buffer.size:
            shared_stream(self.index).synchronize()  # no queued work may still use the old buffer
            self.buffer.free()
            self.buffer = DeviceBuffer(size)
            for other in list(self._users):
                other.bind_memory(self.buffer.ptr, self.buffer.size)
        self._users.add(user)
        user.bind_memory(self.buffer.ptr, self.buffer.size)

    def detach(self, user: Any) -> None:
        """`user` no longer runs (closed): later growth does not rebind it. The buffer is kept for the others."""
        self._users.discard(user)


def arena(index: int) -> ActivationArena:
    if index not in _ARENAS:
        _ARENAS[index] = ActivationArena(index)
    return _ARENAS[index]
