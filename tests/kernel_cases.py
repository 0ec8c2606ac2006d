"""The fused attention kernel tests' shared cases (tests/test_kernels.py on the CPU emulator, tests/test_kernels_gpu.py
on a GPU): the dtypes, the GPU markers, the error bound of plain low-precision PyTorch, and the edge cases (huge
logits, a single key, a single query) with their inputs and their check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def lowp_sdpa_err(q, k, v, heads, scale, ref) -> tuple[float, float]:
    """max / mean abs error of plain low-precision torch (SDPA math in q's dtype) vs the fp32 reference.
    On CUDA the math backend upcasts fp16/bf16 to fp32 unless fp16/bf16 reductions are allowed; we
    allow them, so the baseline really is "plain fp16 PyTorch"."""
    b, sq, e = q.shape
    def hv(x):
        return x.view(b, x.shape[1], heads, e // heads).transpose(1, 2)
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(hv(q), hv(k), hv(v), scale=scale)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)
    diff = (out.transpose(1, 2).reshape(b, sq, e).float() - ref).abs()
    return diff.max().item(), diff.mean().item()


def assert_within_lowp(out: torch.Tensor, q, k, v, heads: int, scale: float | None, atol: float = 1e-4) -> None:
    """max and mean abs error vs the fp32 reference at most 2x plain low-precision PyTorch's."""
    from kernels.torch_op import attention_reference

    q, k, v = (t.cpu() for t in (q, k, v))
    ref = attention_reference(q, k, v, heads, scale)
    err = (out.cpu().float() - ref).abs()
    assert err.isfinite().all(), "non-finite outputs"
    lowp_max, lowp_mean = lowp_sdpa_err(q, k, v, heads, scale, ref)
    assert err.max().item() <= 2 * lowp_max + atol, (err.max().item(), lowp_max)
    assert err.mean().item() <= 2 * lowp_mean + atol / 100, (err.mean().item(), lowp_mean)


EDGE_CASES = [  # id, dtype, D, B, Sq, Sk, H, q multiplier: huge logits, a single key, a single query
    ("logits_x30_f16_d40", "float16", 40, 1, 77, 77, 2, 30.0), ("logits_x30_bf16_d80", "bfloat16", 80, 1, 70, 100, 1, 30.0),
    ("logits_x30_f16_d160", "float16", 160, 1, 33, 77, 1, 30.0),
    ("sk1_f16_d64", "float16", 64, 1, 70, 1, 2, 1.0), ("sk1_bf16_d160", "bfloat16", 160, 1, 33, 1, 1, 1.0),
    ("sq1_f16_d40", "float16", 40, 2, 1, 77, 2, 1.0), ("sq1_bf16_d128", "bfloat16", 128, 1, 1, 200, 1, 1.0),
]


def edge_inputs(dtype: str, d: int, b: int, sq: int, sk: int, h: int, q_mult: float, device: str = "cpu"):
    """q scaled by q_mult in float32 before rounding (logits |s| in the hundreds for q x 30), k, v ~ N(0, 1)."""
    g = torch.Generator().manual_seed(d * 31 + sq * 7 + sk)
    q, k, v = (torch.randn(b, s, h * d, generator=g) for s in (sq, sk, sk))
    return [t.to(device=device, dtype=DTYPES[dtype]) for t in (q * q_mult, k, v)]


def check_edge(out: torch.Tensor, q, k, v, h: int, sk: int) -> None:
    if sk == 1:  # softmax over one key is exactly 1: the output is v, bit for bit
        assert torch.equal(out.cpu().to(v.dtype), v.cpu().expand_as(out)), "Sk = 1 must return v exactly"
    assert_within_lowp(out, q, k, v, h, None)
