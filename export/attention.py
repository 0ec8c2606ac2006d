"""The single attention function used by the UNet and the VAE, and how it is written to ONNX.

`attention(q, k, v, num_heads, scale, mode=..., eager=...)` takes packed heads, q [B, Sq, H*D],
k/v [B, Sk, H*D], and returns [B, Sq, H*D]. With `mode=None` it runs eagerly: SDPA, or our fused kernel on
CUDA with `eager="kernel"`. While exporting it is emitted in one of three modes:

- `decomposed`: MatMul(Q*scale, K^T) -> Softmax -> MatMul(., V). Q is pre-scaled, the pattern
  TensorRT >= 8.6 fuses into one MHA kernel.
- `onnx`: the opset-23 `Attention` op (TensorRT >= 10.14 maps it to IAttention). Needs opset 23.
- `plugin`: one custom node per call for our kernel (kernels/contract.py defines it). Calls whose head
  dim has no specialised kernel fall back to `decomposed`, as do fp32 graphs (the kernel is fp16/bf16).

It is inserted into diffusers models through `EngineAttnProcessor`, never by patching graphs. The mode and
the eager implementation are the processor instance's own (no process-global state): `install(module, ...)`
sets them, `emission(module, mode)` switches one module to an export mode for the duration of its export,
`set_eager(module, impl)` picks the eager implementation of one loaded module. Two modules (a server
warming one up while serving another) never see each other's choice. The fp32 reference implementation
sits beside our kernel: kernels.torch_op.attention_reference.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from kernels import contract

MODES = ("decomposed", "onnx", "plugin")  # ONNX emission modes; None is eager execution
EAGER = ("sdpa", "kernel")  # eager implementations: torch SDPA, our fused kernel (CUDA fp16/bf16 only)


def _check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose from {', '.join(MODES)}")


def _check_eager(eager: str) -> None:
    if eager not in EAGER:
        raise ValueError(f"unknown eager attention {eager!r}; choose from {', '.join(EAGER)}")


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)  # [B, H, S, D]


def _packed(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)  # [B, S, H*D]


def _decomposed(q, k, v, num_heads: int, scale: float, upcast: bool) -> torch.Tensor:
    qh, kh, vh = (_heads(t, num_heads) for t in (q, k, v))
    if upcast:  # SD 2.x: scores in fp32 to avoid fp16 overflow
        qh, kh = qh.float(), kh.float()
    scores = (qh * scale) @ kh.transpose(-1, -2)  # [B, H, Sq, Sk], Q pre-scaled
    p = torch.softmax(scores, dim=-1).to(vh.dtype)
    return _packed(p @ vh)


def _onnx_attention(q, k, v, num_heads: int, scale: float) -> torch.Tensor:
    return torch.onnx.ops.attention(q, k, v, q_num_heads=num_heads, kv_num_heads=num_heads, scale=scale)[0]


def kernel_supported(q: torch.Tensor, num_heads: int) -> bool:
    """Our kernel serves this call: a specialised head dim and fp16/bf16."""
    d = q.shape[-1] // num_heads
    return d in contract.SUPPORTED_HEAD_DIMS and str(q.dtype).removeprefix("torch.") in contract.SUPPORTED_DTYPES


def plugin_supported(q: torch.Tensor, num_heads: int, scale: float) -> bool:
    """The plugin also bakes the softmax scale 1/sqrt(D)."""
    d = q.shape[-1] // num_heads
    return kernel_supported(q, num_heads) and math.isclose(scale, 1.0 / math.sqrt(d), rel_tol=1e-6)


def _plugin(q, k, v, num_heads: int) -> torch.Tensor:
    attrs = {
        contract.ATTR_NUM_HEADS: num_heads,
        contract.ATTR_HEAD_DIM: q.shape[-1] // num_heads,
        contract.ATTR_PLUGIN_NAMESPACE: contract.PLUGIN_NAMESPACE,
        contract.ATTR_PLUGIN_VERSION: contract.PLUGIN_VERSION,
    }
    op = contract.PLUGIN_ID
    out = torch.onnx.ops.symbolic(op, (q, k, v), attrs, dtype=q.dtype, shape=q.shape, version=1)
    # its stand-in output is made on the default device; tracing on the meta device (export/lean.py) needs it
    # beside q (an Identity in the graph, which the optimizer removes)
    return out if out.device == q.device else out.to(q.device)


def _eager(q, k, v, num_heads: int, scale: float, upcast: bool, eager: str) -> torch.Tensor:
    if eager == "kernel" and q.is_cuda and kernel_supported(q, num_heads):
        from kernels import torch_op  # registers torch.ops.sd_engine.fused_attention

        return torch_op.fused_attention(q, k, v, num_heads, scale)
    if upcast and q.dtype != torch.float32:
        return _decomposed(q, k, v, num_heads, scale, upcast=True)
    qh, kh, vh = (_heads(t, num_heads) for t in (q, k, v))
    return _packed(F.scaled_dot_product_attention(qh, kh, vh, scale=scale))


def attention(q, k, v, num_heads: int, scale: float | None = None, upcast: bool = False, *,
              mode: str | None = None, eager: str = "sdpa") -> torch.Tensor:
    """softmax(Q K^T * scale) V over packed heads: q [B, Sq, H*D], k/v [B, Sk, H*D] -> [B, Sq, H*D].
    `mode`: None runs eagerly (`eager` picks the implementation), else the ONNX emission mode (MODES)."""
    scale = 1.0 / math.sqrt(q.shape[-1] // num_heads) if scale is None else scale
    if mode is None:
        return _eager(q, k, v, num_heads, scale, upcast, eager)
    if mode == "onnx":
        return _onnx_attention(q, k, v, num_heads, scale)
    if mode == "plugin" and plugin_supported(q, num_heads, scale):
        return _plugin(q, k, v, num_heads)
    return _decomposed(q, k, v, num_heads, scale, upcast)


@dataclasses.dataclass(frozen=True)
class EngineAttnProcessor:
    """A diffusers attention processor that routes every attention call through `attention`, in its own
    `mode` (None: eager; else an ONNX emission mode) with its own eager implementation."""

    mode: str | None = None
    eager: str = "sdpa"

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        _check_eager(self.eager)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_scale=None, *args, **kwargs):
        image_tokens = None
        if isinstance(encoder_hidden_states, tuple):  # IP-Adapter (export/ip_adapter.py): (text, [image tokens])
            encoder_hidden_states, (image_tokens,) = encoder_hidden_states
        if attention_mask is not None:
            raise ValueError("attention masks are not supported by the engine's attention op")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise ValueError("q/k normalisation is not supported by the engine's attention op")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:  # VAE mid-block: [B, C, H, W] -> [B, H*W, C]
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # [B, S, H*D]
        out = attention(q, k, v, attn.heads, attn.scale, upcast=bool(attn.upcast_attention),
                        mode=self.mode, eager=self.eager)
        if image_tokens is not None:
            out = out + self._image_prompt(attn, q, image_tokens, ip_scale)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _image_prompt(self, attn, q: torch.Tensor, tokens: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """The IP-Adapter's term, as diffusers' IPAdapterAttnProcessor2_0: scale * attention over the image tokens
        with the adapter's own key/value projections. `tokens` [B, 1, T, C]; `scale` [B] per row (None: 1)."""
        tokens = tokens.flatten(1, 2)  # [B, T, C]
        k, v = attn.to_k_ip(tokens), attn.to_v_ip(tokens)  # [B, T, H*D]
        out = attention(q, k, v, attn.heads, attn.scale, upcast=bool(attn.upcast_attention), mode=self.mode,
                        eager=self.eager)  # [B, Sq, H*D]
        return out if scale is None else out * scale.to(out.dtype).view(-1, 1, 1)


def install(module: torch.nn.Module, mode: str | None = None, eager: str = "sdpa") -> torch.nn.Module:
    """Route every diffusers `Attention` in `module` (UNet, VAE) through the engine's op, in `mode` / `eager`."""
    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(EngineAttnProcessor(mode, eager))
    return module


def _replace(module: torch.nn.Module, **changes: str | None) -> dict[Any, EngineAttnProcessor]:
    """Give every engine processor inside `module` (wrappers included) `changes`; return the ones replaced,
    by their diffusers `Attention` block."""
    blocks: list[Any] = [m for m in module.modules() if isinstance(getattr(m, "processor", None), EngineAttnProcessor)]
    replaced = {block: block.processor for block in blocks}
    for block, proc in replaced.items():
        block.set_processor(dataclasses.replace(proc, **changes))
    return replaced


def set_eager(module: torch.nn.Module, impl: str) -> None:
    """Run `module`'s attention eagerly with `impl` ("sdpa" or "kernel"), this module only."""
    _check_eager(impl)
    _replace(module, eager=impl)


@contextmanager
def emission(module: torch.nn.Module, mode: str) -> Iterator[torch.nn.Module]:
    """Emit `module`'s attention in `mode` while exporting it; its processors are put back afterwards."""
    _check_mode(mode)
    previous = _replace(module, mode=mode)
    try:
        yield module
    finally:
        for block, proc in previous.items():
            block.set_processor(proc)
