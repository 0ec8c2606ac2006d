"""Attention kernel benchmark: our fused kernel vs torch SDPA (its default pick and every backend forced), one process.

    python -m benchmarks.attention [--dtype float16|bfloat16] [--shapes sd15,sd21] [--iters 50] [--no-graph]

Shapes are the attention calls of the SD 1.5 and SD 2.1 UNets at 512x512 (64x64 latents), batch 2
(classifier-free guidance), self-attention (Sk = Sq) and cross-attention (Sk = 77 text tokens):
  SD 1.5: 8 heads, head dim 40 / 80 / 160 / 160 at 4096 / 1024 / 256 / 64 tokens
  SD 2.1: head dim 64, 5 / 10 / 20 / 20 heads at 4096 / 1024 / 256 / 64 tokens (+ 9216 tokens: 768x768)
Implementations: `ours`, `sdpa_default` (what F.scaled_dot_product_attention picks with no context
manager; the rows name the backend it picked) and `sdpa_flash` / `sdpa_efficient` / `sdpa_cudnn` /
`sdpa_math` (each forced with torch.nn.attention.sdpa_kernel; one that refuses a shape is a skip row).
Timing: by default GRAPH_LAUNCHES calls are captured in one torch.cuda.CUDAGraph and replayed, so
Python and launch overhead does not dominate the small shapes (64 queries x 77 keys is a few
microseconds of GPU work); an implementation that cannot be captured is timed eagerly (rows say which).
Per implementation and shape: ms, TFLOP/s (4 * B * H * Sq * Sk * D flops) and the max abs error vs a
float32 reference; for ours also the speed-up over the fastest forced SDPA backend. The goal, ours
>= 1.3x the fastest SDPA on the SD 1.5 4096-token head-dim-40 self-attention row, is judged and recorded.

`measure(results, ...)` adds rows to a benchmarks.schema.Results (bench "attention"); where there is no
CUDA GPU it adds a skip row and returns. The CLI writes the rows to benchmarks/results/ (or --out) and
prints a markdown table; it exits 2 with a one-line message where there is no CUDA GPU.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.schema import Results

BENCH = "attention"
TEXT_LEN = 77
GRAPH_LAUNCHES = 20  # calls captured per CUDA graph
GOAL_SPEEDUP = 1.3
GOAL_ROW = {"model": "sd15", "tokens": 4096, "kv_tokens": 4096, "heads": 8, "head_dim": 40}
DTYPES = ("float16", "bfloat16")
RESULTS_DIR = Path(__file__).parent / "results"

# (model, tokens, heads, head_dim)
SHAPES = {
    "sd15": [("sd15", 4096, 8, 40), ("sd15", 1024, 8, 80), ("sd15", 256, 8, 160), ("sd15", 64, 8, 160)],
    "sd21": [("sd21", 9216, 5, 64), ("sd21", 4096, 5, 64), ("sd21", 1024, 10, 64), ("sd21", 256, 20, 64),
             ("sd21", 64, 20, 64)],
}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


class _Failed(Exception):
    """An implementation refused or failed a shape; the message is the skip reason."""


def check_options(dtype: str, shapes: Iterable[str], iters: int, batch: int = 2, warmup: int = 0) -> list[str]:
    """ValueError naming the bad value and the allowed ones; returns the shape groups as a list."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    items = [shapes] if isinstance(shapes, str) else list(shapes)
    groups = [name.strip() for item in items for name in item.split(",") if name.strip()]
    unknown = [s for s in groups if s not in SHAPES]
    if unknown or not groups:
        raise ValueError(f"shapes {unknown or groups} not among {tuple(SHAPES)}")
    for name, value, low in (("iters", iters, 1), ("batch", batch, 1), ("warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    return groups


def _time_eager(fn: Callable[[], Any], warmup: int, iters: int) -> float:
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


def _time_graph(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """ms per call: min(iters, GRAPH_LAUNCHES) calls captured in one CUDA graph, replayed until `iters`
    calls ran (after `warmup` calls' worth of replays). RuntimeError when the calls cannot be captured."""
    import torch

    launches = min(iters, GRAPH_LAUNCHES)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (lazy init, autotuning) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(launches):
                fn()
        reps = -(-iters // launches)
        for _ in range(max(1, -(-warmup // launches))):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / (reps * launches)
    finally:
        graph.reset()


def _time(fn: Callable[[], Any], warmup: int, iters: int, graph: bool) -> tuple[float, str]:
    """(ms per call, how it was timed)."""
    import torch

    if graph:
        try:
            return _time_graph(fn, warmup, iters), "cuda_graph"
        except RuntimeError as exc:  # not capturable: fall back to eager timing
            torch.cuda.synchronize()
            return _time_eager(fn, warmup, iters), f"eager (capture failed: {_first_line(exc)})"
    return _time_eager(fn, warmup, iters), "eager"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def sdpa_backends() -> dict[str, Any]:
    """Our short name -> torch.nn.attention.SDPBackend member, for the backends this torch knows."""
    from torch.nn.attention import SDPBackend

    return {k: getattr(SDPBackend, v) for k, v in SDPA_BACKENDS.items() if hasattr(SDPBackend, v)}


def default_sdpa_backend(q: Any, k: Any, v: Any) -> str:
    """The backend F.scaled_dot_product_attention picks for these [B, H, S, D] inputs with no context
    manager (torch's own dispatcher, torch._fused_sdp_choice), or "unknown" where it cannot be asked."""
    import torch
    from torch.nn.attention import SDPBackend

    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        return "unknown"
    try:
        picked = SDPBackend(int(choice(q, k, v)))
    except (RuntimeError, TypeError, ValueError):
        return "unknown"
    names = {member: short for short, member in sdpa_backends().items()}
    return names.get(picked, picked.name.lower())


def _implementations(q: Any, k: Any, v: Any, heads: int) -> dict[str, Callable[[], Any]]:
    """Name -> a call returning [B, Sq, H*D]; q/k/v are [B, S, H*D], SDPA gets [B, H, S, D] views (as diffusers)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from kernels.torch_op import fused_attention

    b, sq, e = q.shape

    def heads_view(x: Any) -> Any:
        return x.view(b, x.shape[1], heads, e // heads).transpose(1, 2)

    qh, kh, vh = heads_view(q), heads_view(k), heads_view(v)

    def packed(out: Any) -> Any:
        return out.transpose(1, 2).reshape(b, sq, e)

    impls: dict[str, Callable[[], Any]] = {"ours": lambda: fused_attention(q, k, v, heads)}
    impls["sdpa_default"] = lambda: packed(F.scaled_dot_product_attention(qh, kh, vh))
    for name, backend in sdpa_backends().items():
        def forced(backend: Any = backend) -> Any:
            with sdpa_kernel(backend):
                return packed(F.scaled_dot_product_attention(qh, kh, vh))
        impls[f"sdpa_{name}"] = forced
    return impls


def _run_impl(fn: Callable[[], Any], ref: Any, warmup: int, iters: int, graph: bool) -> dict[str, Any]:
    import torch

    try:
        out = fn()
        torch.cuda.synchronize()
        err = (out.float() - ref).abs().max().item()
        del out
        ms, timing = _time(fn, warmup, iters, graph)
    except RuntimeError as exc:  # backend refuses this shape / dtype / GPU, or out of memory
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        raise _Failed(_first_line(exc)) from exc
    return {"ms": ms, "timing": timing, "max_abs_err": err}


def measure_shape(results: Results, model: str, tokens: int, kv_tokens: int, heads: int, head_dim: int,
                  dtype: str, *, batch: int = 2, warmup: int = 10, iters: int = 50, graph: bool = True,
                  ours_unavailable: str | None = None, device: str = "cuda") -> float | None:
    """Rows for one shape (every implementation); returns ours' speed-up over the fastest SDPA, or None."""
    import torch

    from kernels.torch_op import attention_reference

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, s, heads * head_dim, device=device, dtype=getattr(torch, dtype), generator=g)
               for s in (tokens, kv_tokens, kv_tokens))  # [B, S, H*D]
    ref = attention_reference(q, k, v, heads)  # float32 [B, Sq, H*D]
    flops = 4.0 * batch * heads * tokens * kv_tokens * head_dim
    base = {"model": model, "tokens": tokens, "kv_tokens": kv_tokens, "heads": heads, "head_dim": head_dim, "dtype": dtype}
    picked = default_sdpa_backend(*(x.view(batch, x.shape[1], heads, head_dim).transpose(1, 2) for x in (q, k, v)))
    timings: dict[str, float] = {}
    for impl, fn in _implementations(q, k, v, heads).items():
        config = {**base, "impl": impl}
        extra: dict[str, Any] = {"batch": batch, "iters": iters}
        if impl == "sdpa_default":
            extra["sdpa_backend"] = picked
        if impl == "ours" and ours_unavailable:
            results.skip(BENCH, config, ours_unavailable)
            continue
        try:
            r = _run_impl(fn, ref, warmup, iters, graph)
        except _Failed as exc:
            results.skip(BENCH, config, str(exc))
            continue
        timings[impl] = r["ms"]
        results.add(BENCH, config, "ms", r["ms"], "ms", timing=r["timing"], **extra)
        results.add(BENCH, config, "tflops", flops / r["ms"] / 1e9, "TFLOP/s", **extra)
        results.add(BENCH, config, "max_abs_err", r["max_abs_err"], "abs", **extra)
    sdpa = {n: ms for n, ms in timings.items() if n.startswith("sdpa_") and n != "sdpa_default"}  # forced backends
    if "ours" not in timings or not sdpa:
        return None
    best = min(sdpa, key=sdpa.__getitem__)
    speedup = sdpa[best] / timings["ours"]
    results.add(BENCH, {**base, "impl": "ours"}, "speedup_vs_best_sdpa", speedup, "x", best_sdpa=best, batch=batch)
    return speedup


def _ours_unavailable() -> str | None:
    """None when our kernel loads on the current GPU, else why not (one line)."""
    import torch

    from kernels import launcher

    try:
        launcher.load_module(torch.cuda.current_device())
    except (launcher.KernelUnavailable, launcher.CudaError) as exc:
        return f"our kernel is unavailable: {_first_line(exc)}"
    return None


def judge_goal(results: Results, dtype: str, speedup: float | None, reason: str = "") -> None:
    """Record whether ours reaches GOAL_SPEEDUP x the fastest SDPA on the goal row (1.0 met, 0.0 not)."""
    config = {**GOAL_ROW, "dtype": dtype, "impl": "ours"}
    if speedup is None:
        results.skip(BENCH, config, reason or "the goal row was not measured (ours or every SDPA failed)")
        return
    results.add(BENCH, config, "speedup_goal_met", float(speedup >= GOAL_SPEEDUP), "bool", goal=GOAL_SPEEDUP,
                speedup=speedup)


def measure(results: Results, *, dtype: str = "float16", shapes: Iterable[str] = ("sd15", "sd21"), iters: int = 50,
            graph: bool = True, batch: int = 2, warmup: int = 10) -> None:
    """Add the attention rows (bench "attention") for the shape groups to `results`; a skip row where
    there is no CUDA GPU."""
    groups = check_options(dtype, shapes, iters, batch, warmup)
    import torch

    if not torch.cuda.is_available():
        results.skip(BENCH, {"shapes": ",".join(groups), "dtype": dtype}, "no CUDA GPU")
        return
    ours_unavailable = _ours_unavailable()
    goal_speedup: float | None = None
    for model, tokens, heads, head_dim in [s for grp in groups for s in SHAPES[grp]]:
        for kv_tokens in (tokens, TEXT_LEN):
            sp = measure_shape(results, model, tokens, kv_tokens, heads, head_dim, dtype, batch=batch,
                               warmup=warmup, iters=iters, graph=graph, ours_unavailable=ours_unavailable)
            if {"model": model, "tokens": tokens, "kv_tokens": kv_tokens, "heads": heads, "head_dim": head_dim} == GOAL_ROW:
                goal_speedup = sp
            print(f"  {model} Sq={tokens} Sk={kv_tokens} H={heads} D={head_dim}: "
                  + (f"ours {sp:.2f}x the fastest SDPA" if sp else "no speed-up figure"), file=sys.stderr)
    if "sd15" in groups:
        judge_goal(results, dtype, goal_speedup, ours_unavailable or "")


# --------------------------------------------------------------------------------------------- report
def _cell(rows: dict[tuple, dict[str, Any]], key: tuple, metric: str, fmt: str) -> str:
    r = rows.get((*key, metric))
    return format(r["value"], fmt) if r else "n/a"


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the attention rows: one line per shape, ms and error per implementation."""
    rows = [r for r in rows if r["bench"] == BENCH and r.get("value") is not None and "tokens" in r["config"]]
    shape_keys = ("model", "tokens", "kv_tokens", "heads", "head_dim", "dtype")
    shapes = list(dict.fromkeys(tuple(r["config"][k] for k in shape_keys) for r in rows if r["metric"] == "ms"))
    impls = list(dict.fromkeys(r["config"]["impl"] for r in rows if r["metric"] == "ms"))
    by = {(*(r["config"][k] for k in shape_keys), r["config"]["impl"], r["metric"]): r for r in rows}
    head = ["model", "Sq", "Sk", "H", "D"] + [f"{i} ms" for i in impls] + ["ours err", "default pick", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in shapes:
        picked = by.get((*s, "sdpa_default", "ms"), {}).get("sdpa_backend", "-")
        cells = [s[0], s[1], s[2], s[3], s[4]] + [_cell(by, (*s, i), "ms", ".4f") for i in impls]
        sp = by.get((*s, "ours", "speedup_vs_best_sdpa"))
        cells += [_cell(by, (*s, "ours"), "max_abs_err", ".1e"), picked,
                  f"{sp['value']:.2f}x vs {sp['best_sdpa'].removeprefix('sdpa_')}" if sp else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def goal_line(rows: list[dict[str, Any]]) -> str | None:
    for r in rows:
        if r["bench"] == BENCH and r["metric"] == "speedup_goal_met":
            verdict = "met" if r["value"] else "NOT met"
            return (f"goal: ours >= {GOAL_SPEEDUP}x the fastest SDPA on sd15 4096x4096 tokens, head dim 40, "
                    f"{r['config']['dtype']}: {verdict} ({r['speedup']:.2f}x)")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--dtype", default="float16", choices=list(DTYPES))
    ap.add_argument("--shapes", default="sd15,sd21", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--no-graph", action="store_true", help="time eager calls instead of CUDA-graph replays")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default: benchmarks/results)")
    args = ap.parse_args(argv)
    try:
        check_options(args.dtype, args.shapes, args.iters, args.batch, args.warmup)
    except ValueError as exc:
        ap.error(str(exc))
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.attention: no CUDA GPU (torch.cuda.is_available() is False); nothing to benchmark",
              file=sys.stderr)
        return 2
    results = Results(device="cuda", suite=BENCH)
    measure(results, dtype=args.dtype, shapes=args.shapes, iters=args.iters, graph=not args.no_graph,
            batch=args.batch, warmup=args.warmup)
    out = results.write(args.out)
    print(f"\n{results.device_name}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, "
          f"{'CUDA-graph' if not args.no_graph else 'eager'} timing\n")
    print(table(results.rows))
    for r in results.rows:
        if r.get("skipped"):
            print(f"skipped {r['config']}: {r['skipped']}")
    if line := goal_line(results.rows):
        print("\n" + line)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
