"""python -m benchmarks.report: results files of benchmarks.run -> report.md + PNG plots.

    python -m benchmarks.report RESULTS.json [MORE.json ...] [--compare OTHER.json] [--out DIR]
    python -m benchmarks.report --readme README.md [--check]   # the README's "Measured" block

The report has one table per benchmark, each figure with its device and date, the rows a benchmark
could not produce here with the reason, and plots: latency breakdown per backend, images/s against
batch size, the end-to-end latency CDF, the UNet step per backend and size, attention speed-up per
shape (GPU). Published figures of other engines appear only for the device they were measured on,
apart from ours (benchmarks/anchors.py). `--compare` puts two runs side by side with ratios.
`--readme` regenerates the README block between the markers from the committed results: the newest
`full` run of each device (`--check`: exit 1 when the README differs, for CI).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks import RESULTS
from benchmarks.anchors import anchors_for
from benchmarks.schema import load

BEGIN, END = "<!-- measured:begin (python -m benchmarks.report --readme README.md) -->", "<!-- measured:end -->"
STAGES = ("clip_ms", "unet_ms", "vae_ms", "png_ms")  # the breakdown bars; unet = steps x step p50


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "–"
    digits = 3 if abs(v) < 1 else 2 if abs(v) < 10 else 1 if abs(v) < 1000 else 0
    s = f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return f"{s} {unit}".strip()


class Run:
    """One results file, indexed for lookups: value(bench, metric, **config)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.doc = load(self.path)
        self.meta = self.doc["run"]
        self.rows = [r for r in self.doc["rows"] if r.get("value") is not None]
        self.skipped = [r for r in self.doc["rows"] if r.get("value") is None]

    @property
    def label(self) -> str:
        return f"{self.meta['device']}, {self.meta['started'][:10]} ({self.meta['suite']}, {self.meta['env'].get('git')})"

    def select(self, bench: str, metric: str | None = None, **config: Any) -> list[dict]:
        return [r for r in self.rows if r["bench"] == bench and (metric is None or r["metric"] == metric)
                and all(r["config"].get(k) == v for k, v in config.items())]

    def value(self, bench: str, metric: str, **config: Any) -> float | None:
        rows = self.select(bench, metric, **config)
        return rows[0]["value"] if rows else None

    def configs(self, bench: str, *keys: str) -> list[tuple]:
        seen: dict[tuple, None] = {}
        for r in self.select(bench):
            seen.setdefault(tuple(r["config"].get(k) for k in keys), None)
        return list(seen)


# ---- tables ----

def pipeline_table(run: Run) -> list[str]:
    out = []
    for model, size, steps, sampler in run.configs("pipeline", "model", "size", "steps", "sampler"):
        c = {"model": model, "size": size}
        out += [f"**Pipeline** `{model}` {size}², {steps} steps {sampler}, batch 1 ({run.meta['device']}; "
                f"p50 / p99 over {_n(run, 'pipeline', 'e2e_ms_p50', **c)} runs):", "",
                "| backend | precision | tokenize ms | clip ms | UNet step ms | it/s | VAE ms | PNG ms | end-to-end ms "
                "| img/s b1 / b2 / b4 / b8 | peak memory |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (backend, precision) in run.configs("pipeline", "backend", "precision"):
            b = {**c, "backend": backend}
            if run.value("pipeline", "e2e_ms_p50", **b) is None:
                continue

            def pp(m: str, b: dict = b) -> str:
                return f"{fmt(run.value('pipeline', m + '_p50', **b))} / {fmt(run.value('pipeline', m + '_p99', **b))}"

            ips = " / ".join(fmt(run.value("pipeline", "images_per_s", **b, batch=n)) for n in (1, 2, 4, 8))
            mem = run.value("pipeline", "peak_rss_gib", **b) or run.value("pipeline", "peak_gpu_gib", **b)
            out.append(f"| {backend} | {precision} | {pp('tokenize_ms')} | {pp('clip_ms')} | {pp('unet_step_ms')} | "
                       f"{fmt(run.value('pipeline', 'unet_its', **b))} | {pp('vae_ms')} | {pp('png_ms')} | "
                       f"{pp('e2e_ms')} | {ips} | {fmt(mem, 'GiB')} |")
        out.append("")
    return out


def _n(run: Run, bench: str, metric: str, **config: Any) -> int | str:
    rows = run.select(bench, metric, **config)
    return rows[0].get("n", "?") if rows else "?"


def unet_table(run: Run) -> list[str]:
    if not run.select("unet_step"):
        return []
    modes = {r["config"]["model"]: r["config"].get("isolated", False) for r in run.select("unet_step")}
    how = "; ".join(f"`{m}`: " + ("each variant in its own process, one after the other (peak RSS: that "
                                   "process's)" if iso else "calls interleaved across variants in one process")
                    for m, iso in modes.items())
    out = [f"**UNet step**, batch 2 (one image with guidance), {how} ({run.meta['device']}):", "",
           "| model | size | backend | precision | ms p50 | ms p99 | vs reference | max abs err (of max) | peak RSS |",
           "|---|---|---|---|---|---|---|---|---|"]
    for model, size, backend, precision in run.configs("unet_step", "model", "size", "backend", "precision"):
        c = {"model": model, "size": size, "backend": backend, "precision": precision}
        ref = run.select("unet_step", "time_vs_ref", **c)
        out.append(f"| `{model}` | {size}² | {backend} | {precision} | {fmt(run.value('unet_step', 'unet_call_ms_p50', **c))}"
                   f" | {fmt(run.value('unet_step', 'unet_call_ms_p99', **c))} | "
                   f"{fmt(run.value('unet_step', 'time_vs_ref', **c))}× {ref[0]['config']['reference'] if ref else ''}"
                   f" | {fmt(run.value('unet_step', 'max_abs_err', **c))} "
                   f"({fmt(run.value('unet_step', 'ref_abs_max', **c))}) | "
                   f"{fmt(run.value('unet_step', 'peak_rss_gib', **c), 'GiB')} |")
    return out + [""]


def build_table(run: Run) -> list[str]:
    if not run.select("build"):
        return []
    out = [f"**Export and build** per component, each in a fresh process ({run.meta['device']}):", "",
           "| model | backend | component | export s | build s | peak RSS |", "|---|---|---|---|---|---|"]
    for model, backend, comp in run.configs("build", "model", "backend", "component"):
        c = {"model": model, "backend": backend, "component": comp}
        out.append(f"| `{model}` | {backend} | {comp} | {fmt(run.value('build', 'export_s', **c))} | "
                   f"{fmt(run.value('build', 'build_s', **c))} | {fmt(run.value('build', 'peak_rss_gib', **c), 'GiB')} |")
    return out + [""]


def attention_table(run: Run) -> list[str]:
    if not run.select("attention"):
        return []
    out = [f"**Attention** ({run.meta['device']}): ms per call", "",
           "| model | tokens × kv | heads × dim | impl | ms | TFLOP/s | speed-up vs best SDPA | max abs err |",
           "|---|---|---|---|---|---|---|---|"]
    for model, t, kv, h, d, impl in run.configs("attention", "model", "tokens", "kv_tokens", "heads", "head_dim",
                                                  "impl"):
        c = {"model": model, "tokens": t, "kv_tokens": kv, "heads": h, "head_dim": d, "impl": impl}
        out.append(f"| {model} | {t} × {kv} | {h} × {d} | {impl} | {fmt(run.value('attention', 'ms', **c))} | "
                   f"{fmt(run.value('attention', 'tflops', **c))} | "
                   f"{fmt(run.value('attention', 'speedup_vs_best_sdpa', **c))} | "
                   f"{fmt(run.value('attention', 'max_abs_err', **c))} |")
    return out + [""]


def continuous_table(run: Run) -> list[str]:
    rows = run.select("continuous_batching", "latency_ms_mean")
    if not rows:
        return []
    c0 = rows[0]["config"]
    cap = run.value("continuous_batching", "capacity_img_s")
    out = [f"**Request- vs step-level batching** (`{c0['model']}` {c0['size']}², steps {c0['steps_mix']}, max batch "
           f"{c0['max_batch']}, {c0['requests']} Poisson arrivals per level; 100% load = {fmt(cap, 'img/s')}; "
           f"{run.meta['device']}):", "",
           "| load | mode | mean ms | p50 ms | p99 ms | img/s | step / request: mean, p99, img/s |",
           "|---|---|---|---|---|---|---|"]
    for level, mode in run.configs("continuous_batching", "load", "mode"):
        if mode is None:
            continue
        c = {"load": level, "mode": mode}
        ratios = ""
        if mode == "step":
            ratios = ", ".join(fmt(run.value("continuous_batching", f"step_over_request_{m}", load=level, mode=None))
                               for m in ("latency_mean", "latency_p99", "img_s"))
        out.append(f"| {int(level * 100)}% | {mode} | {fmt(run.value('continuous_batching', 'latency_ms_mean', **c))} | "
                   f"{fmt(run.value('continuous_batching', 'latency_ms_p50', **c))} | "
                   f"{fmt(run.value('continuous_batching', 'latency_ms_p99', **c))} | "
                   f"{fmt(run.value('continuous_batching', 'images_per_s', **c))} | {ratios} |")
    return out + [""]


OWN_TABLES = ("pipeline", "unet_step", "attention", "build", "continuous_batching")


def misc_table(run: Run, compact: bool = False) -> list[str]:
    """Every other benchmark's rows (cold start, server load, quality, LoRA switch, export memory ...); `compact`
    (the README) keeps medians and headline figures: no p90/p99/mean rows, no per-phase load-test rows."""
    rows = [r for r in run.rows if r["bench"] not in OWN_TABLES]
    if compact:
        rows = [r for r in rows if not r["metric"].endswith(("_p90", "_p99", "_mean"))
                and not (r["bench"] == "serve_load" and "phase" in r["config"])]
    if not rows:
        return []
    out = [f"**Other figures** ({run.meta['device']}):", "", "| bench | config | metric | value |",
           "|---|---|---|---|"]
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        out.append(f"| {r['bench']} | {cfg} | {r['metric']} | {fmt(r['value'], r['unit'])} |")
    return out + [""]


def skipped_table(run: Run) -> list[str]:
    if not run.skipped:
        return []
    out = ["**Not measured on this device**, and why:", ""]
    for r in run.skipped:
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        out.append(f"- {r['bench']} ({cfg}): {r['skipped']}")
    return out + [""]


def anchor_lines(run: Run) -> list[str]:
    found = anchors_for(run.meta["device"])
    if not found:
        return []
    out = [f"**Published figures of other engines on {run.meta['device'].split()[-1]}** (theirs, not ours; for "
           "orientation only):", ""]
    out += [f"- {a.what}: {fmt(a.value, a.unit)}, `{a.model}` {a.size}² ({a.source})" for a in found]
    return out + [""]


def compare_table(a: Run, b: Run) -> list[str]:
    """Rows present in both runs, with b / a."""
    index = {(r["bench"], repr(sorted(r["config"].items())), r["metric"]): r for r in a.rows}
    out = [f"**Compare**: A = {a.label}; B = {b.label}", "", "| bench | config | metric | A | B | B / A |",
           "|---|---|---|---|---|---|"]
    for r in b.rows:
        o = index.get((r["bench"], repr(sorted(r["config"].items())), r["metric"]))
        if o is None:
            continue
        cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        ratio = r["value"] / o["value"] if o["value"] else None
        out.append(f"| {r['bench']} | {cfg} | {r['metric']} | {fmt(o['value'], o['unit'])} | "
                   f"{fmt(r['value'], r['unit'])} | {fmt(ratio)} |")
    return out + [""]


# ---- plots ----

def plots(run: Run, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name: str) -> None:
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    title = f"{run.meta['device']}, {run.meta['started'][:10]}"
    backends = [b for (b,) in run.configs("pipeline", "backend") if run.value("pipeline", "e2e_ms_p50", backend=b)]
    if backends:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        left = [0.0] * len(backends)
        for stage in STAGES:
            vals = []
            for b in backends:
                if stage == "unet_ms":
                    step = run.value("pipeline", "unet_step_ms_p50", backend=b) or 0
                    steps = run.select("pipeline", "unet_step_ms_p50", backend=b)[0]["config"]["steps"]
                    vals.append(step * steps)
                else:
                    vals.append(run.value("pipeline", stage + "_p50", backend=b) or 0)
            ax.barh(backends, vals, left=left, label=stage.removesuffix("_ms"))
            left = [x + v for x, v in zip(left, vals, strict=True)]
        ax.set_xlabel("ms (p50), batch 1")
        ax.set_title(f"latency breakdown: {title}", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "latency_breakdown")
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for b in backends:
            pts = sorted((r["config"]["batch"], r["value"]) for r in run.select("pipeline", "images_per_s", backend=b))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"throughput vs batch: {title}", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "throughput_vs_batch")
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for b in backends:
            rows = [r for r in run.select("pipeline", "e2e_ms_p50", backend=b) if r.get("samples")]
            if rows:
                xs = sorted(rows[0]["samples"])
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=b)
        for a in anchors_for(run.meta["device"]):
            if a.metric == "e2e_ms_p50":
                ax.axvline(a.value, ls="--", color="grey", lw=0.8, label=f"{a.what} ({a.source})")
        ax.set_xlabel("end-to-end ms")
        ax.set_ylabel("fraction of runs")
        ax.set_title(f"latency CDF: {title}", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "latency_cdf")
    unet = run.configs("unet_step", "model", "size", "backend", "precision")
    if unet:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = [f"{m} {s}² {b} {p}" for m, s, b, p in unet]
        vals = [run.value("unet_step", "unet_call_ms_p50", model=m, size=s, backend=b, precision=p) or 0
                for m, s, b, p in unet]
        ax.barh(labels, vals)
        ax.set_xscale("log")
        ax.set_xlabel("UNet call ms (p50), batch 2")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"UNet step: {title}", fontsize=9)
        save(fig, "unet_step")
    ours = run.select("attention", "speedup_vs_best_sdpa")
    if ours:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = [f"{r['config']['model']} {r['config']['tokens']}×{r['config']['kv_tokens']} d{r['config']['head_dim']}"
                  for r in ours]
        ax.barh(labels, [r["value"] for r in ours])
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("our kernel's speed-up over the fastest SDPA backend")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(f"attention: {title}", fontsize=9)
        save(fig, "attention_speedup")
    return made


def render(runs: list[Run], out: Path, compare: Run | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmark report", ""]
    for run in runs:
        env = run.meta["env"]
        lines += [f"## {run.label}", "", f"Source: `{run.path.name}`. Versions: " + ", ".join(
            f"{k} {env[k]}" for k in ("torch", "onnxruntime", "openvino", "tensorrt", "cuda", "driver") if env.get(k))
            + f"; CPU {env['cpu']} ({env['cores']} cores, {' '.join(env['cpu_flags'])}).", ""]
        for part in (pipeline_table, unet_table, attention_table, build_table, continuous_table, misc_table, anchor_lines,
                     skipped_table):
            lines += part(run)
        sub = out if len(runs) == 1 else out / run.path.stem
        sub.mkdir(parents=True, exist_ok=True)
        for p in plots(run, sub):
            lines.append(f"![{p.stem}]({p.relative_to(out).as_posix()})")
        lines.append("")
    if compare is not None:
        lines += compare_table(compare, runs[0])
    dest = out / "report.md"
    dest.write_text("\n".join(lines) + "\n")
    return dest


# ---- README ----

def readme_runs(results_dir: Path = RESULTS) -> list[Path]:
    """The `full` runs of each device's latest day among the committed results (schema-1 files only): a day's
    runs may each cover part of the suite (e.g. `--models tiny`, then `--models sd15`)."""
    runs: dict[str, list[tuple[str, Path]]] = {}
    for p in sorted(results_dir.glob("*.json")):
        try:
            doc = load(p)
        except ValueError:
            continue  # an older, per-script JSON shape
        if doc["run"]["suite"] == "full":
            runs.setdefault(doc["run"]["device"], []).append((doc["run"]["started"], p))
    out = []
    for found in runs.values():
        day = max(started for started, _ in found)[:10]
        out += [(started, p) for started, p in found if started[:10] == day]
    return [p for _, p in sorted(out)]


def readme_block(paths: list[Path], root: Path) -> str:
    lines = [BEGIN, ""]
    if not paths:
        lines.append("No `full` run committed yet.")
    for p in paths:
        run = Run(p)
        lines += [f"Run `{p.relative_to(root).as_posix()}`: {run.label}; report and plots in "
                  f"[{(p.parent / p.stem / 'report.md').relative_to(root).as_posix()}]"
                  f"({(p.parent / p.stem / 'report.md').relative_to(root).as_posix()}).", ""]
        lines += (pipeline_table(run) + unet_table(run) + build_table(run) + continuous_table(run)
                  + misc_table(run, compact=True) + skipped_table(run))
    return "\n".join(lines + [END])


def update_readme(readme: Path, check: bool, results_dir: Path = RESULTS) -> bool:
    """Rewrite (or, with `check`, compare) the README's measured block; True when it was already current."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no measured block: add the lines {BEGIN!r} and {END!r}")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = head + readme_block(readme_runs(results_dir), readme.resolve().parent) + tail
    if new == text:
        return True
    if not check:
        readme.write_text(new)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", type=Path)
    p.add_argument("--compare", type=Path, help="another results file: side by side with ratios")
    p.add_argument("--out", type=Path, help="report folder (default: beside the first results file, <stem>/)")
    p.add_argument("--readme", type=Path, help="regenerate this README's measured block")
    p.add_argument("--check", action="store_true", help="with --readme: exit 1 if the block is out of date")
    a = p.parse_args(argv)
    try:
        if a.readme:
            if not a.check:
                for path in readme_runs():
                    render([Run(path)], path.parent / path.stem)
            ok = update_readme(a.readme, a.check)
            if a.check and not ok:
                print(f"{a.readme}: the measured block differs from benchmarks/results; run "
                      f"python -m benchmarks.report --readme {a.readme}", file=sys.stderr)
                return 1
            print(f"{a.readme}: measured block {'current' if ok else 'rewritten'}")
            return 0
        if not a.results:
            p.error("give one or more results files, or --readme")
        runs = [Run(r) for r in a.results]
        dest = render(runs, a.out or a.results[0].parent / a.results[0].stem,
                      Run(a.compare) if a.compare else None)
    except ValueError as e:
        print(f"benchmarks.report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
