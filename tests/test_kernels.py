"""Tests of the fused attention kernels (kernels/).

CPU (CI): nvcc build of PTX + fatbin (entry points, ABI, launch configs, no register spills), the
kernel body run through the host emulator (kernels/emu) against an fp32 reference, the torch op's
CPU behaviour and fake implementation, the TensorRT plugin module's import guard and AOT logic.
GPU (@pytest.mark.gpu): correctness on the SD shapes in fp16/bf16 with poisoned outputs, the torch op,
CUDA-graph replay and torch.compile.
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
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import build as kbuild
from kernels import contract

REPO = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


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
    r = subprocess.run([sys.executable, "-m", "kernels.build"], cwd=REPO, env=env, capture_output=True, text=True)
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
    assert not re.search(r"^\s*(import|from)\s+(torch|cuda|tensorrt)", src, re.M), "contract must stay dependency-free"


def test_ptx_entries_and_abi(ptx: str):
    entries = kbuild.ptx_entries(ptx)
    assert sorted(entries) == sorted(contract.all_entry_names())
    for name in entries:
        params = re.search(rf"\.entry\s+{name}\s*\((.*?)\)", ptx, re.S)
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
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    assert len(spills) == len(contract.all_entry_names()) and all(s == "0" for s in spills), r.stderr
    one = kbuild.ptx_for_entry(ptx, "sd_attention_fwd_f16_d40")
    assert kbuild.ptx_entries(one) == ["sd_attention_fwd_f16_d40"] and len(one) < len(ptx) / 10
    (tmp_path / "one.ptx").write_text(one)
    r = subprocess.run([str(ptxas), "-arch=sm_80", str(tmp_path / "one.ptx"), "-o", str(tmp_path / "one.cubin")],
                       capture_output=True, text=True)
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
                        "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


def _lowp_sdpa_err(q, k, v, heads, scale, ref) -> tuple[float, float]:
    """max / mean abs error of plain low-precision torch (SDPA math in q's dtype) vs the fp32 reference.
    On CUDA the math backend upcasts fp16/bf16 to fp32 unless fp16/bf16 reductions are allowed; we
    allow them, so the baseline really is "plain fp16 PyTorch"."""
    b, sq, e = q.shape
    hv = lambda x: x.view(b, x.shape[1], heads, e // heads).transpose(1, 2)  # noqa: E731
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(hv(q), hv(k), hv(v), scale=scale)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)
    diff = (out.transpose(1, 2).reshape(b, sq, e).float() - ref).abs()
    return diff.max().item(), diff.mean().item()


EMU_CASES = [  # dtype, D, B, Sq, Sk, H, scale (None = baked 1/sqrt(D))
    ("float16", 40, 1, 77, 77, 2, None), ("bfloat16", 40, 2, 130, 200, 1, None),
    ("float16", 64, 1, 200, 77, 2, None), ("bfloat16", 64, 1, 16, 129, 1, 0.3),
    ("float16", 80, 1, 130, 33, 1, None), ("bfloat16", 80, 1, 77, 77, 1, None),
    ("float16", 128, 1, 65, 100, 1, 0.05), ("bfloat16", 128, 1, 70, 65, 1, None),
    ("float16", 160, 1, 65, 40, 2, None), ("bfloat16", 160, 1, 33, 77, 1, None),
]


@pytest.mark.parametrize("dtype,d,b,sq,sk,h,scale", EMU_CASES)
def test_emulated_kernel_matches_reference(emulator: Path, tmp_path: Path, dtype, d, b, sq, sk, h, scale):
    from kernels.torch_op import attention_reference

    g = torch.Generator().manual_seed(d * 1000 + sq)
    q, k, v = (torch.randn(b, s, h * d, generator=g).to(DTYPES[dtype]) for s in (sq, sk, sk))
    np.concatenate([t.float().numpy().ravel() for t in (q, k, v)]).tofile(tmp_path / "in.f32")
    tag = contract.DTYPE_TAGS[dtype]
    r = subprocess.run([str(emulator), tag, str(d), str(b), str(sq), str(sk), str(h),
                        "baked" if scale is None else repr(scale), str(tmp_path / "in.f32"), str(tmp_path / "out.f32")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = torch.from_numpy(np.fromfile(tmp_path / "out.f32", dtype=np.float32)).view(b, sq, h * d)
    assert not out.isnan().any(), "some outputs were never written (poisoned with NaN)"
    ref = attention_reference(q, k, v, h, scale)
    err = (out - ref).abs()
    lowp_max, lowp_mean = _lowp_sdpa_err(q, k, v, h, scale, ref)
    assert err.max().item() <= 2 * lowp_max + 1e-4, (err.max().item(), lowp_max)
    assert err.mean().item() <= 2 * lowp_mean + 1e-6, (err.mean().item(), lowp_mean)


def test_emulated_kernel_empty_keys(emulator: Path, tmp_path: Path):
    q = torch.randn(1, 20, 64)
    q.numpy().tofile(tmp_path / "in.f32")
    r = subprocess.run([str(emulator), "f16", "64", "1", "20", "0", "1", "baked", str(tmp_path / "in.f32"),
                        str(tmp_path / "out.f32")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (np.fromfile(tmp_path / "out.f32", dtype=np.float32) == 0).all()


# ------------------------------------------------------------------------------ python, no GPU
def test_imports_without_gpu():
    import kernels
    import kernels.launcher
    import kernels.torch_op  # noqa: F401

    assert callable(kernels.is_available) and callable(kernels.fused_attention)
    assert torch.ops.sd_engine.fused_attention.default._schema.arguments[3].type.kind() == "IntType"
    if not HAS_GPU:
        assert kernels.is_available() is False


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


def test_reference_matches_sdpa_cpu():
    from kernels.torch_op import attention_reference

    g = torch.Generator().manual_seed(0)
    b, sq, sk, h, d = 2, 33, 17, 3, 40
    q, k, v = (torch.randn(b, s, h * d, generator=g) for s in (sq, sk, sk))
    hv = lambda x: x.view(b, x.shape[1], h, d).transpose(1, 2)  # noqa: E731
    for scale in (None, 0.2):
        expect = F.scaled_dot_product_attention(hv(q), hv(k), hv(v), scale=scale).transpose(1, 2).reshape(b, sq, h * d)
        torch.testing.assert_close(attention_reference(q, k, v, h, scale), expect, rtol=1e-5, atol=1e-5)


def test_fake_impl_traces():
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels.torch_op import fused_attention

    with FakeTensorMode():
        q, kv = torch.empty(2, 4096, 320, dtype=torch.float16), torch.empty(2, 77, 320, dtype=torch.bfloat16)
        out = torch.ops.sd_engine.fused_attention(q, kv.half(), kv.half(), 8, 0.125)
        assert out.shape == (2, 4096, 320) and out.dtype == torch.float16
    q = torch.randn(2, 64, 640, dtype=torch.bfloat16)
    gm = make_fx(lambda a, b: fused_attention(a, b, b, 8) + 1, tracing_mode="fake")(q, q[:, :7])
    assert "sd_engine.fused_attention.default" in gm.code


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


# ------------------------------------------------------------------------------------------- GPU
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
    lowp, _ = _lowp_sdpa_err(q, k, v, h, None, ref)
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
        lowp, _ = _lowp_sdpa_err(nq, nk, nv, 8, None, ref)
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
