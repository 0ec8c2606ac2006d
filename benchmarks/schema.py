"""One results schema for every benchmark: flat rows, one file per run, never overwritten.

A results file is `{"schema": 1, "run": {...}, "rows": [...]}`; each row is

    {"bench": "pipeline", "config": {"model": "tiny", "backend": "onnxruntime", ...},
     "device": "AMD EPYC ... (2 cores)", "env": {...versions, git commit...},
     "metric": "unet_step_ms_p50", "value": 12.3, "unit": "ms", "ts": "2026-11-24T18:40:02Z"}

A benchmark that cannot run on this device writes a row with `value: null` and `skipped: <reason>`
instead of a number; the report prints the reason. Nothing is extrapolated: every value was measured
in this run, on `device`, at `ts`.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = 1
ROW_KEYS = ("bench", "config", "device", "env", "metric", "value", "unit", "ts")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                          "amx_tile")) -> list[str]:
    """The ISA flags that matter for CPU inference, as /proc/cpuinfo lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def device_of(device: str = "cpu") -> str:
    """The device a figure was measured on, in words: the GPU's name, or the CPU model and core count."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({cores()} cores)"


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and hardware facts that a figure depends on."""
    env: dict[str, Any] = {
        "cpu": cpu_model(), "cores": cores(), "cpu_flags": cpu_flags(), "python": platform.python_version(),
        "torch": _version("torch"), "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "tensorrt": _version("tensorrt"), "openvino": _version("openvino"), "nncf": _version("nncf"),
        "diffusers": _version("diffusers"), "git": git_commit(),
    }
    if device.startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over exec from
    the forked parent, so a child of a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status (Linux only)")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def percentiles(samples: Iterable[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles of the samples (p50 is the median for odd counts)."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("percentiles of no samples")
    out = {}
    for p in ps:
        rank = max(1, -(-p * len(xs) // 100))  # ceil(p/100 * n), 1-based
        out[f"p{p}"] = xs[rank - 1]
    out["mean"] = statistics.fmean(xs)
    return out


@dataclass
class Results:
    """Rows of one run; `write` puts them in a new timestamped file."""
    device: str = "cpu"  # torch device string the run measured on
    suite: str = "custom"
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device_name = device_of(self.device)
        self.env = environment(self.device)
        self.started = utc_now()

    def add(self, bench: str, config: dict[str, Any], metric: str, value: float, unit: str, **extra: Any) -> None:
        if math.isnan(value):
            raise ValueError(f"{bench}/{metric}: NaN is not a measurement")
        self.rows.append({"bench": bench, "config": dict(config), "device": self.device_name, "env": self.env,
                          "metric": metric, "value": float(value), "unit": unit, "ts": utc_now(), **extra})

    def add_samples(self, bench: str, config: dict[str, Any], metric: str, samples: list[float], unit: str,
                    keep_samples: bool = False) -> None:
        """p50/p90/p99/mean of the samples as four rows `<metric>_p50` ..., with the sample count (and the
        samples themselves on the p50 row when `keep_samples`: the report draws their CDF)."""
        for name, v in percentiles(samples).items():
            extra = {"samples": [round(x, 4) for x in samples]} if keep_samples and name == "p50" else {}
            self.add(bench, config, f"{metric}_{name}", v, unit, n=len(samples), **extra)

    def skip(self, bench: str, config: dict[str, Any], reason: str) -> None:
        self.rows.append({"bench": bench, "config": dict(config), "device": self.device_name, "env": self.env,
                          "metric": None, "value": None, "unit": None, "ts": utc_now(), "skipped": reason})

    def document(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "run": {"suite": self.suite, "device": self.device_name, "started": self.started,
                                          "finished": utc_now(), "env": self.env}, "rows": self.rows}

    def write(self, out_dir: Path) -> Path:
        """Write to <out_dir>/<date>T<time>-<suite>-<device>.json; a name never taken twice (exclusive create)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = self.started.replace(":", "").replace("-", "")
        slug = "".join(c if c.isalnum() else "-" for c in self.device_name.lower()).strip("-")
        slug = "-".join(p for p in slug.split("-") if p)[:48]
        text = json.dumps(self.document(), indent=1) + "\n"
        for n in range(1000):
            dest = out_dir / f"{stamp}-{self.suite}-{slug}{'' if n == 0 else f'-{n}'}.json"
            try:
                with open(dest, "x") as f:
                    f.write(text)
                return dest
            except FileExistsError:
                continue
        raise FileExistsError(f"no free results name under {out_dir}")


def load(path: Path) -> dict[str, Any]:
    """Read a results file, checking the schema; a file of another shape is an error naming it."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable results file ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path}: not a benchmarks.run results file (schema {SCHEMA} with rows)")
    for i, r in enumerate(doc["rows"]):
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {missing}")
    return doc
