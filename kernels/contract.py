"""The one definition of the fused-attention ONNX node / TensorRT plugin (no imports on purpose).

The exporter (export/attention.py, mode "plugin") emits one node per attention call:
    op_type PLUGIN_NAME, domain PLUGIN_NAMESPACE, attributes num_heads, head_dim,
    plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION
    inputs  q [B, Sq, H*D], k [B, Sk, H*D], v [B, Sk, H*D]   ([B, S, H, D] row-major, contiguous)
    output  o [B, Sq, H*D], same dtype (float16 or bfloat16); softmax scale 1/sqrt(head_dim) baked in.
kernels/trt_plugin.py registers the matching `tensorrt.plugin`.
"""

PLUGIN_NAME = "FusedAttention"
PLUGIN_NAMESPACE = "sd_engine"
PLUGIN_VERSION = "1"
ATTR_NUM_HEADS = "num_heads"
ATTR_HEAD_DIM = "head_dim"
SUPPORTED_HEAD_DIMS = (40, 64, 80, 128, 160)  # each a specialised kernel; other sizes stay decomposed
SUPPORTED_DTYPES = ("float16", "bfloat16")
