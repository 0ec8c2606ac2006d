"""The one cuda-python error checker, for runtime (`cudaError_t`) and driver (`CUresult`) calls.

It lives in kernels/, the lowest layer, so kernels.launcher (driver API) and engine.cuda (runtime API,
which re-exports these names) share it without kernels importing the engine. cuda-python is imported
inside the functions only (a description is looked up when a call failed), so this module imports
without a driver.

Every binding call returns a tuple `(err, *values)`; `check()` turns a non-success `err` into a
`CudaError` carrying the call, the error's name and CUDA's description.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CudaError", "check", "error_name", "error_string"]


class CudaError(RuntimeError):
    """A CUDA runtime/driver call failed; the message names the call and the CUDA error."""


def error_name(err: Any) -> str:
    """`cudaErrorInvalidValue`-style name of a runtime (cudaError_t) or driver (CUresult) status."""
    return str(getattr(err, "name", err))


def error_string(err: Any) -> str:
    """CUDA's description of a runtime or driver status ("out of memory"); "" where none can be had:
    cuda-python missing (ImportError), or the driver's strings without the driver library (cuda-bindings
    raises a RuntimeError subclass when libcuda.so cannot be found)."""
    kind = type(err).__name__
    try:
        if kind == "cudaError_t":
            status, text = importlib.import_module("cuda.bindings.runtime").cudaGetErrorString(err)
        elif kind == "CUresult":
            status, text = importlib.import_module("cuda.bindings.driver").cuGetErrorString(err)
        else:
            return ""
    except (ImportError, RuntimeError):  # the message keeps the error's name; the description is extra
        return ""
    if int(status) != 0 or not text:
        return ""
    return bytes(text).decode(errors="replace") if isinstance(text, (bytes, bytearray)) else str(text)


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python `(err, *values)` result (runtime or driver API): raise CudaError on failure,
    else return the values. Returns None for no value, the value itself for one, and a tuple for several."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        text = error_string(err)
        raise CudaError(f"{what} failed: {error_name(err)}" + (f": {text}" if text else ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
