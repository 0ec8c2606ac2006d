"""Attention kernel benchmark: our fused kernel vs every available torch SDPA backend, one process.

    python -m benchmarks.attention [--dtype float16|bfloat16] [--shapes sd15,sd21] [--iters 50]

Shapes are the attention calls of the SD 1.5 and SD 2.1 UNets at 512x512 (64x64 latents), batch 2
(classifier-free guidance), self-attention (Sk = Sq) and cross-attention (Sk = 77 text tokens):
  SD 1.5: 8 heads, head dim 40 / 80 / 160 / 160 at 4096 / 1024 / 256 / 64 tokens
  SD 2.1: head dim 64, 5 / 10 / 20 / 20 heads at 4096 / 1024 / 256 / 64 tokens (+ 9216 tokens: 768x768)
Per row: ms (CUDA events, after warmup), TFLOP/s (4 * B * H * Sq * Sk * D flops), our speed-up over the
best SDPA backend, and the max abs error vs a float32 reference for ours and for each SDPA backend.
Writes benchmarks/results/attention-<device>-<date>.json and prints a markdown table. Exits non-zero
with a one-line message where there is no CUDA GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from benchmarks import save_result

TEXT_LEN = 77

# (model, tokens, heads, head_dim)
SHAPES = {
    "sd15": [("sd15", 4096, 8, 40), ("sd15", 1024, 8, 80), ("sd15", 256, 8, 160), ("sd15", 64, 8, 160)],
    "sd21": [("sd21", 9216, 5, 64), ("sd21", 4096, 5, 64), ("sd21", 1024, 10, 64), ("sd21", 256, 20, 64),
             ("sd21", 64, 20, 64)],
}


def _die(msg: str) -> NoReturn:
    print(f"benchmarks.attention: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _time_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def bench_row(model: str, seq_q: int, seq_k: int, heads: int, head_dim: int, batch: int, dtype: Any,
              warmup: int, iters: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from kernels.torch_op import attention_reference, fused_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    e = heads * head_dim
    q = torch.randn(batch, seq_q, e, device="cuda", dtype=dtype, generator=g)  # [B, Sq, H*D]
    k = torch.randn(batch, seq_k, e, device="cuda", dtype=dtype, generator=g)  # [B, Sk, H*D]
    v = torch.randn(batch, seq_k, e, device="cuda", dtype=dtype, generator=g)
    ref = attention_reference(q, k, v, heads)  # float32 [B, Sq, H*D]

    def heads_view(x: torch.Tensor) -> torch.Tensor:  # [B, S, H*D] -> [B, H, S, D] view, as diffusers does
        return x.view(batch, x.shape[1], heads, head_dim).transpose(1, 2)

    qh, kh, vh = heads_view(q), heads_view(k), heads_view(v)
    flops = 4.0 * batch * heads * seq_q * seq_k * head_dim
    row: dict[str, Any] = {"model": model, "kind": "self" if seq_k == seq_q else "cross", "batch": batch,
                           "heads": heads, "head_dim": head_dim, "seq_q": seq_q, "seq_k": seq_k,
                           "dtype": str(dtype).removeprefix("torch."), "backends": {}}

    def record(name: str, fn: Callable[[], torch.Tensor], to_packed: bool) -> None:
        try:
            out = fn()
            torch.cuda.synchronize()
        except Exception as exc:  # backend does not support this shape / dtype / GPU (or out of memory)
            row["backends"][name] = {"ok": False, "error": str(exc).splitlines()[0][:160]}
            return
        if to_packed:
            out = out.transpose(1, 2).reshape(batch, seq_q, e)
        err = (out.float() - ref).abs().max().item()
        ms = _time_ms(fn, warmup, iters)
        row["backends"][name] = {"ok": True, "ms": ms, "tflops": flops / ms / 1e9, "max_abs_err": err}

    record("ours", lambda: fused_attention(q, k, v, heads), to_packed=False)
    for name, backend in _sdpa_backends().items():
        def run(backend: Any = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qh, kh, vh)
        record(f"sdpa_{name}", run, to_packed=True)

    sdpa_ok = {n: r for n, r in row["backends"].items() if n.startswith("sdpa_") and r["ok"]}
    best = min(sdpa_ok, key=lambda n: sdpa_ok[n]["ms"]) if sdpa_ok else None
    row["best_sdpa"] = best
    ours = row["backends"]["ours"]
    row["speedup_vs_best_sdpa"] = sdpa_ok[best]["ms"] / ours["ms"] if best and ours["ok"] else None
    return row


def markdown(rows: list[dict[str, Any]], backends: list[str]) -> str:
    head = ["model", "kind", "B", "H", "D", "Sq", "Sk", "ours ms", "ours TFLOP/s", "ours err"]
    for b in backends:
        head += [f"{b} ms", f"{b} err"]
    head += ["best sdpa", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o = r["backends"]["ours"]
        cells = [r["model"], r["kind"], r["batch"], r["heads"], r["head_dim"], r["seq_q"], r["seq_k"]]
        cells += [f"{o['ms']:.3f}", f"{o['tflops']:.1f}", f"{o['max_abs_err']:.1e}"] if o["ok"] else ["fail", "", ""]
        for b in backends:
            x = r["backends"].get(b, {"ok": False})
            cells += [f"{x['ms']:.3f}", f"{x['max_abs_err']:.1e}"] if x["ok"] else ["n/a", ""]
        sp = r["speedup_vs_best_sdpa"]
        cells += [(r["best_sdpa"] or "-").removeprefix("sdpa_"), f"{sp:.2f}x" if sp else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--shapes", default="sd15,sd21", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        _die("torch is not installed")
    if not torch.cuda.is_available():
        _die("no CUDA GPU available (torch.cuda.is_available() is False); nothing to benchmark")
    from kernels import launcher

    try:
        launcher.load_module(torch.cuda.current_device())
    except (launcher.KernelUnavailable, launcher.CudaError) as exc:
        _die(f"our kernel is unavailable: {str(exc).splitlines()[0]}")

    dtype = getattr(torch, args.dtype)
    shapes = [s for key in args.shapes.split(",") for s in SHAPES[key.strip()]]
    rows = []
    for model, tokens, heads, head_dim in shapes:
        for seq_k in (tokens, TEXT_LEN):
            rows.append(bench_row(model, tokens, seq_k, heads, head_dim, args.batch, dtype, args.warmup, args.iters))
            o = rows[-1]["backends"]["ours"]
            print(f"  {model} Sq={tokens} Sk={seq_k} H={heads} D={head_dim}: "
                  + (f"{o['ms']:.3f} ms" if o["ok"] else f"failed: {o['error']}"), file=sys.stderr)

    device = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"device": device, "capability": list(torch.cuda.get_device_capability()),
              "date": now.strftime("%Y-%m-%d"), "time_utc": now.isoformat(timespec="seconds"),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "dtype": args.dtype, "flops_formula": "4*B*H*Sq*Sk*D", "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        out = args.out
    else:
        out = save_result(f"attention-{device}", result)
    backends = sorted({b for r in rows for b in r["backends"] if b != "ours"})
    print(f"\n{device}, torch {torch.__version__}, {args.dtype}, batch {args.batch}\n")
    print(markdown(rows, backends))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
