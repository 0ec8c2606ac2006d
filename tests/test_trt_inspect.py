"""Engine-inspector JSON parser, ONNX summary and engine/manifest compatibility checks (no TensorRT, no GPU).

The TensorRT backend's profile, runtime and integration tests are in tests/test_trt_backend.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.backends import tensorrt as tb
from engine.backends.tensorrt import build as trt_build
from engine.backends.tensorrt import inspect as trt_inspect
from kernels import contract
from tests.helpers import TRT_ENV, built_manifest

DATA = Path(__file__).parent / "data"

# ---- engine compatibility -------------------------------------------------------------------------------


def test_same_environment_is_compatible():
    assert tb.check_compat(built_manifest(), dict(TRT_ENV)) is None


def test_other_tensorrt_version_is_refused_with_both_versions():
    msg = tb.check_compat(built_manifest(), {**TRT_ENV, "version": "10.14.1.48"})
    assert msg and "10.13.0.35" in msg and "10.14.1.48" in msg and "--force-rebuild" in msg


def test_other_compute_capability_is_refused_with_both_values():
    msg = tb.check_compat(built_manifest(), {**TRT_ENV, "compute_capability": "8.9", "gpu": "NVIDIA L4"})
    assert msg and "9.0" in msg and "8.9" in msg and "NVIDIA L4" in msg and "rebuild" in msg


def test_other_plugin_ptx_is_refused_with_both_hashes():
    msg = tb.check_compat(built_manifest(), {**TRT_ENV, "plugin_ptx_sha256": "b" * 64})
    assert msg and "a" * 64 in msg and "b" * 64 in msg and "rebuild" in msg


def test_engine_with_plugin_loads_when_the_plugin_module_is_absent():
    # AOT plugin engines embed their PTX: without kernels.trt_plugin there is nothing to compare against.
    assert tb.check_compat(built_manifest(), {**TRT_ENV, "plugin_ptx_sha256": None}) is None


def test_engine_without_plugin_ignores_the_plugin_hash():
    assert tb.check_compat(built_manifest(plugin_ptx_sha256=None), {**TRT_ENV, "plugin_ptx_sha256": "c" * 64}) is None


def test_same_gpu_arch_with_another_name_is_compatible():
    assert tb.check_compat(built_manifest(), {**TRT_ENV, "gpu": "NVIDIA H100 PCIe"}) is None


def test_manifest_without_build_record_is_refused():
    msg = tb.check_compat({"key": "abc"}, dict(TRT_ENV))
    assert msg and "rebuild" in msg


def test_all_problems_are_listed_in_one_message():
    msg = tb.check_compat(built_manifest(), {**TRT_ENV, "version": "11.0.0", "compute_capability": "10.0"})
    assert msg and "11.0.0" in msg and "10.0" in msg and msg.count("\n") == 0


def test_plugin_ptx_hash_comes_from_the_built_ptx(tmp_path, monkeypatch):
    import hashlib

    from kernels import build as kernel_build

    def no_plugin_module():
        raise ImportError("no tensorrt")

    ptx = tmp_path / "attention.ptx"
    ptx.write_text(".version 9.0\n.target sm_80\n")
    monkeypatch.setattr(trt_build, "plugin_module", no_plugin_module)
    monkeypatch.setattr(kernel_build, "find_artifacts", lambda ptx_only=False: kernel_build.Artifacts(tmp_path, ptx, None))
    assert trt_build.plugin_ptx_sha256() == hashlib.sha256(ptx.read_bytes()).hexdigest()
    monkeypatch.setattr(kernel_build, "find_artifacts", lambda ptx_only=False: None)
    assert trt_build.plugin_ptx_sha256() is None


# ---- precision and attention decisions -----------------------------------------------------------------


@pytest.mark.parametrize("version, precision, expected", [
    ("10.13.0.35", "fp16", (False, True)),  # weak typing + FP16 flag on 10.x
    ("10.6.0", "fp32", (False, False)),
    ("11.0.0.1", "fp16", (True, False)),  # strongly typed, no flag: precision comes from the ONNX
    ("11.4.1", "fp32", (True, False)),
])
def test_network_typing(version, precision, expected):
    assert trt_inspect.network_typing(version, precision) == expected


def test_onnx_attention_needs_tensorrt_10_14():
    assert "10.14" in (trt_inspect.attention_mode_error("onnx", "10.13.0.35") or "")
    assert trt_inspect.attention_mode_error("onnx", "10.14.1.48") is None
    assert trt_inspect.attention_mode_error("onnx", "11.0.0") is None
    assert trt_inspect.attention_mode_error("decomposed", "10.6.0") is None
    assert "unknown" in (trt_inspect.attention_mode_error("flash", "10.13.0") or "")


# ---- engine inspector JSON ------------------------------------------------------------------------------


def test_inspector_counts_fused_plugged_and_opaque_layers():
    s = trt_inspect.summarize((DATA / "trt_engine_info_sample.json").read_text(), contract.PLUGIN_NAME)
    assert (s.layers, s.fused, s.plugged, s.other_plugins, s.opaque, s.detailed) == (9, 2, 1, 1, 1, True)
    assert s.to_json()["plugged"] == 1


def test_inspector_does_not_count_attention_named_onnx_layers():
    layers = [{"Name": "/down_blocks.0/attentions.0/transformer_blocks.0/attn1/MatMul", "LayerType": "gemm",
               "Metadata": "[ONNX Layer: /down_blocks.0/attentions.0/attn1/Softmax]"}]
    assert trt_inspect.summarize({"Layers": layers}, contract.PLUGIN_NAME).fused == 0


def test_inspector_names_only_format():
    s = trt_inspect.summarize(json.dumps({"Layers": ["/conv_in/Conv", "_gemm_mha_v2_myl0_1"], "Bindings": []}),
                              contract.PLUGIN_NAME)
    assert (s.layers, s.fused, s.plugged, s.detailed) == (2, 1, 0, False)


def test_inspector_tensorrt_11_io_tensors():
    info = {"Layers": [], "I/O Tensors": [{"Name": "sample", "IOMode": "Input"}, {"Name": "latent", "IOMode": "Output"}]}
    assert trt_inspect.io_tensor_names(info) == ["sample", "latent"]
    assert trt_inspect.io_tensor_names((DATA / "trt_engine_info_sample.json").read_text())[-1] == "latent"


def test_inspector_attention_layer_type_counts_as_fused():
    layers = [{"Name": "attn_0", "LayerType": "Attention"}, {"Name": "x", "ParameterType": "Attention"}]
    assert trt_inspect.summarize({"Layers": layers}, contract.PLUGIN_NAME).fused == 2


def test_inspector_rejects_a_non_list():
    with pytest.raises(ValueError):
        trt_inspect.parse_layers({"Layers": "oops"})


def test_plugin_build_without_plugin_layer_is_an_error():
    none = trt_inspect.summarize({"Layers": [{"Name": "x", "LayerType": "PluginV2"}]}, contract.PLUGIN_NAME)
    msg = trt_inspect.plugin_build_error(none, contract.PLUGIN_NAME, expected=12)
    assert msg and contract.PLUGIN_NAME in msg and "12" in msg and "1 other plugin" in msg
    assert "no plugin node" in (trt_inspect.plugin_build_error(none, contract.PLUGIN_NAME, expected=0) or "")
    ok = trt_inspect.summarize((DATA / "trt_engine_info_sample.json").read_text(), contract.PLUGIN_NAME)
    assert trt_inspect.plugin_build_error(ok, contract.PLUGIN_NAME, expected=1) is None


def test_onnx_summary_counts_attention_nodes(tmp_path):
    from onnx import TensorProto, helper, save

    fp16 = TensorProto.FLOAT16
    nodes = [
        helper.make_node(contract.PLUGIN_NAME, ["q", "k", "v"], ["a"], name="attn_0", domain=contract.PLUGIN_NAMESPACE,
                         **{contract.ATTR_NUM_HEADS: 1}),
        helper.make_node("Attention", ["a", "k", "v"], ["b"], name="attn_1"),
        helper.make_node("Cast", ["b"], ["out"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, fp16, [1, 4, 64]) for n in "qkv"],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(contract.PLUGIN_NAMESPACE, 1)])
    save(model, str(tmp_path / "m.onnx"))
    counts, names, dtypes = trt_inspect.onnx_summary(tmp_path / "m.onnx", contract.PLUGIN_ID)
    assert counts[contract.PLUGIN_ID] == 1 and counts["Attention"] == 1 and names == {"attn_0"}
    assert dtypes == {"q": "float16", "k": "float16", "v": "float16", "out": "float32"}
