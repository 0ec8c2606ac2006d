"""`torch.ops.sd_engine.fused_attention`: our CUDA flash-attention forward as a torch custom op,
with the pure-torch fp32 reference beside it (one documented op, its reference next to it).

    fused_attention(q, k, v, num_heads, scale=None) -> Tensor
        q [B, Sq, H*D], k/v [B, Sk, H*D]  (packed heads = [B, S, H, D] row-major), fp16 or bf16, CUDA
        returns [B, Sq, H*D] = softmax(scale * Q K^T) V per head, same dtype; scale defaults to 1/sqrt(D)
        D = (H*D) / num_heads must be one of contract.SUPPORTED_HEAD_DIMS; no mask, non-causal.

    attention_reference(q, k, v, num_heads, scale=None) -> Tensor   (float32, any device)

Schema: sd_engine::fused_attention(Tensor q, Tensor k, Tensor v, int num_heads, float scale) -> Tensor.
The fake (meta) implementation makes it usable under torch.compile; the CUDA implementation enqueues
the kernel on torch's current stream (so CUDA-graph capture records it) without any host sync.
Importing this module needs no GPU; calling the op without one raises KernelUnavailable naming what is
missing.
"""
from __future__ import annotations

import math

import torch

from kernels import contract
from kernels.launcher import KernelUnavailable, launch_attention

__all__ = ["fused_attention", "attention_reference", "KernelUnavailable"]

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                        scale: float | None = None) -> torch.Tensor:
    """softmax(scale * Q K^T) V in float32 over packed heads; returns float32 [B, Sq, H*D]."""
    b, sq, e = q.shape
    sk, d = k.shape[1], e // num_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh = q.float().reshape(b, sq, num_heads, d).transpose(1, 2)  # [B, H, Sq, D]
    kh = k.float().reshape(b, sk, num_heads, d).transpose(1, 2)  # [B, H, Sk, D]
    vh = v.float().reshape(b, sk, num_heads, d).transpose(1, 2)  # [B, H, Sk, D]
    p = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)  # [B, H, Sq, Sk]
    return (p @ vh).transpose(1, 2).reshape(b, sq, e)  # [B, Sq, H*D]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float) -> int:
    """Validate shapes/dtypes (works on fake tensors too); returns the head dim."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q, k, v of rank 3 [B, S, H*D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if num_heads <= 0 or q.shape[2] % num_heads:
        raise ValueError(f"hidden size {q.shape[2]} is not divisible by num_heads={num_heads}")
    d = q.shape[2] // num_heads
    if d not in contract.SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} has no kernel; supported: {contract.SUPPORTED_HEAD_DIMS}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be float16 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return d


def _why_no_gpu(t: torch.Tensor) -> str:
    if torch.version.cuda is None:
        return "this torch build has no CUDA support (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return f"the inputs are on {t.device}, not on a CUDA device"


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


_SCHEMA = "(Tensor q, Tensor k, Tensor v, int num_heads, float scale) -> Tensor"


@torch.library.custom_op(contract.TORCH_OP, mutates_args=(), schema=_SCHEMA)
def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    d = _check_inputs(q, k, v, num_heads, scale)
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        raise KernelUnavailable(
            f"{contract.TORCH_OP} runs only on CUDA tensors on an NVIDIA GPU: {_why_no_gpu(q)}. "
            "Use kernels.torch_op.attention_reference on the CPU."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = torch.empty_like(q)  # [B, Sq, H*D]
    b, sq, _ = q.shape
    if out.numel() == 0:
        return out
    baked = abs(scale - 1.0 / math.sqrt(d)) <= 1e-7 / math.sqrt(d)  # the TensorRT entry: 1/sqrt(D) built in
    with torch.cuda.device(q.device):
        launch_attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            batch=b, seq_q=sq, seq_k=k.shape[1], num_heads=num_heads, head_dim=d, dtype=_DTYPES[q.dtype],
            stream=torch.cuda.current_stream(q.device).cuda_stream, scale=None if baked else scale,
            device=q.device.index,
        )
    return out


@_fused_attention.register_fake
def _fused_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    _check_inputs(q, k, v, num_heads, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(scale * Q K^T) V with our CUDA kernel; see the module docstring for shapes and dtypes."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1] // num_heads)
    return torch.ops.sd_engine.fused_attention(q, k, v, num_heads, float(scale))
