"""Peers on this CPU: images/s of other ways to run the same model against ours, same size, steps, sampler and guidance.

    python -m benchmarks.peers [--model sd15] [--size 256] [--steps 20] [--guidance 7.5] [--rounds 2]
                               [--contestants NAME,...] [--work DIR] [--timeout-s 1800] [--no-keep-images]
                               [--keep-onnx] [--rebuild] [--prepare-only]
    python -m benchmarks.run --suite peers [the same options]

One model for all: the preset's seeded random weights (`export.models.materialize_preset`, in $SD_ENGINE_CACHE) as a
diffusers folder and, for tools that read the original SD layout, as one fp16 `.safetensors` single-file checkpoint
(tests/ldm_layout.py's writer, the inverse of the conversion export/single_file.py runs; under --work).
Contestants (`CONTESTANTS`; a peer not installed or failing gets a skipped row with the reason, never none):

    diffusers-fp32 / -bf16          StableDiffusionPipeline, eager torch, EulerDiscreteScheduler
    diffusers-bf16-deepcache        the same with DeepCache's DeepCacheSDHelper (cache_interval 3, branch 0)
    optimum-openvino-fp32 / -bf16   optimum-intel's OVStableDiffusionPipeline (exported once in a process of its
                                    own), reshaped to the static size as its docs advise, INFERENCE_PRECISION_HINT
    sdcpp-f16 / -q8_0               stable-diffusion.cpp (stable-diffusion-cpp-python) on the single-file checkpoint,
                                    weight type f16 / q8_0, sample_method euler
    ours-openvino-fp32 / -bf16      python -m engine.build --backend openvino --precision fp32 / bf16, then
                                    engine.pipeline.Pipeline, sampler euler
    ours-openvino-bf16-cached       the build with --cache-branch 0, run with cache_interval 3

Every contestant runs in a process of its own (benchmarks/peer_children.py; a process that has just exported with
torch runs slower): load, one warm-up image (2 steps, same size), then the timed image(s), seed 0. Rounds are
interleaved: round 1 runs every contestant once in order, round 2 again in reverse order, ...; the best round counts. Wall time around the library's
one generate call (text encoding, denoising, decoding; no file writing). Rows (bench `peers`, one config per
contestant): `seconds_per_image`, `images_per_s`, `load_s`, `peak_rss_gib`; for ours `ratio_to_best_peer` (images/s
over the fastest peer's, `peer` names it), `ratio_to_best_same_compute_peer` (full compute against the fastest
full-compute peer, feature caching against the fastest caching peer) and `ratio_to_best_same_precision_peer` (of
those, the same precision: fp32 against fp32, bf16 against bf16); for each reduced variant (lower
precision, quantized weights, feature caching) `psnr_db`, `max_abs_px`, `mean_abs_px` of its seed-0 image against
its own full-compute counterpart's (config `reference`). The seed-0 images (PNG) are kept beside the results file
(<stamp>-peers-<cpu>/) unless --no-keep-images. Writes benchmarks/results/<stamp>-peers-<cpu>.json.

Disk: our three engine sets are built under --work; each build's ONNX copies (the engine dir's onnx/, which the built
OpenVINO engines do not read; the export store keeps them) are removed afterwards unless --keep-onnx (sd15: ~4 GB
per set instead of ~8), and a marker records the commit each set was built from, so a second run does not convert
again (--rebuild does). `--prepare-only` prepares and builds without measuring: build while the machine is busy,
measure when it is quiet.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import RESULTS

BENCH = "peers"
PROMPT = "a photograph of an astronaut riding a horse"
WARMUP_STEPS = 2
CACHE_BRANCH = 0
CACHE_INTERVAL = 3
KINDS = ("diffusers", "optimum", "sdcpp", "ours")
DISTS = {"diffusers": ("diffusers", "torch"), "optimum": ("optimum-intel", "optimum", "openvino"),
         "sdcpp": ("stable-diffusion-cpp-python",), "ours": ("openvino",)}
# what a user runs to get each peer (the reason rows name it when it is missing)
INSTALL = {"diffusers": "pip install diffusers", "optimum": 'pip install "optimum-intel[openvino]"',
           "sdcpp": 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install stable-diffusion-cpp-python'}
SDCPP_MODULE = "stable_diffusion_cpp"
# optimum-intel pins transformers below what the engine runs with (found 2026-12-05: optimum-intel 2.2.0, the newest,
# requires transformers >=4.51,<5.6, so pip would replace transformers 5.23 and torch; installed without its
# dependencies it fails to import: `VisionRotaryEmbedding` is gone from transformers' qwen2_vl). Said in its skip row.
OPTIMUM_TRANSFORMERS_CAP = (5, 6)


@dataclass(frozen=True)
class Contestant:
    name: str
    kind: str  # one of KINDS
    precision: str  # fp32 | bf16 (compute), f16 | q8_0 (stable-diffusion.cpp's weight types)
    cache_interval: int = 1  # > 1: feature caching (DeepCache), a full UNet step every N steps, branch CACHE_BRANCH
    reference: tuple[str, ...] = ()  # the full-compute counterparts its seed-0 image is compared with (PSNR)

    @property
    def ours(self) -> bool:
        return self.kind == "ours"

    @property
    def cached(self) -> bool:
        return self.cache_interval > 1


CONTESTANTS: dict[str, Contestant] = {c.name: c for c in (
    Contestant("diffusers-fp32", "diffusers", "fp32"),
    Contestant("diffusers-bf16", "diffusers", "bf16", reference=("diffusers-fp32",)),
    Contestant("diffusers-bf16-deepcache", "diffusers", "bf16", CACHE_INTERVAL,
               reference=("diffusers-bf16", "diffusers-fp32")),
    Contestant("optimum-openvino-fp32", "optimum", "fp32"),
    Contestant("optimum-openvino-bf16", "optimum", "bf16", reference=("optimum-openvino-fp32",)),
    Contestant("sdcpp-f16", "sdcpp", "f16"),
    Contestant("sdcpp-q8_0", "sdcpp", "q8_0", reference=("sdcpp-f16",)),
    Contestant("ours-openvino-fp32", "ours", "fp32"),
    Contestant("ours-openvino-bf16", "ours", "bf16", reference=("ours-openvino-fp32",)),
    Contestant("ours-openvino-bf16-cached", "ours", "bf16", CACHE_INTERVAL,
               reference=("ours-openvino-bf16", "ours-openvino-fp32")),
)}


# ---------------------------------------------------------------- pure parts (tests/test_peers_bench.py)

def peers_argv(argv: list[str]) -> list[str] | None:
    """benchmarks.run's arguments -> this module's when they ask for `--suite peers` (the suite's name dropped),
    else None."""
    for i, arg in enumerate(argv):
        if arg == "--suite=peers":
            return argv[:i] + argv[i + 1:]
        if arg == "--suite" and i + 1 < len(argv) and argv[i + 1] == "peers":
            return argv[:i] + argv[i + 2:]
    return None


def parse_contestants(text: str | None) -> list[Contestant]:
    """`a,b,c` -> those contestants in CONTESTANTS' order; None or "all" -> all. ValueError names unknown ones."""
    if text is None or text == "all":
        return list(CONTESTANTS.values())
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown or not names:
        raise ValueError(f"unknown contestant(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose among {', '.join(CONTESTANTS)}")
    return [c for c in CONTESTANTS.values() if c.name in names]


def schedule(names: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, contestant) in run order: every round runs each once, odd rounds in reverse (no contestant always
    runs right after the same one, or always first)."""
    return [(r, n) for r in range(rounds) for n in (names if r % 2 == 0 else names[::-1])]


def psnr(a: Any, b: Any) -> dict[str, float]:
    """PSNR (dB, 8-bit peak; inf when equal), max and mean |a - b| in pixel levels of two uint8 images."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images of different shapes {x.shape} and {y.shape}")
    diff = np.abs(x - y)
    mse = float((diff ** 2).mean())
    return {"psnr_db": math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse),
            "max_abs_px": float(diff.max()), "mean_abs_px": float(diff.mean())}


def ratios(ips: dict[str, float]) -> dict[str, dict[str, Any]]:
    """For each of ours measured: images/s over the fastest peer's (`ratio_to_best_peer`, `best_peer`), over the
    fastest peer of the same compute (`ratio_to_best_same_compute_peer`, `best_same_compute_peer`: full compute
    against full-compute peers, feature caching against caching peers) and over the fastest of those with the same
    precision (`ratio_to_best_same_precision_peer`: fp32 against fp32, bf16 against bf16). Absent where no such peer
    was measured."""
    peers = {n: v for n, v in ips.items() if not CONTESTANTS[n].ours}
    out: dict[str, dict[str, Any]] = {}
    for name, v in ips.items():
        c = CONTESTANTS[name]
        if not c.ours:
            continue
        row: dict[str, Any] = {}
        if peers:
            best = max(peers, key=lambda n: peers[n])
            row.update(ratio_to_best_peer=v / peers[best], best_peer=best)
        same = {n: p for n, p in peers.items() if CONTESTANTS[n].cached == c.cached}
        if same:
            best = max(same, key=lambda n: same[n])
            row.update(ratio_to_best_same_compute_peer=v / same[best], best_same_compute_peer=best)
        like = {n: p for n, p in same.items() if CONTESTANTS[n].precision == c.precision}
        if like:
            best = max(like, key=lambda n: like[n])
            row.update(ratio_to_best_same_precision_peer=v / like[best], best_same_precision_peer=best)
        out[name] = row
    return out


def tail(text: str, lines: int = 3, chars: int = 600) -> str:
    """A failed process's output as one line (a skipped row's reason): the lines that say error / failed (a library's
    log), then its last lines, traceback frames and their source lines left out."""
    kept = [line.strip() for line in text.strip().splitlines()
            if line.strip() and not line.startswith("  ") and not line.strip().startswith("^")
            and not line.startswith("Traceback")]
    flagged = [line for line in kept[:-lines] if re.search(r"error|failed|cannot|unsupported", line, re.I)]
    return " | ".join(flagged[-2:] + kept[-lines:])[-chars:]


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def config_of(c: Contestant, a: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {"contestant": c.name, "engine": c.kind, "precision": c.precision, "model": a.model,
                           "size": a.size, "steps": a.steps, "sampler": "euler", "guidance": a.guidance, "batch": 1,
                           "cache_interval": c.cache_interval}
    if c.cached:
        cfg["cache_branch"] = CACHE_BRANCH
    cfg["versions"] = {d: version(d) for d in DISTS[c.kind] + (("DeepCache",) if c.kind == "diffusers" and c.cached
                                                                else ())}
    return cfg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="sd15", help="preset (export/presets.py); default sd15")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256; e.g. 512)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best counts")
    p.add_argument("--images", type=int, default=1, help="timed images per contestant per round")
    p.add_argument("--contestants", default=None, help=f"comma separated (default all): {','.join(CONTESTANTS)}")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sd-peers",
                   help="scratch folder: checkpoint, engines, exports, images (default %(default)s)")
    p.add_argument("--timeout-s", type=float, default=1800, help="per child process (load + warm-up + images)")
    p.add_argument("--build-timeout-s", type=float, default=3600, help="per build / export step")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default %(default)s)")
    p.add_argument("--no-keep-images", dest="keep_images", action="store_false",
                   help="do not copy the seed-0 images beside the results file")
    p.add_argument("--keep-onnx", action="store_true",
                   help="keep our engine dirs' ONNX copies after building (default: removed, to save disk)")
    p.add_argument("--rebuild", action="store_true", help="build our engines again even where built before")
    p.add_argument("--prepare-only", action="store_true",
                   help="prepare the model files and build our engines, measure nothing (then run again on a quiet "
                        "machine)")
    a = p.parse_args(argv)
    if a.size <= 0 or a.size % 8 or a.steps < 1 or a.rounds < 1 or a.images < 1:
        p.error("--size must be a positive multiple of 8; --steps, --rounds, --images at least 1")
    try:
        a.chosen = parse_contestants(a.contestants)
    except ValueError as e:
        p.error(str(e))
    return a


# ---------------------------------------------------------------- the parent: prepare, build, run, write

@dataclass
class Outcome:
    seconds: list[float] = field(default_factory=list)  # the best of each round's images, per round
    load_s: list[float] = field(default_factory=list)
    peak_rss_gib: float = 0.0
    what: str = ""
    image: Path | None = None
    failed: str | None = None  # why it has no (further) figure


def _python(args: list[str], timeout: float, log: Path | None = None) -> tuple[int, str, str]:
    """Run `python args` here (the repo root); (exit code, stdout, stderr); a timeout is exit code 124."""
    try:
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                           cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return 124, out, err + f"\ntimed out after {timeout:.0f} s"
    if log is not None:
        log.write_text(f"$ python {' '.join(args)}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p.returncode, p.stdout, p.stderr


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            got = json.loads(line)
        except ValueError:
            continue
        if isinstance(got, dict):
            return got
    return None


def _missing(c: Contestant) -> str | None:
    """Why a peer cannot run here before trying it (its package is not installed), else None."""
    import importlib.util

    module = {"diffusers": "diffusers", "optimum": "optimum.intel", "sdcpp": SDCPP_MODULE}.get(c.kind)
    if c.kind == "diffusers" and c.cached and importlib.util.find_spec("DeepCache") is None:
        return "DeepCache is not installed (pip install DeepCache)"
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # optimum.intel: the `optimum` parent itself is missing
        found = False
    if found:
        return None
    why = f"{module} is not installed ({INSTALL[c.kind]})"
    tv = version("transformers") or "0"
    if c.kind == "optimum" and tuple(int(x) for x in re.findall(r"\d+", tv)[:2]) >= OPTIMUM_TRANSFORMERS_CAP:
        why += (f"; optimum-intel 2.2.0 (the newest when this was written) requires transformers <5.6, so pip would "
                f"replace transformers {tv} (and torch {version('torch')}); without its dependencies it fails to "
                "import with this transformers")
    return why


def weights_gib(folder: Path) -> float:
    """The size of a diffusers folder's weight files, GiB."""
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**30


def _build_ours(c: Contestant, a: argparse.Namespace, engine_dir: Path, folder: Path) -> str | None:
    """python -m engine.build for one of ours (cached by the engine); the failure reason, or None. Unless --keep-onnx,
    the engine dir's ONNX copies (onnx/: the build's input, which the built OpenVINO engines do not read; the export
    store in $SD_ENGINE_CACHE keeps them) are removed after the build: three sd15 engine sets with them take ~25 GB."""
    from benchmarks.schema import git_commit

    args = ["-m", "engine.build", "--model", a.model, "--backend", "openvino", "--precision", c.precision,
            "--engine-dir", str(engine_dir)]
    if c.cached:
        args += ["--cache-branch", str(CACHE_BRANCH)]
    # a pruned engine dir makes engine.build fetch and convert again: the marker says it was built from this commit
    marker = engine_dir / "peers-build.json"
    stamp = {"args": args, "commit": (git_commit() or "").removesuffix("+dirty"), "folder": str(folder)}
    if not a.rebuild and not a.keep_onnx and marker.is_file() and json.loads(marker.read_text()) == stamp:
        print(f"   {c.name}: built before from this commit ({marker}; --rebuild builds again)", flush=True)
        return None
    need = 2.2 * weights_gib(folder)  # the ONNX copy and the IR, both fp32, while the build runs
    engine_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(engine_dir).free / 2**30
    if free < need:
        return f"not built: {free:.1f} GiB free under {engine_dir}, the build needs about {need:.1f} GiB"
    marker.unlink(missing_ok=True)
    print(f"   build {c.name}: python {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    rc, out, err = _python(args, a.build_timeout_s, a.work / "logs" / f"build-{c.name}.log")
    print(f"   {time.perf_counter() - t0:.0f} s, exit {rc}", flush=True)
    if rc != 0:
        return f"engine.build exit {rc}: {tail(err or out)}"
    if not a.keep_onnx:
        for onnx in engine_dir.glob("*/onnx"):
            shutil.rmtree(onnx, ignore_errors=True)
        marker.write_text(json.dumps(stamp))
    return None


def measure(a: argparse.Namespace) -> Path | None:
    from benchmarks.schema import Results

    results = Results(device="cpu", suite=BENCH)
    a.work.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "images", "engines"):
        (a.work / sub).mkdir(exist_ok=True)
    chosen: list[Contestant] = a.chosen
    outcomes = {c.name: Outcome() for c in chosen}
    for c in chosen:
        outcomes[c.name].failed = _missing(c)
    live = [c for c in chosen if outcomes[c.name].failed is None]

    kinds = {c.kind for c in live}
    spec = {"model": a.model, "work": str(a.work), "checkpoint": "sdcpp" in kinds, "optimum": "optimum" in kinds}
    print(f"== prepare {a.model} (folder{', single-file checkpoint' if spec['checkpoint'] else ''}"
          f"{', optimum-intel export' if spec['optimum'] else ''})", flush=True)
    rc, out, err = _python(["-m", "benchmarks.peer_children", "--prepare", json.dumps(spec)], a.build_timeout_s,
                           a.work / "logs" / "prepare.log")
    prepared = _last_json(out) if rc == 0 else None
    if prepared is None:
        raise RuntimeError(f"preparing {a.model} failed (exit {rc}): {tail(err or out)}")
    for c in live:
        reason = {"sdcpp": prepared.get("checkpoint_error"), "optimum": prepared.get("optimum_error")}.get(c.kind)
        if reason:
            outcomes[c.name].failed = reason
    engine_dirs = {}
    for c in live:
        if c.ours and outcomes[c.name].failed is None:
            engine_dirs[c.name] = a.work / "engines" / f"{a.model}-{c.precision}{'-cached' if c.cached else ''}"
            outcomes[c.name].failed = _build_ours(c, a, engine_dirs[c.name], Path(prepared["folder"]))

    live = [c for c in live if outcomes[c.name].failed is None]
    if a.prepare_only:
        for name, o in outcomes.items():
            print(f"   {name}: {'ready' if o.failed is None else o.failed}", flush=True)
        return None
    for r, name in schedule([c.name for c in live], a.rounds):
        o, c = outcomes[name], CONTESTANTS[name]
        if o.failed is not None:
            continue
        image = a.work / "images" / f"{name}.png"
        cspec = {"name": name, "size": a.size, "steps": a.steps, "guidance": a.guidance, "images": a.images,
                 "folder": prepared["folder"], "checkpoint": prepared.get("checkpoint"),
                 "optimum": prepared.get("optimum"), "engine_dir": str(engine_dirs.get(name, "")),
                 "image_out": str(image) if r == 0 else None}
        print(f"== round {r + 1}: {name}", flush=True)
        rc, out, err = _python(["-m", "benchmarks.peer_children", "--child", json.dumps(cspec)], a.timeout_s,
                               a.work / "logs" / f"{name}-round{r + 1}.log")
        got = _last_json(out) if rc == 0 else None
        if got is None:
            o.failed = f"round {r + 1}: exit {rc}: {tail(err or out)}"
            print(f"   failed: {o.failed}", flush=True)
            continue
        o.seconds.append(min(got["seconds"]))
        o.load_s.append(got["load_s"])
        o.peak_rss_gib = max(o.peak_rss_gib, got["peak_rss_gib"])
        o.what = got["what"]
        if r == 0:
            o.image = image
        print(f"   {min(got['seconds']):.2f} s/image (load {got['load_s']:.1f} s, warm-up {got['warmup_s']:.1f} s, "
              f"peak RSS {got['peak_rss_gib']:.2f} GiB)", flush=True)

    add_rows(results, a, outcomes)
    dest = results.write(a.out)
    if a.keep_images:
        kept = dest.with_suffix("")
        for o in outcomes.values():
            if o.image is not None and o.image.is_file():
                kept.mkdir(exist_ok=True)
                shutil.copyfile(o.image, kept / o.image.name)
    print_table(results)
    return dest


def add_rows(results: Any, a: argparse.Namespace, outcomes: dict[str, Outcome]) -> None:
    """The rows of every contestant: measured figures, or one skipped row with the reason."""
    import numpy as np
    from PIL import Image

    ips = {n: 1 / min(o.seconds) for n, o in outcomes.items() if o.seconds}
    rat = ratios(ips)
    for name, o in outcomes.items():
        c = CONTESTANTS[name]
        cfg = config_of(c, a)
        if not o.seconds:
            results.skip(BENCH, cfg, o.failed or "no figure")
            continue
        cfg["rounds"] = len(o.seconds)
        extra = {"what": o.what, "round_seconds": [round(s, 3) for s in o.seconds]}
        if o.failed:
            extra["later_failure"] = o.failed
        results.add(BENCH, cfg, "seconds_per_image", min(o.seconds), "s", **extra)
        results.add(BENCH, cfg, "images_per_s", ips[name], "img/s")
        results.add(BENCH, cfg, "load_s", min(o.load_s), "s")
        results.add(BENCH, cfg, "peak_rss_gib", o.peak_rss_gib, "GiB")
        for metric in ("ratio_to_best_peer", "ratio_to_best_same_compute_peer", "ratio_to_best_same_precision_peer"):
            if metric in rat.get(name, {}):
                peer = rat[name][metric.replace("ratio_to_", "")]
                results.add(BENCH, cfg, metric, rat[name][metric], "x", peer=peer)
        for ref in c.reference:
            ro = outcomes.get(ref)
            if o.image is None or ro is None or ro.image is None:
                continue
            diff = psnr(np.asarray(Image.open(o.image).convert("RGB")), np.asarray(Image.open(ro.image).convert("RGB")))
            for metric, unit in (("psnr_db", "dB"), ("max_abs_px", "px"), ("mean_abs_px", "px")):
                if not math.isinf(diff[metric]):  # identical images have no finite PSNR: max_abs_px 0 says so
                    results.add(BENCH, {**cfg, "reference": ref}, metric, diff[metric], unit)


def print_table(results: Any) -> None:
    rows = [r for r in results.rows if r["bench"] == BENCH]
    by: dict[str, dict[str, Any]] = {}
    for r in rows:
        name = r["config"]["contestant"]
        d = by.setdefault(name, {})
        if r.get("skipped"):
            d["skipped"] = r["skipped"]
        elif "reference" in r["config"]:
            if r["metric"] == "max_abs_px":
                d.setdefault("psnr", {}).setdefault(r["config"]["reference"], "identical")
            elif r["metric"] == "psnr_db":
                d.setdefault("psnr", {})[r["config"]["reference"]] = f"{r['value']:.1f} dB"
        else:
            d[r["metric"]] = r["value"]
    print(f"\n{'contestant':28} {'img/s':>8} {'s/img':>8} {'load s':>7} {'RSS GiB':>8}  ratio / PSNR")
    for name, d in by.items():
        if "skipped" in d:
            print(f"{name:28} skipped: {d['skipped'][:150]}")
            continue
        notes = [f"{d['ratio_to_best_peer']:.2f}x best peer" if "ratio_to_best_peer" in d else "",
                 f"{d['ratio_to_best_same_compute_peer']:.2f}x same-compute peer"
                 if "ratio_to_best_same_compute_peer" in d else "",
                 f"{d['ratio_to_best_same_precision_peer']:.2f}x same-precision peer"
                 if "ratio_to_best_same_precision_peer" in d else ""]
        notes += [f"{v} vs {ref}" for ref, v in d.get("psnr", {}).items()]
        print(f"{name:28} {d['images_per_s']:8.4f} {d['seconds_per_image']:8.2f} {d['load_s']:7.1f} "
              f"{d['peak_rss_gib']:8.2f}  {'; '.join(n for n in notes if n)}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    print(f"peers: {a.model} {a.size}² {a.steps} steps euler, guidance {a.guidance}, {a.rounds} round(s); "
          f"contestants {', '.join(c.name for c in a.chosen)}; work {a.work}; "
          f"SD_ENGINE_CACHE {os.environ.get('SD_ENGINE_CACHE', '(default ~/.cache/sd_engine)')}", flush=True)
    dest = measure(a)
    if dest is not None:
        print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
