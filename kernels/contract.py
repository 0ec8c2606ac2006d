"""The fixed contract between the ONNX exporter and our fused-attention kernel / TensorRT plugin.

Dependency-free on purpose (no torch, no CUDA, no TensorRT): the exporter imports these names too.

The exporter emits, for every attention call, one custom node:

    op_type  = PLUGIN_NAME            ("FusedAttention")
    domain   = PLUGIN_NAMESPACE       ("sd_engine")
    attributes:
        num_heads         int   (ATTR_NUM_HEADS)
        head_dim          int   (ATTR_HEAD_DIM)
        plugin_namespace  str = PLUGIN_NAMESPACE   (ATTR_PLUGIN_NAMESPACE)
        plugin_version    str = PLUGIN_VERSION     (ATTR_PLUGIN_VERSION)
    inputs  q [B, Sq, H*D], k [B, Sk, H*D], v [B, Sk, H*D]   (= [B, S, H, D] row-major, contiguous)
    output  o [B, Sq, H*D]
    dtype   float16 (bfloat16 also supported); softmax scale 1/sqrt(head_dim) baked in; no mask.
"""
from __future__ import annotations

PLUGIN_NAME = "FusedAttention"
PLUGIN_NAMESPACE = "sd_engine"
PLUGIN_VERSION = "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"  # the id tensorrt.plugin registers

ATTR_NUM_HEADS = "num_heads"
ATTR_HEAD_DIM = "head_dim"
ATTR_PLUGIN_NAMESPACE = "plugin_namespace"
ATTR_PLUGIN_VERSION = "plugin_version"

INPUT_NAMES = ("q", "k", "v")
OUTPUT_NAMES = ("out",)

# Head dims the kernel is specialised for (SD 1.5: 40/80/160, SD 2.x: 64, others: 128).
SUPPORTED_HEAD_DIMS = (40, 64, 80, 128, 160)
# torch/ONNX dtype names the kernel supports (the exporter compares str(torch dtype) against these) ...
SUPPORTED_DTYPES = ("float16", "bfloat16")
# ... and the tag each one has in kernel entry names.
DTYPE_TAGS = {"float16": "f16", "bfloat16": "bf16"}
# torch op registered by kernels.torch_op.
TORCH_OP = "sd_engine::fused_attention"


def entry_name(dtype: str, head_dim: int, scaled: bool = False) -> str:
    """Kernel entry point, e.g. sd_attention_fwd_f16_d40 (baked 1/sqrt(D)) or ..._scaled (runtime scale).

    Baked:  (q, k, v, int B, int Sq, int Sk, int H, out)             -- TensorRT AOT plugin order
    Scaled: (q, k, v, int B, int Sq, int Sk, int H, float scale, out)
    """
    tag = DTYPE_TAGS.get(dtype, dtype)  # accepts "float16" or "f16"
    if tag not in DTYPE_TAGS.values():
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {SUPPORTED_DTYPES}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"unsupported head_dim {head_dim}; expected one of {SUPPORTED_HEAD_DIMS}")
    return f"sd_attention_fwd_{tag}_d{head_dim}" + ("_scaled" if scaled else "")


def all_entry_names() -> list[str]:
    return [
        entry_name(dt, d, scaled)
        for dt in DTYPE_TAGS.values()
        for d in SUPPORTED_HEAD_DIMS
        for scaled in (False, True)
    ]
