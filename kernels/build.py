"""Build the CUDA kernels: PTX (compute_80, for TensorRT's AOT plugin) and a fatbin (sm_80/86/89/90 +
compute_80 PTX, for the torch op). No GPU is needed, only nvcc.

    python -m kernels.build [--ptx-only] [--force] [--no-cmake] [--archs 80,86,89,90]

Artifacts live in `kernels/build/<key>/` (override the root with $SD_KERNELS_BUILD_DIR), where <key>
hashes the sources, CMakeLists.txt and the build options (the "source key") together with the nvcc
identity (its resolved path and `nvcc --version` output), so an edited kernel or another toolkit
(CUDA_HOME pointing elsewhere) gets a fresh directory and stale artifacts are never loaded. Where no
nvcc is found (a runtime machine), the artifacts whose manifest records the current source key are
used; where a different nvcc is found, they are rebuilt. A build runs in a temporary directory that
is renamed into place when complete (atomic; concurrent builders are harmless). With cmake on PATH
the root CMakeLists.txt drives nvcc; otherwise nvcc is called directly with the same commands.
`ensure_built()` is what the loaders call: it builds on first use when the artifacts are missing.

Also here: reading the per-head-dim launch configuration exported by the .cu file out of the PTX
(`kernel_configs`) and cutting one entry point out of the PTX (`ptx_for_entry`) for TensorRT.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kernels import contract

KERNEL_DIR = Path(__file__).resolve().parent
REPO_ROOT = KERNEL_DIR.parent
SOURCE = KERNEL_DIR / "attention.cu"
CMAKE_LISTS = REPO_ROOT / "CMakeLists.txt"
DEFAULT_ARCHS = (80, 86, 89, 90)
PTX_ARCH = 80
NVCC_FLAGS = ("-std=c++17", "-O3")
PTX_NAME, FATBIN_NAME, MANIFEST_NAME = "attention.ptx", "attention.fatbin", "manifest.json"
BUILD_HINT = "python -m kernels.build"
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")


class BuildError(RuntimeError):
    """The kernels could not be built (no nvcc, compile error, ...)."""


@dataclass(frozen=True)
class Artifacts:
    dir: Path
    ptx: Path
    fatbin: Path | None  # None for a PTX-only build


@dataclass(frozen=True)
class KernelConfig:
    """Launch geometry of one head dim: grid (ceil(Sq / block_m), B * H), `threads`, `smem_bytes`."""

    head_dim: int
    block_m: int
    block_n: int
    threads: int
    smem_bytes: int


def build_root() -> Path:
    return Path(os.environ.get("SD_KERNELS_BUILD_DIR", KERNEL_DIR / "build"))


def source_files() -> list[Path]:
    files = [SOURCE, *sorted(KERNEL_DIR.glob("*.cuh"))]
    return files + ([CMAKE_LISTS] if CMAKE_LISTS.exists() else [])


def source_key(ptx_only: bool = False, archs: tuple[int, ...] = DEFAULT_ARCHS) -> str:
    """Hash of the sources, CMakeLists.txt and the build options (no toolkit): `<ptx|all>-<16 hex>`.
    Recorded in each manifest; a build directory named exactly this is a build from before the nvcc
    identity was part of the key (used only where no nvcc is found)."""
    h = hashlib.sha256()
    for f in source_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    opts = {"ptx_only": ptx_only, "archs": [] if ptx_only else list(archs), "ptx_arch": PTX_ARCH,
            "flags": list(NVCC_FLAGS)}
    h.update(json.dumps(opts, sort_keys=True).encode())
    return _prefix(ptx_only) + h.hexdigest()[:16]


def _prefix(ptx_only: bool) -> str:
    return "ptx-" if ptx_only else "all-"


@dataclass(frozen=True)
class NvccIdentity:
    """Which compiler a build used: its resolved path and the full `nvcc --version` output."""

    path: str
    version: str

    @property
    def release(self) -> str | None:
        """The CUDA release nvcc reports ("13.0"), or None if the output does not say."""
        m = re.search(r"release (\d+\.\d+)", self.version)
        return m.group(1) if m else None


_identities: dict[tuple[str, int, int], NvccIdentity] = {}


def nvcc_identity(nvcc: str | None = None) -> NvccIdentity:
    """The identity of `nvcc` (default: find_nvcc()); cached per (path, mtime, size) so that repeated
    lookups do not spawn nvcc again. BuildError when it is missing or `--version` fails."""
    nvcc = nvcc or find_nvcc()
    path = Path(nvcc).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise BuildError(f"nvcc {nvcc!r} cannot be read: {e}") from e
    cache_key = (str(path), st.st_mtime_ns, st.st_size)
    if cache_key in _identities:
        return _identities[cache_key]
    try:
        r = subprocess.run([str(path), "--version"], check=False, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{path} --version could not run: {e}") from e
    if r.returncode != 0 or not r.stdout.strip():
        raise BuildError(f"{path} --version exited {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")
    ident = NvccIdentity(str(path), r.stdout.strip())
    _identities[cache_key] = ident
    return ident


def current_nvcc() -> NvccIdentity | None:
    """The identity of the nvcc a build would use now, or None where there is no usable nvcc."""
    try:
        return nvcc_identity()
    except BuildError:
        return None


def build_key(ptx_only: bool = False, archs: tuple[int, ...] = DEFAULT_ARCHS,
              nvcc: NvccIdentity | None = None) -> str:
    """The build directory name: the source key plus the nvcc identity (default: the current nvcc;
    BuildError where there is none)."""
    ident = nvcc or nvcc_identity()
    h = hashlib.sha256(source_key(ptx_only, archs).encode() + b"\0")
    h.update(json.dumps({"nvcc_path": ident.path, "nvcc_version": ident.version}, sort_keys=True).encode())
    return _prefix(ptx_only) + h.hexdigest()[:16]


def _artifacts(d: Path, ptx_only: bool) -> Artifacts | None:
    ptx, fatbin = d / PTX_NAME, d / FATBIN_NAME
    if not (d / MANIFEST_NAME).is_file() or not ptx.is_file() or (not ptx_only and not fatbin.is_file()):
        return None
    return Artifacts(d, ptx, None if ptx_only else fatbin)


def _manifest(d: Path) -> dict:
    try:
        data = json.loads((d / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _by_source_key(root: Path, ptx_only: bool, archs: tuple[int, ...]) -> Artifacts | None:
    """Artifacts built from the current sources by whichever nvcc (the newest build wins), for machines
    without nvcc. A directory named by the source key alone is a build from before nvcc was keyed."""
    skey = source_key(ptx_only, archs)
    found: list[tuple[float, Artifacts]] = []
    for d in root.glob(_prefix(ptx_only) + "*"):
        if d.is_dir() and (d.name == skey or _manifest(d).get("source_key") == skey):
            art = _artifacts(d, ptx_only)
            try:
                if art is not None:
                    found.append(((d / MANIFEST_NAME).stat().st_mtime, art))
            except OSError:  # removed meanwhile by a concurrent build
                continue
    return max(found, key=lambda t: t[0])[1] if found else None


def _find(root: Path, ptx_only: bool, archs: tuple[int, ...], ident: NvccIdentity | None) -> Artifacts | None:
    if ident is None:
        return _by_source_key(root, ptx_only, archs)
    return _artifacts(root / build_key(ptx_only, archs, ident), ptx_only)


def find_artifacts(ptx_only: bool = False, archs: tuple[int, ...] = DEFAULT_ARCHS) -> Artifacts | None:
    """Existing artifacts for the current sources and nvcc, or None (a full build also serves PTX-only
    requests). With a usable nvcc only its own builds count (another toolkit's are rebuilt); without
    one, any build of the current sources does (what a runtime machine without the toolkit needs)."""
    root, ident = build_root(), current_nvcc()
    full = _find(root, False, archs, ident)
    if full is not None or not ptx_only:
        return full
    return _find(root, True, DEFAULT_ARCHS, ident)


def find_nvcc() -> str:
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env) and (p := Path(os.environ[env]) / "bin" / "nvcc").is_file():
            return str(p)
    if p := shutil.which("nvcc"):
        return p
    if (p := DEFAULT_CUDA_HOME / "bin" / "nvcc").is_file():
        return str(p)
    raise BuildError(
        "nvcc not found: install the CUDA toolkit (12.x or 13.x) or set CUDA_HOME, then run " + BUILD_HINT
    )


def cuda_include_dir() -> Path | None:
    """The toolkit's include directory (cuda_fp16.h), e.g. for building the host emulator."""
    nvcc = find_nvcc()
    for cand in (Path(nvcc).resolve().parent.parent / "include", DEFAULT_CUDA_HOME / "include"):
        if (cand / "cuda_fp16.h").is_file():
            return cand
    r = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], check=False,
                       capture_output=True, text=True)
    for m in re.finditer(r'INCLUDES="-I([^"]+)"', r.stdout + r.stderr):  # nvcc behind a wrapper script
        if (Path(m.group(1)) / "cuda_fp16.h").is_file():
            return Path(m.group(1)).resolve()
    return None


def _nvcc_commands(nvcc: str, out: Path, ptx_only: bool, archs: tuple[int, ...]) -> list[list[str]]:
    """The same two commands CMakeLists.txt runs."""
    cmds = [[nvcc, *NVCC_FLAGS, "-ptx", f"-arch=compute_{PTX_ARCH}", str(SOURCE), "-o", str(out / PTX_NAME)]]
    if not ptx_only:
        codes = ",".join([f"sm_{a}" for a in archs] + [f"compute_{PTX_ARCH}"])
        cmds.append([nvcc, *NVCC_FLAGS, "-fatbin", f"-gencode=arch=compute_{PTX_ARCH},code=[{codes}]",
                     str(SOURCE), "-o", str(out / FATBIN_NAME)])
    return cmds


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, check=False, capture_output=not verbose, text=True)
    if r.returncode != 0:
        detail = (r.stderr or r.stdout or "").strip()[-4000:] if not verbose else "(see output above)"
        raise BuildError(f"kernel build failed: {' '.join(cmd[:3])} ... exited {r.returncode}\n{detail}")


def build(ptx_only: bool = False, force: bool = False, use_cmake: bool | None = None,
          archs: tuple[int, ...] = DEFAULT_ARCHS, verbose: bool = False) -> Artifacts:
    """Build (unless already built and not `force`) and return the artifacts."""
    if not force and (found := find_artifacts(ptx_only, archs)) is not None:
        return found
    nvcc = find_nvcc()
    ident = nvcc_identity(nvcc)
    cmake = shutil.which("cmake") if use_cmake is not False and CMAKE_LISTS.exists() else None
    if use_cmake and cmake is None:
        raise BuildError("cmake requested but not found (or the repo's CMakeLists.txt is missing)")
    root = build_root()
    root.mkdir(parents=True, exist_ok=True)
    key, skey = build_key(ptx_only, archs, ident), source_key(ptx_only, archs)
    if not force and (found := _artifacts(root / key, ptx_only)) is not None:
        return found  # a PTX-only request with no full build of this nvcc: its own PTX-only build
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    t0 = time.perf_counter()
    try:
        if cmake:
            cm = tmp / "cmake"
            _run([cmake, "-S", str(REPO_ROOT), "-B", str(cm), f"-DNVCC={nvcc}", f"-DSD_OUT_DIR={tmp}",
                  f"-DSD_PTX_ONLY={'ON' if ptx_only else 'OFF'}", f"-DSD_PTX_ARCH={PTX_ARCH}",
                  "-DSD_KERNEL_ARCHS=" + ";".join(map(str, archs)),
                  "-DSD_NVCC_FLAGS=" + ";".join(NVCC_FLAGS)], verbose)
            _run([cmake, "--build", str(cm)], verbose)
            shutil.rmtree(cm)
        else:
            for cmd in _nvcc_commands(nvcc, tmp, ptx_only, archs):
                _run(cmd, verbose)
        manifest = {
            "key": key, "source_key": skey, "builder": "cmake" if cmake else "nvcc",
            "nvcc": {"path": ident.path, "release": ident.release, "version": ident.version},
            "ptx_arch": PTX_ARCH, "archs": [] if ptx_only else list(archs), "flags": list(NVCC_FLAGS),
            "sources": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in source_files()},
            "entries": contract.all_entry_names(), "seconds": round(time.perf_counter() - t0, 2),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        dest = root / key
        if force and dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)  # atomic publish
        except OSError:
            if _artifacts(dest, ptx_only) is None:  # a concurrent builder won the race: use theirs
                raise
        _drop_stale(root, ptx_only, skey)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    found = _artifacts(root / key, ptx_only)
    assert found is not None
    return found


def _drop_stale(root: Path, ptx_only: bool, skey: str) -> None:
    """Best effort: remove builds of other sources or options; builds of these sources by other
    toolkits stay (switching CUDA_HOME back does not rebuild)."""
    for old in root.glob(_prefix(ptx_only) + "*"):
        if old.is_dir() and old.name != skey and _manifest(old).get("source_key") != skey:
            shutil.rmtree(old, ignore_errors=True)


def ensure_built(ptx_only: bool = False) -> Artifacts:
    """Artifacts for the current sources (and nvcc, where there is one), building them on first use
    (a few seconds to a minute)."""
    found = find_artifacts(ptx_only)
    if found is not None:
        return found
    print(f"[kernels] building CUDA kernels into {build_root()} (first use) ...", file=sys.stderr, flush=True)
    return build(ptx_only=ptx_only)


# ---------------------------------------------------------------------------------------------- PTX
_CFG_RE = re.compile(r"\.global\s+\.align\s+\d+\s+\.b8\s+sd_attention_cfg_d(\d+)\[16\]\s*=\s*\{([^}]*)\}")
_B32_RE = re.compile(r"\.global\s+\.align\s+\d+\s+\.b32\s+sd_attention_cfg_d(\d+)\[4\]\s*=\s*\{([^}]*)\}")
_ENTRY_RE = re.compile(r"^[ \t]*(?:\.visible[ \t]+|\.weak[ \t]+)?\.entry[ \t]+([\w$]+)", re.MULTILINE)


def kernel_configs(ptx_text: str) -> dict[int, KernelConfig]:
    """The int[4] {block_m, block_n, threads, smem_bytes} per head dim that attention.cu exports."""
    configs: dict[int, KernelConfig] = {}
    for m in _CFG_RE.finditer(ptx_text):  # emitted as little-endian bytes, trailing zeros dropped
        raw = [int(x) for x in m.group(2).split(",") if x.strip()]
        vals = struct.unpack("<4i", bytes(raw + [0] * (16 - len(raw))))
        configs[int(m.group(1))] = KernelConfig(int(m.group(1)), *vals)
    for m in _B32_RE.finditer(ptx_text):  # other compilers may emit the words directly
        vals = [int(x) for x in m.group(2).split(",")]
        configs[int(m.group(1))] = KernelConfig(int(m.group(1)), *vals)
    return configs


def ptx_entries(ptx_text: str) -> list[str]:
    return re.findall(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(", ptx_text)


def ptx_for_entry(ptx_text: str, name: str) -> str:
    """A self-contained PTX module holding one entry point (plus every top-level declaration), so
    TensorRT JIT-compiles one kernel instead of all of them."""
    out: list[str] = []
    i, n = 0, len(ptx_text)
    found = False
    while i < n:
        m = _ENTRY_RE.search(ptx_text, i)
        if m is None:
            out.append(ptx_text[i:])
            break
        start = ptx_text.rfind("\n", 0, m.start()) + 1
        # the entry's comment line (// .globl name) stays with the preceding text; harmless
        out.append(ptx_text[i:start])
        body = ptx_text.index("{", m.end())
        depth, j = 0, body
        while j < n:
            c = ptx_text[j]
            depth += (c == "{") - (c == "}")
            j += 1
            if depth == 0:
                break
        if m.group(1) == name:
            out.append(ptx_text[start:j])
            found = True
        i = j
    if not found:
        raise KeyError(f"entry {name!r} not in the PTX")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.build", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--ptx-only", action="store_true", help="build only the PTX (fast; what TensorRT needs)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--no-cmake", action="store_true", help="call nvcc directly even if cmake is available")
    ap.add_argument("--archs", default=",".join(map(str, DEFAULT_ARCHS)), help="SASS archs for the fatbin")
    args = ap.parse_args(argv)
    archs = tuple(int(a) for a in args.archs.split(",") if a)
    t0 = time.perf_counter()
    try:
        art = build(ptx_only=args.ptx_only, force=args.force, use_cmake=False if args.no_cmake else None,
                    archs=archs, verbose=True)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"kernels: {art.dir} ({time.perf_counter() - t0:.1f}s)")
    print(f"  ptx:    {art.ptx}")
    if art.fatbin:
        print(f"  fatbin: {art.fatbin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
