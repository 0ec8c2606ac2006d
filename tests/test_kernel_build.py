"""The kernel build cache is keyed on the nvcc identity (resolved path + `nvcc --version`), and
tests/gpu.sh stops with one line where the driver is older than nvcc's CUDA; CPU only.

Fake toolkits are shell scripts named `nvcc` under a temporary CUDA_HOME: `--version` prints the release
they were made with, any other call writes a small file to its `-o` target (or, in the real-nvcc test,
runs the real nvcc), and every call is logged so that a test can tell a rebuild from a cache hit.
A fake nvidia-smi reports the driver's CUDA version to gpu.sh.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import build as kbuild


@pytest.fixture
def toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private build root and an environment where no nvcc is found until a test puts one there."""
    monkeypatch.setenv("SD_KERNELS_BUILD_DIR", str(tmp_path / "kbuild"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(kbuild, "DEFAULT_CUDA_HOME", tmp_path / "no-cuda")
    return tmp_path


def _fake_nvcc(home: Path, release: str, real: str | None = None) -> Path:
    """<home>/bin/nvcc reporting CUDA `release`; logs its calls to <home>/calls.log."""
    nvcc = home / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True, exist_ok=True)
    compile_step = (f'exec "{real}" "$@"' if real else
                    'out=; prev=\nfor a in "$@"; do [ "$prev" = "-o" ] && out=$a; prev=$a; done\n'
                    f'printf "// fake output of nvcc {release}\\n" > "$out"')
    nvcc.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{home / "calls.log"}"\n'
        'if [ "$1" = "--version" ]; then\n'
        f'  printf "nvcc: NVIDIA (R) Cuda compiler driver\\nCuda compilation tools, release {release}, V{release}.1\\n"\n'
        "  exit 0\nfi\n" + compile_step + "\n"
    )
    nvcc.chmod(0o755)
    return nvcc


def _compiles(home: Path) -> int:
    log = home / "calls.log"
    return sum(" -o " in line for line in log.read_text().splitlines()) if log.exists() else 0


def _use(monkeypatch: pytest.MonkeyPatch, home: Path | None) -> None:
    if home is None:
        monkeypatch.delenv("CUDA_HOME", raising=False)
    else:
        monkeypatch.setenv("CUDA_HOME", str(home))


def test_key_follows_nvcc_identity(toolchain: Path, monkeypatch: pytest.MonkeyPatch):
    a = _fake_nvcc(toolchain / "cuda-a", "13.0")
    b = _fake_nvcc(toolchain / "cuda-b", "12.8")
    ida, idb = kbuild.nvcc_identity(str(a)), kbuild.nvcc_identity(str(b))
    assert (ida.path, ida.release, idb.release) == (str(a.resolve()), "13.0", "12.8")
    assert kbuild.build_key(nvcc=ida) != kbuild.build_key(nvcc=idb)
    assert kbuild.build_key(nvcc=ida) == kbuild.build_key(nvcc=kbuild.nvcc_identity(str(a)))
    assert kbuild.build_key(True, nvcc=ida).startswith("ptx-") and kbuild.build_key(nvcc=ida).startswith("all-")
    # the same path with another version (a toolkit upgraded in place) is another identity
    twin = _fake_nvcc(toolchain / "cuda-twin", "13.0")
    assert kbuild.build_key(nvcc=kbuild.nvcc_identity(str(twin))) != kbuild.build_key(nvcc=ida)  # other path
    _fake_nvcc(toolchain / "cuda-a", "13.1")
    os.utime(a, ns=(1, 1))  # even with the mtime put back, the size differs: no stale cached identity
    assert kbuild.nvcc_identity(str(a)).release == "13.1"
    assert kbuild.build_key(nvcc=kbuild.nvcc_identity(str(a))) != kbuild.build_key(nvcc=ida)
    # CUDA_HOME picks the identity build_key() uses by default
    _use(monkeypatch, toolchain / "cuda-b")
    assert kbuild.build_key() == kbuild.build_key(nvcc=idb)
    assert kbuild.source_key() == kbuild.source_key()  # the source part is toolkit-independent


def test_switching_cuda_home_rebuilds_and_switching_back_does_not(toolchain: Path, monkeypatch: pytest.MonkeyPatch):
    home_a, home_b = toolchain / "cuda-a", toolchain / "cuda-b"
    _fake_nvcc(home_a, "13.0")
    _fake_nvcc(home_b, "12.8")
    _use(monkeypatch, home_a)
    art_a = kbuild.build(ptx_only=True, use_cmake=False)
    assert _compiles(home_a) == 1 and "nvcc 13.0" in art_a.ptx.read_text()
    assert kbuild.build(ptx_only=True, use_cmake=False) == art_a and _compiles(home_a) == 1  # cached

    _use(monkeypatch, home_b)
    assert kbuild.find_artifacts(ptx_only=True) is None  # another toolkit: never the old PTX
    art_b = kbuild.build(ptx_only=True, use_cmake=False)
    assert art_b.dir != art_a.dir and _compiles(home_b) == 1
    assert "nvcc 12.8" in art_b.ptx.read_text()
    manifest = json.loads((art_b.dir / kbuild.MANIFEST_NAME).read_text())
    assert manifest["nvcc"]["path"] == str((home_b / "bin" / "nvcc").resolve())
    assert manifest["nvcc"]["release"] == "12.8" and "release 12.8" in manifest["nvcc"]["version"]
    assert manifest["source_key"] == kbuild.source_key(ptx_only=True) and manifest["key"] == art_b.dir.name

    _use(monkeypatch, home_a)  # back: toolkit A's build was kept
    assert kbuild.ensure_built(ptx_only=True) == art_a and _compiles(home_a) == 1


def test_without_nvcc_the_built_artifacts_are_found(toolchain: Path, monkeypatch: pytest.MonkeyPatch):
    home_a = toolchain / "cuda-a"
    _fake_nvcc(home_a, "13.0")
    _use(monkeypatch, home_a)
    art = kbuild.build(use_cmake=False)  # full build: PTX + fatbin
    assert art.fatbin is not None and _compiles(home_a) == 2

    _use(monkeypatch, None)  # a runtime machine: no toolkit at all
    assert kbuild.current_nvcc() is None
    with pytest.raises(kbuild.BuildError, match="nvcc not found"):
        kbuild.find_nvcc()
    assert kbuild.find_artifacts() == art
    assert kbuild.find_artifacts(ptx_only=True) == art  # a full build serves PTX-only requests
    assert kbuild.ensure_built() == art and _compiles(home_a) == 2

    _use(monkeypatch, toolchain / "cuda-c")  # but a different nvcc present means a rebuild
    _fake_nvcc(toolchain / "cuda-c", "12.6")
    assert kbuild.find_artifacts() is None


def test_without_nvcc_and_nothing_built_the_error_names_nvcc(toolchain: Path):
    assert kbuild.find_artifacts() is None
    with pytest.raises(kbuild.BuildError, match="nvcc not found.*CUDA_HOME"):
        kbuild.ensure_built()


def test_source_edit_is_never_served_without_nvcc(toolchain: Path, monkeypatch: pytest.MonkeyPatch):
    home_a = toolchain / "cuda-a"
    _fake_nvcc(home_a, "13.0")
    _use(monkeypatch, home_a)
    kbuild.build(ptx_only=True, use_cmake=False)
    _use(monkeypatch, None)
    monkeypatch.setattr(kbuild, "NVCC_FLAGS", (*kbuild.NVCC_FLAGS, "-lineinfo"))  # other options = other sources
    assert kbuild.find_artifacts(ptx_only=True) is None


def test_pre_identity_build_dir_is_used_only_without_nvcc(toolchain: Path, monkeypatch: pytest.MonkeyPatch):
    """A directory named by the source key alone (built before nvcc was part of the key)."""
    legacy = Path(os.environ["SD_KERNELS_BUILD_DIR"]) / kbuild.source_key(ptx_only=True)
    legacy.mkdir(parents=True)
    (legacy / kbuild.PTX_NAME).write_text("// legacy\n")
    (legacy / kbuild.MANIFEST_NAME).write_text(json.dumps({"key": legacy.name, "nvcc": ["release 12.4"]}))
    assert kbuild.find_artifacts(ptx_only=True) == kbuild.Artifacts(legacy, legacy / kbuild.PTX_NAME, None)
    _fake_nvcc(toolchain / "cuda-a", "13.0")
    _use(monkeypatch, toolchain / "cuda-a")
    assert kbuild.find_artifacts(ptx_only=True) is None


def test_publishing_drops_other_sources_but_keeps_other_toolkits(toolchain: Path, monkeypatch: pytest.MonkeyPatch):
    root = Path(os.environ["SD_KERNELS_BUILD_DIR"])
    stale = root / "ptx-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / kbuild.MANIFEST_NAME).write_text(json.dumps({"source_key": "ptx-not-these-sources"}))
    _fake_nvcc(toolchain / "cuda-a", "13.0")
    _fake_nvcc(toolchain / "cuda-b", "12.8")
    _use(monkeypatch, toolchain / "cuda-a")
    art_a = kbuild.build(ptx_only=True, use_cmake=False)
    assert not stale.exists()
    _use(monkeypatch, toolchain / "cuda-b")
    art_b = kbuild.build(ptx_only=True, use_cmake=False)
    assert art_a.dir.is_dir() and art_b.dir.is_dir()
    _use(monkeypatch, None)  # without nvcc: the newest build of these sources
    assert kbuild.find_artifacts(ptx_only=True) == art_b


def test_broken_nvcc_is_a_clear_error(toolchain: Path, monkeypatch: pytest.MonkeyPatch):
    nvcc = toolchain / "cuda-x" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'libnvvm missing' >&2\nexit 3\n")
    nvcc.chmod(0o755)
    _use(monkeypatch, toolchain / "cuda-x")
    with pytest.raises(kbuild.BuildError, match=r"--version exited 3: libnvvm missing"):
        kbuild.nvcc_identity()
    assert kbuild.current_nvcc() is None
    with pytest.raises(kbuild.BuildError, match="exited 3"):
        kbuild.build(ptx_only=True, use_cmake=False)


def test_real_nvcc_reporting_another_version_builds_fresh_ptx(toolchain: Path, monkeypatch: pytest.MonkeyPatch):
    """End to end with the real compiler behind a wrapper that reports another release."""
    monkeypatch.undo()  # find the real nvcc with the caller's environment first
    try:
        real = str(Path(kbuild.find_nvcc()).resolve())
    except kbuild.BuildError:
        pytest.skip("nvcc not found")
    real_key = kbuild.build_key(ptx_only=True)
    toolchain.joinpath("kbuild").mkdir()
    monkeypatch.setenv("SD_KERNELS_BUILD_DIR", str(toolchain / "kbuild"))
    home = toolchain / "cuda-wrapped"
    _fake_nvcc(home, "99.9", real=real)
    _use(monkeypatch, home)
    art = kbuild.build(ptx_only=True, use_cmake=False)
    assert art.dir.name != real_key and _compiles(home) == 1
    assert sorted(kbuild.ptx_entries(art.ptx.read_text())) == sorted(kbuild.contract.all_entry_names())


# ------------------------------------------------------------------ tests/gpu.sh: the version gate
def _gpu_sh(tmp_path: Path, driver_cuda: str | None, nvcc_release: str) -> tuple[int, list[str]]:
    """Run tests/gpu.sh with a fake nvidia-smi (None: none at all) and a fake nvcc; (exit status, stdout lines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if driver_cuda is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text('#!/bin/sh\nif [ $# -gt 0 ]; then echo 570.86.15; exit 0; fi\n'
                       f'echo "| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: {driver_cuda}  |"\n')
        smi.chmod(0o755)
    _fake_nvcc(tmp_path / "cuda", nvcc_release)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "CUDA_HOME": str(tmp_path / "cuda"),
           "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "SD_KERNELS_BUILD_DIR": str(tmp_path / "kbuild")}
    r = subprocess.run(["bash", str(Path(__file__).with_name("gpu.sh"))], env=env, check=False, capture_output=True,
                       text=True, timeout=120)
    return r.returncode, r.stdout.splitlines()


def test_gpu_sh_stops_without_a_driver(tmp_path: Path):
    rc, lines = _gpu_sh(tmp_path, None, "13.0")
    assert rc == 1 and lines[-1].startswith("STOP: no NVIDIA driver"), lines
    assert lines[0].startswith("driver none (CUDA ?) | nvcc ") and "(CUDA 13.0) | torch " in lines[0], lines
    assert not any(line.startswith("==") for line in lines)  # no step ran
    assert (tmp_path / "out" / "versions.txt").read_text().strip() == lines[0]


def test_gpu_sh_stops_when_the_driver_is_older_than_nvcc(tmp_path: Path):
    rc, lines = _gpu_sh(tmp_path, "12.8", "13.0")
    assert rc == 1 and not any(line.startswith("==") for line in lines), lines
    assert lines[0].startswith("driver 570.86.15 (CUDA 12.8) | nvcc "), lines
    stops = [line for line in lines if line.startswith("STOP:")]
    assert stops == [lines[-1]] and "supports CUDA 12.8, older than" in stops[0] and "(CUDA 13.0)" in stops[0]
    assert "set CUDA_HOME to a toolkit <= 12.8" in stops[0]
