"""Small cuda-python helpers: error checks, streams, events, raw allocations, graph capture, device info.

cuda-python (`cuda.bindings`) is imported inside each function, never at module top, so CPU code paths
can import this module without a driver. Every binding call returns a tuple `(err, *values)`;
`check()` turns a non-success `err` into a `CudaError` carrying the error's name.

Only the runtime API is used (`cuda.bindings.runtime`): it works on the primary context
that PyTorch also uses, so pointers and streams made here are valid in torch and in TensorRT.
"""
from __future__ import annotations

import importlib
import logging
import weakref
from typing import Any, Callable

log = logging.getLogger(__name__)

ALIGNMENT = 256  # bytes: what TensorRT asks of user-managed activation memory (set_device_memory)


class CudaError(RuntimeError):
    """A CUDA runtime/driver call failed; the message names the call and the CUDA error."""


def _runtime() -> Any:
    """`cuda.bindings.runtime`, imported by name: it is a compiled module without type stubs, so
    pyright cannot see it (typed Any here, the one place that touches it)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError as e:  # pragma: no cover - cuda-python is a declared dependency of the gpu extra
        raise CudaError("cuda-python is not installed: pip install 'sd-engine[gpu]'") from e


def error_name(err: Any) -> str:
    """`cudaErrorInvalidValue`-style name of a runtime (cudaError_t) or driver (CUresult) status."""
    return str(getattr(err, "name", err))


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python `(err, *values)` result: raise CudaError on failure, else return the values.

    Returns None for no value, the value itself for one, and a tuple for several."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        raise CudaError(f"{what} failed: {error_name(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


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

    def is_capturing(self) -> bool:
        rt = _runtime()
        status = check(rt.cudaStreamIsCapturing(self._handle), "cudaStreamIsCapturing")
        return status != rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone

    def destroy(self) -> None:
        if self._handle is not None:
            check(_runtime().cudaStreamDestroy(self._handle), "cudaStreamDestroy")
            self._handle = None


class Event:
    """A CUDA event; timing enabled unless `timing=False`."""

    def __init__(self, timing: bool = True):
        rt = _runtime()
        flags = rt.cudaEventDefault if timing else rt.cudaEventDisableTiming
        self._handle: Any = check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")

    def record(self, stream: Stream) -> None:
        check(_runtime().cudaEventRecord(self._handle, stream.ptr), "cudaEventRecord")

    def synchronize(self) -> None:
        check(_runtime().cudaEventSynchronize(self._handle), "cudaEventSynchronize")

    def elapsed_ms(self, end: "Event") -> float:
        return float(check(_runtime().cudaEventElapsedTime(self._handle, end._handle), "cudaEventElapsedTime"))

    def destroy(self) -> None:
        if self._handle is not None:
            check(_runtime().cudaEventDestroy(self._handle), "cudaEventDestroy")
            self._handle = None


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


class Graph:
    """An instantiated CUDA graph captured from one stream; `launch()` replays it."""

    def __init__(self, graph: Any, exec_: Any):
        self._graph, self._exec = graph, exec_

    def launch(self, stream: Stream) -> None:
        check(_runtime().cudaGraphLaunch(self._exec, stream.ptr), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = _runtime()
        if self._exec is not None:
            check(rt.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            self._exec = None
        if self._graph is not None:
            check(rt.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None


def capture_graph(stream: Stream, enqueue: Callable[[], object]) -> tuple[Graph | None, str]:
    """Capture the work `enqueue()` puts on `stream` into a graph: (graph, "") or (None, reason).

    Capture runs in thread-local mode, so unrelated CUDA calls on other threads do not invalidate it.
    `enqueue` returning False (TensorRT's execute_async_v3 failure) or raising also aborts it; the
    capture is always ended so the stream is left usable for eager work."""
    rt = _runtime()
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    err, *_ = rt.cudaStreamBeginCapture(stream.ptr, mode)
    if int(err) != 0:
        return None, f"cudaStreamBeginCapture failed: {error_name(err)}"
    reason = ""
    try:
        if enqueue() is False:
            reason = "the enqueue call returned False during capture"
    except Exception as e:  # noqa: BLE001 - reported as the reason, capture falls back to eager
        reason = f"the enqueue call raised {type(e).__name__}: {e}"
    err, graph = rt.cudaStreamEndCapture(stream.ptr)
    if int(err) != 0 or graph is None or reason:
        if graph is not None:
            rt.cudaGraphDestroy(graph)
        return None, reason or f"cudaStreamEndCapture failed: {error_name(err)}"
    err, exec_ = rt.cudaGraphInstantiate(graph, 0)
    if int(err) != 0:
        rt.cudaGraphDestroy(graph)
        return None, f"cudaGraphInstantiate failed: {error_name(err)}"
    return Graph(graph, exec_), ""


class GraphCache:
    """CUDA graphs of one enqueue function per key (e.g. the input shapes), on one stream.

    `run(key, enqueue)`: the first call for a key runs eagerly (warm-up: lazy initialisation happens
    outside capture), the second captures and launches, later ones launch. A key whose capture fails
    stays eager; the first failure is logged once. `clear()` drops every graph (memory moved)."""

    def __init__(self, stream: Stream, label: str, enabled: bool = True):
        self.stream, self.label, self.enabled = stream, label, enabled
        self._graphs: dict[Any, Graph] = {}
        self._warm: set[Any] = set()
        self._failed: set[Any] = set()
        self._told = False

    def is_warm(self, key: Any) -> bool:
        return key in self._warm

    @property
    def keys(self) -> list[Any]:
        return list(self._graphs)

    def run(self, key: Any, enqueue: Callable[[], object]) -> None:
        graph = self._graphs.get(key)
        if graph is None and self.enabled and key in self._warm and key not in self._failed:
            graph = self._capture(key, enqueue)
        if graph is not None:
            graph.launch(self.stream)
            return
        enqueue()
        self._warm.add(key)

    def _capture(self, key: Any, enqueue: Callable[[], object]) -> Graph | None:
        graph, reason = capture_graph(self.stream, enqueue)
        if graph is None:
            self._failed.add(key)
            if not self._told:
                log.warning("%s: CUDA graph capture failed (%s); running eagerly", self.label, reason)
                self._told = True
            return None
        self._graphs[key] = graph
        return graph

    def clear(self) -> None:
        for graph in self._graphs.values():
            graph.destroy()
        self._graphs.clear()


# ---- one stream and one activation arena per device, shared by engines that run one after another ----

_STREAMS: dict[int, Stream] = {}
_ARENAS: dict[int, "ActivationArena"] = {}


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
        self._users: "weakref.WeakSet[Any]" = weakref.WeakSet()

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


def arena(index: int) -> ActivationArena:
    if index not in _ARENAS:
        _ARENAS[index] = ActivationArena(index)
    return _ARENAS[index]
