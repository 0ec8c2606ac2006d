"""Export core on `tiny`: every component's ONNX vs its torch module in ONNX Runtime, three attention modes."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import ExportOptions, example_inputs, export_component, run_onnx
from export.specs import COMPONENTS, get_spec
from kernels import contract
from tests.helpers import EXPORT_SHAPES, check_graph, check_parity, count_ops


def _attention_modules(module: torch.nn.Module) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for m in module.modules() if isinstance(m, Attention)]


@pytest.fixture(scope="module")
def decomposed(tiny_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_decomposed")
    infos = {c: export_component(tiny_fp32, c, out / f"{c}.onnx", ExportOptions()) for c in COMPONENTS}
    return out, infos


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_matches_torch(tiny_fp32, decomposed, name):
    out, infos = decomposed
    path = out / f"{name}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    check_graph(path, get_spec(name))
    assert infos[name]["opset"] == 18
    check_parity(tiny_fp32, name, path)


def test_decomposed_attention_is_prescaled_softmax(decomposed):
    out, _ = decomposed
    assert count_ops(out / "unet.onnx").get("Softmax", 0) > 0
    assert "Attention" not in count_ops(out / "unet.onnx")


@pytest.mark.parametrize("name", ["unet", "vae_decoder"])
def test_onnx_attention_mode(tiny_fp32, tmp_path, name):
    path = tmp_path / f"{name}.onnx"
    info = export_component(tiny_fp32, name, path, ExportOptions(attention="onnx"))
    ops = count_ops(path)
    module = tiny_fp32.unet if name == "unet" else tiny_fp32.vae
    n_attn = len(_attention_modules(module.decoder if name == "vae_decoder" else module))
    assert info["opset"] == 23
    assert ops.get("Attention") == n_attn and "Softmax" not in ops
    check_parity(tiny_fp32, name, path)


def test_plugin_mode_emits_one_node_per_attention_call(tiny_folder, tmp_path):
    from export.models import load_model

    model = load_model(tiny_folder, dtype=torch.float16)
    path = tmp_path / "unet.onnx"
    export_component(model, "unet", path, ExportOptions(precision="fp16", attention="plugin"))
    g = onnx.load(str(path))
    attn = _attention_modules(model.unet)
    nodes = [n for n in g.graph.node if n.op_type == contract.PLUGIN_NAME]
    assert len(nodes) == len(attn) > 0
    assert "Softmax" not in count_ops(path)
    assert any(o.domain == contract.PLUGIN_NAMESPACE for o in g.opset_import)
    shapes = {v.name: v.type.tensor_type for v in list(g.graph.value_info) + list(g.graph.output)}
    heads = sorted((m.heads, m.inner_dim // m.heads) for m in attn)
    got = []
    for n in nodes:
        assert n.domain == contract.PLUGIN_NAMESPACE and len(n.input) == 3 and len(n.output) == 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs[contract.ATTR_PLUGIN_NAMESPACE] == contract.PLUGIN_NAMESPACE.encode()
        assert attrs[contract.ATTR_PLUGIN_VERSION] == contract.PLUGIN_VERSION.encode()
        got.append((attrs[contract.ATTR_NUM_HEADS], attrs[contract.ATTR_HEAD_DIM]))
        for t in (*n.input, n.output[0]):  # fp16 [B, S, H*D]
            tt = shapes[t]
            assert tt.elem_type == onnx.TensorProto.FLOAT16
            assert len(tt.shape.dim) == 3
            assert tt.shape.dim[2].dim_value == attrs[contract.ATTR_NUM_HEADS] * attrs[contract.ATTR_HEAD_DIM]
    assert sorted(got) == heads


def test_plugin_mode_leaves_unsupported_head_dims_decomposed(tiny_folder, tmp_path):
    """The tiny VAE's mid-block attention has head dim 32, which the kernel does not serve."""
    from export.models import load_model

    model = load_model(tiny_folder, dtype=torch.float16)
    path = tmp_path / "vae_decoder.onnx"
    export_component(model, "vae_decoder", path, ExportOptions(precision="fp16", attention="plugin"))
    ops = count_ops(path)
    assert f"{contract.PLUGIN_NAMESPACE}::{contract.PLUGIN_NAME}" not in ops
    assert ops.get("Softmax") == len(_attention_modules(model.vae.decoder))


def test_plugin_mode_needs_fp16(tiny_fp32, tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        export_component(tiny_fp32, "unet", tmp_path / "u.onnx", ExportOptions(attention="plugin"))


def test_fp16_export_runs_in_ort(tiny_folder, tmp_path):
    from export.models import component_module, load_model

    model = load_model(tiny_folder, dtype=torch.float16)
    path = tmp_path / "vae_decoder.onnx"
    export_component(model, "vae_decoder", path, ExportOptions(precision="fp16"))
    spec = get_spec("vae_decoder")
    inputs = example_inputs(spec, model.dims, EXPORT_SHAPES[0], "fp16", seed=5)
    got = run_onnx(path, inputs)["images"]
    assert got.dtype == np.float16 and np.isfinite(got).all()
    with torch.no_grad():  # fp32 torch as the reference for an fp16 graph
        ref = component_module(load_model(tiny_folder), "vae_decoder")(**{k: v.float() for k, v in inputs.items()})
    torch.testing.assert_close(torch.from_numpy(got.astype(np.float32)), ref, atol=2e-2, rtol=0)


def test_export_cli_writes_graphs_and_description(tmp_path):
    from export.__main__ import main

    assert main(["--model", "tiny", "--out", str(tmp_path), "--components", "clip,vae_decoder"]) == 0
    report = json.loads((tmp_path / "export.json").read_text())
    assert set(report["components"]) == {"clip", "vae_decoder"}
    for name, info in report["components"].items():
        assert (tmp_path / f"{name}.onnx").is_file()
        assert info["max_abs_err_vs_torch"] <= 1e-4
        assert [i["name"] for i in info["inputs"]] == get_spec(name).input_names
    assert report["options"]["opset"] == 18


def test_export_cli_refuses_pickles(tmp_path, capsys):
    from export.__main__ import main

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    assert main(["--model", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "safetensors" in capsys.readouterr().err
