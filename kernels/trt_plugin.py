# pyright: basic
# tensorrt-stubs (10.13) describe `tensorrt` but not `tensorrt.plugin`, so `trtp` is untyped here.
"""TensorRT plugin for the exporter's `FusedAttention` node (kernels.contract), as a tensorrt.plugin
("quickly deployable plugin") with an ahead-of-time implementation: the engine embeds our kernel's PTX
and launches it with no Python at run time.

    from kernels.trt_plugin import register_plugin
    register_plugin()   # before parsing the ONNX / building the engine (and before deserialising
                        # engines in a Python process; C++ runtimes need nothing)

Plugin id "sd_engine::FusedAttention", fields num_heads and head_dim (ints). Inputs q [B, Sq, H*D],
k, v [B, Sk, H*D], output like q; fp16 or bf16 (all four the same). The AOT implementation returns the
baked-scale entry `sd_attention_fwd_<f16|bf16>_d<D>` cut out of the compute_80 PTX, kernel arguments
(q, k, v, B, Sq, Sk, H, out) with the four ints as symbolic int32 extra args, and the launch geometry
grid (ceil(Sq / block_m), B * H), block (threads), `smem_bytes` dynamic shared memory (<= 48 KiB).

Needs TensorRT >= 10.9 (aot_impl). The PTX's ISA version is that of the nvcc that built it (PTX 9.0
for CUDA 13): the driver that JIT-compiles it must be at least as new (set CUDA_HOME to an older
toolkit to emit older PTX). Importing this module without TensorRT raises ImportError.
"""
import functools

from kernels import contract
from kernels.build import KernelConfig, ensure_built, kernel_configs, ptx_for_entry

# No `from __future__ import annotations` here: tensorrt.plugin inspects the (evaluated) annotations.
try:
    import tensorrt as trt

    if not hasattr(trt, "__version__"):  # e.g. a namespace package left by tensorrt-stubs
        raise ImportError("the tensorrt package found is not TensorRT (no __version__)")
    import tensorrt.plugin as trtp  # pyright: ignore[reportMissingImports]  # not in tensorrt-stubs 10.13
except ImportError as e:
    raise ImportError(
        "kernels.trt_plugin needs TensorRT >= 10.9 with its Python plugin API (tensorrt.plugin): "
        f"pip install 'tensorrt>=10.9' ({e})"
    ) from e
if not hasattr(trtp, "aot_impl"):
    raise ImportError(
        f"kernels.trt_plugin needs tensorrt.plugin.aot_impl (TensorRT >= 10.9); found TensorRT {trt.__version__}"
    )

AUTOTUNE_TYPES = "FP16|BF16, FP16|BF16, FP16|BF16, FP16|BF16"  # q, k, v, out: all fp16 or all bf16


def _dtype_name(dtype) -> str:
    if dtype == trt.float16:
        return "float16"
    if dtype == trt.bfloat16:
        return "bfloat16"
    raise ValueError(f"{contract.PLUGIN_ID}: unsupported dtype {dtype}; expected float16 or bfloat16")


def _check_attrs(num_heads: int, head_dim: int) -> None:
    if head_dim not in contract.SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{contract.PLUGIN_ID}: head_dim {head_dim} not in {contract.SUPPORTED_HEAD_DIMS}")
    if num_heads <= 0:
        raise ValueError(f"{contract.PLUGIN_ID}: num_heads must be positive, got {num_heads}")


def aot_kernel(q, k, num_heads: int, head_dim: int, ptx: str, configs: dict[int, KernelConfig]):
    """(kernel name, PTX, launch params, extra args) for q/k TensorDescs; the body of the aot_impl."""
    _check_attrs(num_heads, head_dim)
    name = contract.entry_name(_dtype_name(q.dtype), head_dim)
    cfg = configs[head_dim]
    batch, seq_q, seq_k = q.shape_expr[0], q.shape_expr[1], k.shape_expr[1]  # symbolic dims
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(seq_q, cfg.block_m)
    launch.grid_y = batch * num_heads
    launch.block_x = cfg.threads
    launch.shared_mem = cfg.smem_bytes
    extra = trtp.SymIntExprs(4)  # kernel args after q, k, v: int B, int Sq, int Sk, int H; then out
    extra[0] = trtp.SymInt32(batch)
    extra[1] = trtp.SymInt32(seq_q)
    extra[2] = trtp.SymInt32(seq_k)
    extra[3] = trtp.SymInt32(num_heads)
    return name, ptx_for_entry(ptx, name), launch, extra


@functools.cache  # registered once per process (a failed registration is tried again)
def register_plugin() -> None:
    """Register sd_engine::FusedAttention with TensorRT (idempotent). Builds the PTX if it is missing."""
    ptx = ensure_built(ptx_only=True).ptx.read_text()
    configs = kernel_configs(ptx)

    @trtp.register(contract.PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, num_heads: int,
                  head_dim: int) -> trtp.TensorDesc:
        _check_attrs(num_heads, head_dim)
        return q.like()  # [B, Sq, H*D], q's dtype

    @trtp.autotune(contract.PLUGIN_ID)
    def _autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, num_heads: int, head_dim: int,
                  outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(AUTOTUNE_TYPES, "LINEAR")]

    @trtp.aot_impl(contract.PLUGIN_ID)
    def _aot_impl(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, num_heads: int, head_dim: int,
                  outputs: tuple[trtp.TensorDesc], tactic: int
                  ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot_kernel(q, k, num_heads, head_dim, ptx, configs)
