"""GPU tests of the fused attention kernel (@pytest.mark.gpu; skipped with a reason without a CUDA GPU).

Correctness on the SD shapes in fp16/bf16 with poisoned outputs (error <= 2x that of plain low-precision
PyTorch against an fp32 reference), the edge cases (huge logits, Sk = 1, Sq = 1), bitwise determinism over
20 launches, non-contiguous / misaligned inputs, a busy non-default stream without host sync, the torch op,
CUDA-graph replay and torch.compile. The CPU side (build, emulator, op checks): tests/test_kernels.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.kernel_cases import DTYPES, EDGE_CASES, check_edge, edge_inputs, gpu, lowp_sdpa_err, needs_gpu

SD_SHAPES = [  # (Sq, H, D): SD 1.5 (8 heads, D = 40/80/160) and SD 2.x (D = 64, 5/10/20 heads)
    (4096, 8, 40), (1024, 8, 80), (256, 8, 160), (4096, 5, 64), (1024, 10, 64), (256, 20, 64),
]


def _gpu_case(dtype: torch.dtype, b: int, sq: int, sk: int, h: int, d: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, s, h * d, device="cuda", dtype=dtype, generator=g) for s in (sq, sk, sk)]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("sq,h,d", SD_SHAPES + [(77, 3, 128), (333, 2, 40)])
def test_gpu_correct_on_sd_shapes(dtype, cross, sq, h, d):
    from kernels.launcher import launch_attention
    from kernels.torch_op import attention_reference, fused_attention

    sk = 77 if cross else sq
    q, k, v = _gpu_case(DTYPES[dtype], 2, sq, sk, h, d)
    ref = attention_reference(q, k, v, h)
    lowp, _ = lowp_sdpa_err(q, k, v, h, None, ref)
    stream = torch.cuda.current_stream().cuda_stream
    for scale in (None, 1.0 / math.sqrt(d)):  # baked entry (TensorRT's) and the runtime-scale entry
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
        launch_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), batch=2, seq_q=sq, seq_k=sk,
                         num_heads=h, head_dim=d, dtype=dtype, stream=stream, scale=scale)
        torch.cuda.synchronize()
        assert not out.isnan().any()
        err = (out.float() - ref).abs().max().item()
        assert err <= 2 * lowp + 1e-5, (scale, err, lowp)
    op_err = (fused_attention(q, k, v, h).float() - ref).abs().max().item()
    assert op_err <= 2 * lowp + 1e-5, (op_err, lowp)


@gpu
@needs_gpu
def test_gpu_cuda_graph_replay():
    from kernels.torch_op import attention_reference, fused_attention

    q, k, v = _gpu_case(torch.float16, 2, 1024, 77, 8, 80)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (module load) outside capture
        fused_attention(q, k, v, 8)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_attention(q, k, v, 8)
    for seed in (1, 2):
        nq, nk, nv = _gpu_case(torch.float16, 2, 1024, 77, 8, 80, seed)
        for dst, src in ((q, nq), (k, nk), (v, nv)):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = attention_reference(nq, nk, nv, 8)
        lowp, _ = lowp_sdpa_err(nq, nk, nv, 8, None, ref)
        assert (out.float() - ref).abs().max().item() <= 2 * lowp + 1e-5


@gpu
@needs_gpu
def test_gpu_torch_compile_and_opcheck():
    from kernels.torch_op import fused_attention

    q, k, v = _gpu_case(torch.bfloat16, 2, 256, 77, 20, 64)
    eager = fused_attention(q, k, v, 20)
    compiled = torch.compile(lambda a, b, c: fused_attention(a, b, c, 20), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.sd_engine.fused_attention.default, (q, k, v, 20, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype,d,b,sq,sk,h,q_mult", [c[1:] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
def test_gpu_edge_cases(dtype, d, b, sq, sk, h, q_mult):
    """Huge logits (q x 30), Sk = 1 and Sq = 1, through the op (baked scale) and the runtime-scale entry."""
    from kernels.launcher import launch_attention
    from kernels.torch_op import fused_attention

    q, k, v = edge_inputs(dtype, d, b, sq, sk, h, q_mult, device="cuda")
    check_edge(fused_attention(q, k, v, h), q, k, v, h, sk)
    out = torch.full_like(q, float("nan"))
    launch_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), batch=b, seq_q=sq, seq_k=sk,
                     num_heads=h, head_dim=d, dtype=dtype, stream=torch.cuda.current_stream().cuda_stream,
                     scale=1.0 / math.sqrt(d))
    torch.cuda.synchronize()
    assert not out.isnan().any()
    check_edge(out, q, k, v, h, sk)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sq,sk,h,d", [(4096, 4096, 8, 40), (333, 77, 2, 160), (1024, 77, 10, 64)])
def test_gpu_bitwise_deterministic(dtype, sq, sk, h, d):
    """20 launches on the same inputs give the same bits (no atomics, no order-dependent reductions)."""
    from kernels.torch_op import fused_attention

    q, k, v = _gpu_case(DTYPES[dtype], 2, sq, sk, h, d)
    outs = [fused_attention(q, k, v, h) for _ in range(20)]
    torch.cuda.synchronize()
    differ = [i for i, o in enumerate(outs) if not torch.equal(o, outs[0])]
    assert differ == [], f"launches {differ} differ from the first"


@gpu
@needs_gpu
def test_gpu_noncontiguous_and_misaligned_inputs():
    """A strided slice of a fused qkv tensor, a batch-minor layout and a 2-byte-misaligned view give the
    same bits as contiguous inputs (the op copies them; the kernel itself needs 16-byte alignment)."""
    from kernels.torch_op import fused_attention

    b, sq, sk, h, d = 2, 333, 77, 4, 40
    e = h * d
    q, k, v = _gpu_case(torch.float16, b, sq, sk, h, d)
    expect = fused_attention(q, k, v, h)
    q_slice = torch.cat([q, q, q], dim=-1)[..., e:2 * e]  # [B, Sq, E] view with row stride 3E
    k_batch_minor = k.transpose(0, 1).contiguous().transpose(0, 1)
    flat = torch.empty(v.numel() + 1, dtype=v.dtype, device="cuda")
    v_misaligned = flat[1:].view_as(v)
    v_misaligned.copy_(v)
    assert not q_slice.is_contiguous() and not k_batch_minor.is_contiguous() and v_misaligned.data_ptr() % 16 == 2
    out = fused_attention(q_slice, k_batch_minor, v_misaligned, h)
    assert out.is_contiguous() and torch.equal(out, expect)


@gpu
@needs_gpu
def test_gpu_non_default_stream_without_synchronize():
    """The op enqueues on torch's current stream: on a busy side stream, with no host sync between
    writing the inputs, the launch and reading the result, the result is right. (A kernel launched on
    another stream would run during the sleep and read the NaN the inputs held before.)"""
    from kernels.torch_op import attention_reference, fused_attention

    b, sq, sk, h, d = 2, 1024, 77, 8, 80
    src = _gpu_case(torch.float16, b, sq, sk, h, d)
    ref = attention_reference(*src, h)
    bound = 2 * lowp_sdpa_err(*src, h, None, ref)[0] + 1e-5
    q, k, v = (torch.full_like(t, float("nan")) for t in src)
    torch.cuda.synchronize()  # set-up done: from here on only stream order
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of ms of spinning on the side stream
        for dst, val in zip((q, k, v), src, strict=True):
            dst.copy_(val)
        out = fused_attention(q, k, v, h)
        err = (out.float() - ref).abs().max()
    torch.cuda.current_stream().wait_stream(side)
    assert err.item() <= bound, (err.item(), bound)  # .item() runs on the current stream, after `side`
