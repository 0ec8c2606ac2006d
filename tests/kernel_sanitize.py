"""Small launches of the fused attention kernel for compute-sanitizer (run by tests/gpu.sh):

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m tests.kernel_sanitize

Cases: head dims 40 / 80 / 160, float16 and bfloat16, (Sq, Sk) = (333, 77) and (77, 333) (partial query
and key tiles), B = 2, H = 2, the baked 1/sqrt(D) entry and the runtime-scale entry. Inputs are made
on the CPU and copied over, the output is copied back and compared with the fp32 reference on the CPU,
so our kernel is the only GPU kernel launched: every sanitizer report is about it. The caching
allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1, before the first CUDA allocation) so that each
tensor is its own allocation and memcheck sees an access one byte past q, k, v or out.

Exit status: 0 all results correct; 1 a result is wrong (the line names the case); 2 no CUDA GPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

HEAD_DIMS = (40, 80, 160)
SEQS = ((333, 77), (77, 333))
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TOLERANCE = {"float16": 1e-2, "bfloat16": 6e-2}  # max abs error vs fp32: catches garbage, not precision


def cases(head_dims: tuple[int, ...] = HEAD_DIMS) -> list[tuple[str, int, int, int, float | None]]:
    """(dtype, head_dim, seq_q, seq_k, scale) for every launch; scale None = the baked entry."""
    return [(dtype, d, sq, sk, scale) for dtype in DTYPES for d in head_dims for sq, sk in SEQS
            for scale in (None, 0.3 / math.sqrt(d))]


def run_case(dtype: str, head_dim: int, seq_q: int, seq_k: int, scale: float | None, batch: int = 2,
             heads: int = 2) -> float:
    """Launch one case through the torch op; the max abs error against the CPU fp32 reference."""
    from kernels.torch_op import attention_reference, fused_attention

    g = torch.Generator().manual_seed(head_dim * 7 + seq_q)
    e = heads * head_dim
    q, k, v = (torch.randn(batch, s, e, generator=g).to(DTYPES[dtype]) for s in (seq_q, seq_k, seq_k))
    out = fused_attention(q.cuda(), k.cuda(), v.cuda(), heads, scale).cpu()  # .cpu() synchronizes
    return (out.float() - attention_reference(q, k, v, heads, scale)).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.kernel_sanitize", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="comma list (default: 40,80,160)")
    args = ap.parse_args(argv)
    os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")  # read at the first CUDA allocation
    if not torch.cuda.is_available():
        print("kernel_sanitize: no CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    todo, wrong = cases(tuple(int(x) for x in args.head_dims.split(",") if x)), 0
    for dtype, d, sq, sk, scale in todo:
        err = run_case(dtype, d, sq, sk, scale)
        ok = err <= TOLERANCE[dtype]  # a NaN error is not <= anything
        wrong += not ok
        print(f"{'ok   ' if ok else 'WRONG'} {dtype} D={d} Sq={sq} Sk={sk} scale={'baked' if scale is None else f'{scale:.4f}'}"
              f" max_abs_err={err:.2e} (limit {TOLERANCE[dtype]:.0e})", flush=True)
    print(f"{len(todo) - wrong} cases ok, {wrong} wrong")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
