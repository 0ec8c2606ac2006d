"""Tests of the fused attention kernels (kernels/).

CPU (CI): nvcc build of PTX + fatbin (entry points, ABI, launch configs, no register spills), the
kernel body run through the host emulator (kernels/emu) against an fp32 reference (also huge logits,
Sk = 1, Sq = 1), the torch op's CPU behaviour, input copies and fake implementation, the attention
benchmark's bookkeeping and no-GPU skip, the TensorRT plugin module's import guard and AOT logic.
(The build cache's nvcc keying and tests/gpu.sh's version gate: tests/test_kernel_build.py.)
GPU: tests/test_kernels_gpu.py.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import build as kbuild
from kernels import contract
from tests.kernel_cases import DTYPES, EDGE_CASES, HAS_GPU, assert_within_lowp, check_edge, edge_inputs

REPO = Path(__file__).resolve().parents[1]


def _nvcc() -> str:
    try:
        return kbuild.find_nvcc()
    except kbuild.BuildError:
        pytest.skip("nvcc not found")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kbuild.Artifacts]:
    """One fresh build per session through the CLI (`python -m kernels.build`) into a temp build root."""
    _nvcc()
    root = tmp_path_factory.mktemp("kbuild")
    env = dict(os.environ, SD_KERNELS_BUILD_DIR=str(root))
    r = subprocess.run([sys.executable, "-m", "kernels.build"], cwd=REPO, env=env, check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    mp = pytest.MonkeyPatch()
    mp.setenv("SD_KERNELS_BUILD_DIR", str(root))
    art = kbuild.find_artifacts()
    assert art is not None and art.fatbin is not None
    yield art
    mp.undo()


@pytest.fixture(scope="module")
def ptx(built: kbuild.Artifacts) -> str:
    return built.ptx.read_text()


# ------------------------------------------------------------------------------------------- build
def test_contract_constants():
    assert (contract.PLUGIN_NAME, contract.PLUGIN_NAMESPACE, contract.PLUGIN_VERSION) == ("FusedAttention", "sd_engine", "1")
    assert contract.PLUGIN_ID == "sd_engine::FusedAttention"
    assert (contract.ATTR_NUM_HEADS, contract.ATTR_HEAD_DIM) == ("num_heads", "head_dim")
    assert (contract.ATTR_PLUGIN_NAMESPACE, contract.ATTR_PLUGIN_VERSION) == ("plugin_namespace", "plugin_version")
    assert contract.SUPPORTED_HEAD_DIMS == (40, 64, 80, 128, 160)
    assert contract.entry_name("float16", 40) == "sd_attention_fwd_f16_d40"
    assert contract.entry_name("bf16", 160, scaled=True) == "sd_attention_fwd_bf16_d160_scaled"
    src = (REPO / "kernels" / "contract.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(torch|cuda|tensorrt)", src, re.MULTILINE), "contract must stay dependency-free"


def test_ptx_entries_and_abi(ptx: str):
    entries = kbuild.ptx_entries(ptx)
    assert sorted(entries) == sorted(contract.all_entry_names())
    for name in entries:
        params = re.search(rf"\.entry\s+{name}\s*\((.*?)\)", ptx, re.DOTALL)
        assert params is not None
        types_ = re.findall(r"\.param\s+\.(\w+)", params.group(1))
        # TensorRT AOT order: inputs (q, k, v), extra int32 args (B, Sq, Sk, H), outputs (out)
        expected = ["u64"] * 3 + ["u32"] * 4 + (["f32"] if name.endswith("_scaled") else []) + ["u64"]
        assert types_ == expected, (name, types_)
    assert ".target sm_80" in ptx


def test_launch_configs(ptx: str):
    configs = kbuild.kernel_configs(ptx)
    assert sorted(configs) == sorted(contract.SUPPORTED_HEAD_DIMS)
    for d, cfg in configs.items():
        assert cfg.threads == 128 and cfg.block_m % 16 == 0 and cfg.block_n % 16 == 0
        assert 0 < cfg.smem_bytes <= 48 * 1024, "no opt-in shared memory (TensorRT AOT launches)"
        for dtype in ("f16", "bf16"):
            body = ptx.split(f".entry {contract.entry_name(dtype, d)}(")[1]
            assert re.search(r"\.maxntid\s+(\d+)", body).group(1) == str(cfg.threads)  # type: ignore[union-attr]


def test_fatbin_architectures(built: kbuild.Artifacts):
    assert built.fatbin is not None
    data = built.fatbin.read_bytes()
    magic, _, header, size = struct.unpack_from("<IHHQ", data, 0)
    assert magic == 0xBA55ED50
    found, off = set(), header
    while off < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
        arch = struct.unpack_from("<I", data, off + 28)[0]
        found.add(("ptx" if kind == 1 else "sm", arch))
        off += entry_header + payload
    assert {("sm", 80), ("sm", 86), ("sm", 89), ("sm", 90), ("ptx", 80)} <= found


def test_ptxas_no_spills_and_entry_extraction(ptx: str, tmp_path: Path):
    ptxas = Path(_nvcc()).resolve().parent / "ptxas"
    if not ptxas.exists():
        pytest.skip("ptxas not found")
    (tmp_path / "all.ptx").write_text(ptx)
    r = subprocess.run([str(ptxas), "-arch=sm_80", "-v", str(tmp_path / "all.ptx"), "-o", str(tmp_path / "all.cubin")],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    assert len(spills) == len(contract.all_entry_names()) and all(s == "0" for s in spills), r.stderr
    one = kbuild.ptx_for_entry(ptx, "sd_attention_fwd_f16_d40")
    assert kbuild.ptx_entries(one) == ["sd_attention_fwd_f16_d40"] and len(one) < len(ptx) / 10
    (tmp_path / "one.ptx").write_text(one)
    r = subprocess.run([str(ptxas), "-arch=sm_80", str(tmp_path / "one.ptx"), "-o", str(tmp_path / "one.cubin")],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_build_is_cached_and_keyed(built: kbuild.Artifacts):
    assert kbuild.build() == built  # up to date: no rebuild
    assert built.dir.name == kbuild.build_key()
    assert kbuild.build_key(ptx_only=True) != kbuild.build_key()


# -------------------------------------------------------------------------------- host emulator
@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _nvcc()
    gxx, cuda_inc = shutil.which("g++"), kbuild.cuda_include_dir()
    if gxx is None or cuda_inc is None:
        pytest.skip("g++ or the CUDA headers not found")
    exe = tmp_path_factory.mktemp("emu") / "attention_emu"
    r = subprocess.run([gxx, "-std=c++20", "-O2", "-pthread", f"-I{cuda_inc}", str(REPO / "kernels/emu/attention_emu.cpp"),
                        "-o", str(exe)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


EMU_CASES = [  # dtype, D, B, Sq, Sk, H, scale (None = baked 1/sqrt(D))
    ("float16", 40, 1, 77, 77, 2, None), ("bfloat16", 40, 2, 130, 200, 1, None),
    ("float16", 64, 1, 200, 77, 2, None), ("bfloat16", 64, 1, 16, 129, 1, 0.3),
    ("float16", 80, 1, 130, 33, 1, None), ("bfloat16", 80, 1, 77, 77, 1, None),
    ("float16", 128, 1, 65, 100, 1, 0.05), ("bfloat16", 128, 1, 70, 65, 1, None),
    ("float16", 160, 1, 65, 40, 2, None), ("bfloat16", 160, 1, 33, 77, 1, None),
]


def _emulate(emulator: Path, tmp_path: Path, dtype: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             heads: int, scale: float | None) -> torch.Tensor:
    """Run the kernel body on the CPU emulator; float32 [B, Sq, H*D] (its output was poisoned with NaN)."""
    b, sq, e = q.shape
    np.concatenate([t.float().numpy().ravel() for t in (q, k, v)]).tofile(tmp_path / "in.f32")
    r = subprocess.run([str(emulator), contract.DTYPE_TAGS[dtype], str(e // heads), str(b), str(sq), str(k.shape[1]),
                        str(heads), "baked" if scale is None else repr(scale), str(tmp_path / "in.f32"),
                        str(tmp_path / "out.f32")], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = torch.from_numpy(np.fromfile(tmp_path / "out.f32", dtype=np.float32)).view(b, sq, e)
    assert not out.isnan().any(), "some outputs were never written (poisoned with NaN)"
    return out


@pytest.mark.parametrize("dtype,d,b,sq,sk,h,scale", EMU_CASES)
def test_emulated_kernel_matches_reference(emulator: Path, tmp_path: Path, dtype, d, b, sq, sk, h, scale):
    g = torch.Generator().manual_seed(d * 1000 + sq)
    q, k, v = (torch.randn(b, s, h * d, generator=g).to(DTYPES[dtype]) for s in (sq, sk, sk))
    assert_within_lowp(_emulate(emulator, tmp_path, dtype, q, k, v, h, scale), q, k, v, h, scale)


@pytest.mark.parametrize("dtype,d,b,sq,sk,h,q_mult", [c[1:] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
def test_emulated_kernel_edge_cases(emulator: Path, tmp_path: Path, dtype, d, b, sq, sk, h, q_mult):
    q, k, v = edge_inputs(dtype, d, b, sq, sk, h, q_mult)
    check_edge(_emulate(emulator, tmp_path, dtype, q, k, v, h, None), q, k, v, h, sk)


def test_emulated_kernel_empty_keys(emulator: Path, tmp_path: Path):
    q = torch.randn(1, 20, 64)
    q.numpy().tofile(tmp_path / "in.f32")
    r = subprocess.run([str(emulator), "f16", "64", "1", "20", "0", "1", "baked", str(tmp_path / "in.f32"),
                        str(tmp_path / "out.f32")], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (np.fromfile(tmp_path / "out.f32", dtype=np.float32) == 0).all()


# ------------------------------------------------------------------------------ python, no GPU
def test_imports_without_gpu():
    import kernels
    import kernels.launcher
    import kernels.torch_op

    assert callable(kernels.is_available) and callable(kernels.fused_attention)
    assert torch.ops.sd_engine.fused_attention.default._schema.arguments[3].type.kind() == "IntType"
    if not HAS_GPU:
        assert kernels.is_available() is False


def test_is_available_says_why_it_falls_back_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """A kernel that cannot load (here: a failed build) is a logged warning, once per reason; an unexpected
    error is not swallowed."""
    import kernels
    from kernels import launcher

    def failed_build(device: int | None = None) -> None:
        raise launcher.KernelUnavailable("the fused attention kernels are not built and could not be built: nvcc died")

    monkeypatch.setattr(launcher, "load_module", failed_build)
    kernels._warn_unavailable.cache_clear()
    with caplog.at_level("WARNING", logger="kernels"):
        assert kernels.is_available() is False and kernels.is_available() is False
    assert [r.getMessage() for r in caplog.records] == [
        "the fused attention kernel is unavailable, attention falls back to SDPA: KernelUnavailable: "
        "the fused attention kernels are not built and could not be built: nvcc died"]

    def bug(device: int | None = None) -> None:
        raise TypeError("a bug, not a missing GPU")

    monkeypatch.setattr(launcher, "load_module", bug)
    with pytest.raises(TypeError, match="a bug"):
        kernels.is_available()


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error")
def test_op_without_gpu_raises_clear_error():
    from kernels.launcher import KernelUnavailable, launch_attention
    from kernels.torch_op import fused_attention

    q = torch.randn(2, 77, 320, dtype=torch.float16)
    with pytest.raises(KernelUnavailable, match="CUDA"):
        fused_attention(q, q, q, 8)
    with pytest.raises(KernelUnavailable, match="GPU"):
        launch_attention(0, 0, 0, 0, batch=1, seq_q=1, seq_k=1, num_heads=1, head_dim=40, dtype="float16", stream=0)


def test_op_validates_inputs():
    from kernels.torch_op import fused_attention

    q = torch.randn(2, 77, 8 * 48, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 48"):
        fused_attention(q, q, q, 8)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        fused_attention(q.float(), q.float(), q.float(), 6)


def test_op_copies_noncontiguous_and_misaligned_inputs():
    """The op's input preparation (the same code on CPU and CUDA tensors): a strided slice of a fused
    projection and a 2-byte-misaligned view become contiguous, 16-byte-aligned copies of equal value;
    an already fit tensor is passed through without a copy."""
    from kernels.torch_op import _aligned

    g = torch.Generator().manual_seed(0)
    fused = torch.randn(2, 77, 3 * 320, generator=g).half()  # [B, S, 3E] from one qkv projection
    k_slice = fused[..., 320:640]
    assert not k_slice.is_contiguous()
    for t in (k_slice, fused.transpose(0, 1).contiguous().transpose(0, 1)[..., :320]):
        out = _aligned(t)
        assert out.is_contiguous() and out.data_ptr() % 16 == 0 and torch.equal(out, t)
    flat = torch.empty(2 * 77 * 320 + 1, dtype=torch.float16)
    misaligned = flat[1:].view(2, 77, 320)
    misaligned.copy_(k_slice)
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 == 2
    out = _aligned(misaligned)
    assert out.data_ptr() % 16 == 0 and torch.equal(out, k_slice)
    fit = k_slice.contiguous()
    assert _aligned(fit) is fit


def test_sanitizer_driver_covers_the_cases_and_needs_a_gpu():
    from tests import kernel_sanitize

    todo = kernel_sanitize.cases()
    assert {(d, sq, sk) for _, d, sq, sk, _ in todo} >= {(d, 333, 77) for d in (40, 80, 160)}
    assert {dt for dt, *_ in todo} == {"float16", "bfloat16"}
    assert {s is None for *_, s in todo} == {True, False}  # the baked and the runtime-scale entries
    if not HAS_GPU:
        assert kernel_sanitize.main([]) == 2


def test_reference_matches_sdpa_cpu():
    from kernels.torch_op import attention_reference

    g = torch.Generator().manual_seed(0)
    b, sq, sk, h, d = 2, 33, 17, 3, 40
    q, k, v = (torch.randn(b, s, h * d, generator=g) for s in (sq, sk, sk))
    def hv(x):
        return x.view(b, x.shape[1], h, d).transpose(1, 2)
    for scale in (None, 0.2):
        expect = F.scaled_dot_product_attention(hv(q), hv(k), hv(v), scale=scale).transpose(1, 2).reshape(b, sq, h * d)
        torch.testing.assert_close(attention_reference(q, k, v, h, scale), expect, rtol=1e-5, atol=1e-5)


def test_fake_impl_traces():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from kernels.torch_op import fused_attention

    with FakeTensorMode():
        q, kv = torch.empty(2, 4096, 320, dtype=torch.float16), torch.empty(2, 77, 320, dtype=torch.bfloat16)
        out = torch.ops.sd_engine.fused_attention(q, kv.half(), kv.half(), 8, 0.125)
        assert out.shape == (2, 4096, 320) and out.dtype == torch.float16
    q = torch.randn(2, 64, 640, dtype=torch.bfloat16)
    gm = make_fx(lambda a, b: fused_attention(a, b, b, 8) + 1, tracing_mode="fake")(q, q[:, :7])
    assert "sd_engine.fused_attention.default" in gm.code


# ------------------------------------------------------------------------------ benchmark (CPU)
@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU skip")
def test_attention_benchmark_skips_cleanly_without_gpu():
    from benchmarks import attention
    from benchmarks.schema import Results

    results = Results(suite="attention")
    attention.measure(results, dtype="bfloat16", shapes=("sd15",), iters=5)
    assert [(r["bench"], r["value"], r["skipped"]) for r in results.rows] == [("attention", None, "no CUDA GPU")]
    assert results.rows[0]["config"] == {"shapes": "sd15", "dtype": "bfloat16"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.attention"], cwd=REPO, check=False, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "float32"}, r"dtype 'float32' is not one of \('float16', 'bfloat16'\)"),
    ({"shapes": ("sd15", "sdxl")}, r"shapes \['sdxl'\] not among \('sd15', 'sd21'\)"),
    ({"iters": 0}, "iters must be >= 1, got 0"),
    ({"batch": 0}, "batch must be >= 1, got 0"),
])
def test_attention_benchmark_rejects_bad_options(kwargs, match):
    from benchmarks import attention
    from benchmarks.schema import Results

    with pytest.raises(ValueError, match=match):
        attention.measure(Results(), **kwargs)


def test_attention_benchmark_rows_table_and_goal(monkeypatch: pytest.MonkeyPatch):
    """measure_shape's bookkeeping on the CPU: SDPA really runs (the backends the CPU lacks become skip
    rows), ours is stood in for by the fp32 reference rounded to fp16, timing is a fixed figure."""
    import kernels.torch_op
    from benchmarks import attention
    from benchmarks.schema import Results

    monkeypatch.setattr(kernels.torch_op, "fused_attention",
                        lambda q, k, v, h: kernels.torch_op.attention_reference(q, k, v, h).to(q.dtype))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    ms = {"n": 0}

    def fake_time(fn, warmup, iters, graph):  # the first implementation timed (ours) is the fastest
        ms["n"] += 1
        return (0.5 if ms["n"] == 1 else 1.0), "cuda_graph"

    monkeypatch.setattr(attention, "_time", fake_time)
    results = Results(suite="attention")
    speedup = attention.measure_shape(results, "sd15", 64, 77, 2, 40, "float16", device="cpu", iters=3)
    assert speedup == pytest.approx(2.0)
    rows = {(r["config"]["impl"], r["metric"]): r for r in results.rows}
    assert set(rows[("ours", "ms")]["config"]) == {"model", "tokens", "kv_tokens", "heads", "head_dim", "dtype", "impl"}
    assert rows[("ours", "max_abs_err")]["value"] < 2e-3 and rows[("ours", "ms")]["timing"] == "cuda_graph"
    assert rows[("ours", "tflops")]["value"] == pytest.approx(4 * 2 * 2 * 64 * 77 * 40 / 0.5 / 1e9)
    assert rows[("ours", "speedup_vs_best_sdpa")]["best_sdpa"] in {"sdpa_flash", "sdpa_math"}  # forced ones only
    assert rows[("sdpa_default", "ms")]["sdpa_backend"] in {"flash", "efficient", "cudnn", "math"}
    assert rows[("sdpa_math", "max_abs_err")]["value"] < 2e-3
    skipped = {r["config"]["impl"]: r["skipped"] for r in results.rows if r.get("skipped")}
    assert skipped.get("sdpa_cudnn") and ("sdpa_cudnn", "ms") not in rows  # no cuDNN attention on the CPU: a reason
    table = attention.table(results.rows)
    assert "| sd15 | 64 | 77 | 2 | 40 | 0.5000 |" in table and "2.00x vs" in table
    assert attention.goal_line(results.rows) is None
    attention.judge_goal(results, "float16", 1.29)
    assert attention.goal_line(results.rows).endswith("float16: NOT met (1.29x)")  # type: ignore[union-attr]
    assert attention.table(results.rows) == table  # the goal row is no shape of its own
    met = Results()
    attention.judge_goal(met, "float16", 1.31)
    assert met.rows[0]["value"] == 1.0 and met.rows[0]["config"]["tokens"] == 4096
    attention.judge_goal(met, "float16", None, "our kernel is unavailable: no GPU")
    assert met.rows[1]["skipped"] == "our kernel is unavailable: no GPU"


# ------------------------------------------------------------------------------- TensorRT plugin
@pytest.mark.skipif(importlib.util.find_spec("tensorrt.plugin") is not None if importlib.util.find_spec("tensorrt") else False,
                    reason="TensorRT is installed")
def test_trt_plugin_import_guard():
    sys.modules.pop("kernels.trt_plugin", None)
    with pytest.raises(ImportError, match=r"TensorRT >= 10\.9"):
        importlib.import_module("kernels.trt_plugin")


def _fake_tensorrt() -> dict[str, types.ModuleType]:
    """Just enough of tensorrt / tensorrt.plugin to run our registration; records what is registered."""
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.float16, trt.bfloat16 = "10.13-fake", "HALF", "BF16"  # type: ignore[attr-defined]
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.registry = {}  # type: ignore[attr-defined]

    def deco(kind: str):
        return lambda plugin_id: (lambda fn: trtp.registry.setdefault(plugin_id, {}).update({kind: fn}) or fn)  # type: ignore[attr-defined]

    trtp.register, trtp.autotune, trtp.aot_impl = deco("register"), deco("autotune"), deco("aot_impl")  # type: ignore[attr-defined]
    for cls in ("TensorDesc", "AutoTuneCombination", "SymExprs"):
        setattr(trtp, cls, type(cls, (), {"__init__": lambda self, *a: setattr(self, "args", a)}))
    trtp.KernelLaunchParams = type("KernelLaunchParams", (), {})  # type: ignore[attr-defined]
    trtp.SymIntExprs = type("SymIntExprs", (list,), {"__init__": lambda self, n: list.__init__(self, [None] * n)})  # type: ignore[attr-defined]
    trtp.SymInt32 = int  # type: ignore[attr-defined]
    trtp.cdiv = lambda a, b: -(-a // b)  # type: ignore[attr-defined]
    return {"tensorrt": trt, "tensorrt.plugin": trtp}


def test_trt_plugin_aot_logic(built: kbuild.Artifacts, monkeypatch: pytest.MonkeyPatch):
    import inspect
    import typing

    fakes = _fake_tensorrt()
    for name, mod in fakes.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "kernels.trt_plugin", raising=False)
    plugin = importlib.import_module("kernels.trt_plugin")
    try:
        plugin.register_plugin()
        reg = fakes["tensorrt.plugin"].registry[contract.PLUGIN_ID]  # type: ignore[attr-defined]
        # the schemas tensorrt.plugin validates: tensors, attributes, (outputs[, tactic])
        assert list(inspect.signature(reg["register"]).parameters) == ["q", "k", "v", "num_heads", "head_dim"]
        assert list(inspect.signature(reg["autotune"]).parameters)[-1] == "outputs"
        sig = inspect.signature(reg["aot_impl"])
        assert list(sig.parameters) == ["q", "k", "v", "num_heads", "head_dim", "outputs", "tactic"]
        assert typing.get_origin(sig.return_annotation) is tuple and len(typing.get_args(sig.return_annotation)) == 4
        desc = types.SimpleNamespace(dtype="HALF", shape_expr=(2, 4096, 320))
        kdesc = types.SimpleNamespace(dtype="HALF", shape_expr=(2, 77, 320))
        name, ptx, launch, extra = reg["aot_impl"](desc, kdesc, kdesc, 8, 40, (desc,), 0)
        cfg = kbuild.kernel_configs(built.ptx.read_text())[40]
        assert name == "sd_attention_fwd_f16_d40" and kbuild.ptx_entries(ptx) == [name]
        assert (launch.grid_x, launch.grid_y, launch.block_x, launch.shared_mem) == (
            math.ceil(4096 / cfg.block_m), 16, cfg.threads, cfg.smem_bytes)
        assert list(extra) == [2, 4096, 77, 8]
        bdesc = types.SimpleNamespace(dtype="BF16", shape_expr=(1, 256, 1280))
        assert reg["aot_impl"](bdesc, bdesc, bdesc, 8, 160, (bdesc,), 0)[0] == "sd_attention_fwd_bf16_d160"
        with pytest.raises(ValueError, match="head_dim"):
            reg["register"](desc, kdesc, kdesc, 8, 48)
    finally:
        sys.modules.pop("kernels.trt_plugin", None)
