"""Memory-lean export (export/lean.py): traced on the meta device, weights streamed from the folder's files.

What makes it lean is checked here on `tiny`; what it saves is measured on the full-size UNets by
`python -m benchmarks.export_memory` (results in benchmarks/results/export-memory-*.json).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file

from export import lean, models
from export.onnx_export import ExportOptions, example_inputs, export_component, run_onnx
from export.specs import Shape, precision_torch_dtype


def _initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _no_trace(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the export traced the model before naming the bad weight")

    monkeypatch.setattr(torch.onnx, "export", refuse)


def _no_model_loads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the lean export loaded a model")

    monkeypatch.setattr(models, "load_submodel", refuse)


@pytest.fixture(scope="module")
def unet_fp32(tiny_folder, tmp_path_factory):
    """(path, info, progress calls) of tiny's UNet exported once in fp32 for the tests below (a trace is the
    slow part): every weight written as external data (limit 0, progress reported) and any model load refused.
    What they check of it holds at any limit."""
    from export import onnx_export

    path = tmp_path_factory.mktemp("unet_fp32") / "unet.onnx"
    done: list[tuple[int, int]] = []
    with pytest.MonkeyPatch.context() as mp:
        _no_model_loads(mp)  # every UNet tensor is in the safetensors file: nothing is loaded
        mp.setattr(onnx_export, "EXTERNAL_DATA_LIMIT", 0)
        mp.setattr(onnx_export, "PROGRESS_BYTES", 0)  # tiny: no bar unless asked
        info = export_component(tiny_folder, "unet", path, ExportOptions(),
                                progress=lambda d, t: done.append((d, t)))
    return path, info, done


def _assert_weights_are_the_files(folder, path, info, precision: str) -> None:
    stored = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    got = {n: v for n, v in _initializers(path).items() if n.startswith("unet.")}  # the rest: folded shapes
    assert info["weights_from"] == {"file": len(stored)}
    # every weight kept, by its torch name, unfolded (a LoRA swap and TensorRT refit address them by name)
    assert set(got) == {f"unet.{k}" for k in stored}
    dtype = precision_torch_dtype(precision)
    for name, value in got.items():
        np.testing.assert_array_equal(value, stored[name.removeprefix("unet.")].to(dtype).numpy(), err_msg=name)
    assert info["weight_bytes"] == sum(v.nbytes for v in got.values())


def test_unet_weights_are_the_files_tensors_under_their_torch_names(tiny_folder, unet_fp32):
    path, info, _ = unet_fp32
    _assert_weights_are_the_files(tiny_folder, path, info, "fp32")


def test_fp16_unet_weights_are_the_files_tensors_cast(tiny_folder, tmp_path, monkeypatch):
    _no_model_loads(monkeypatch)
    path = tmp_path / "unet.onnx"
    info = export_component(tiny_folder, "unet", path, ExportOptions(precision="fp16"))
    _assert_weights_are_the_files(tiny_folder, path, info, "fp16")


def test_folder_export_matches_the_torch_module(tiny_folder, unet_fp32):
    path, _, _ = unet_fp32
    module = models.load_component(tiny_folder, "unet")
    spec = models.detect_family(tiny_folder).spec("unet")
    inputs = example_inputs(spec, models.folder_dims(tiny_folder), Shape(2, 64, 96), "fp32", seed=5)
    with torch.no_grad():
        want = module(**inputs)
    torch.testing.assert_close(torch.from_numpy(run_onnx(path, inputs)["latent"]), want, atol=1e-4, rtol=0)


def test_clip_position_ids_come_from_the_models_own_init(tiny_folder, tmp_path, monkeypatch):
    """CLIP's position_ids is a non-persistent buffer: not in the file, computed by transformers' init,
    without loading the model."""
    _no_model_loads(monkeypatch)
    path = tmp_path / "clip.onnx"
    info = export_component(tiny_folder, "clip", path, ExportOptions())
    assert info["weights_from"]["init"] == 1 and "module" not in info["weights_from"]
    (name,) = [n for n in _initializers(path) if n.endswith("position_ids")]
    np.testing.assert_array_equal(_initializers(path)[name].ravel(), np.arange(_initializers(path)[name].size))


def test_sharded_checkpoint_streams_through_its_index(tiny_folder, tmp_path, monkeypatch):
    """A UNet saved in several safetensors shards (as big checkpoints are) is read through its index."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    unet = models.load_submodel(folder, "unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=True, max_shard_size="200KB")
    shards = sorted((folder / "unet").glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    index = lean.tensor_index(folder / "unet")
    assert len(set(index.values())) == len(shards)
    _no_model_loads(monkeypatch)
    path = tmp_path / "unet.onnx"
    info = export_component(folder, "unet", path, ExportOptions())
    assert info["weights_from"] == {"file": len(index)}
    want = {f"unet.{k}": v.detach().numpy() for k, v in unet.state_dict().items()}
    got = {n: v for n, v in _initializers(path).items() if n.startswith("unet.")}
    assert set(got) == set(want)
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_a_weight_missing_from_the_checkpoint_is_named(tiny_folder, tmp_path, monkeypatch):
    """diffusers would leave a weight its checkpoint lacks uninitialised (random memory); the export refuses."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    stored = load_file(str(file))
    del stored["conv_out.bias"]
    save_file(stored, str(file))
    _no_trace(monkeypatch)  # named before the trace (minutes on a full-size UNet)
    with pytest.raises(ValueError, match=r"the checkpoint lacks 'conv_out.bias' \(unet.conv_out.bias\)"):
        export_component(folder, "unet", tmp_path / "unet.onnx", ExportOptions())


def test_wrong_shape_in_the_file_is_named(tiny_folder, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    stored = load_file(str(file))
    stored["post_quant_conv.bias"] = torch.zeros(3)
    save_file(stored, str(file))
    _no_trace(monkeypatch)
    with pytest.raises(ValueError, match=r"post_quant_conv.bias: stored shape \(3,\) != the model's"):
        export_component(folder, "vae_decoder", tmp_path / "vae_decoder.onnx", ExportOptions())


def test_large_weights_are_written_as_external_data(unet_fp32):
    path, info, done = unet_fp32  # exported with the limit at 0
    assert set(info["files"]) == {"unet.onnx", "unet.onnx.data"}
    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    lengths = [int({e.key: e.value for e in t.external_data}["length"]) for t in proto.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    assert sum(lengths) == info["files"]["unet.onnx.data"]
    inline = [t for t in proto.graph.initializer if t.name.startswith("unet.") and t.name not in external]
    assert all(len(t.raw_data) <= 256 for t in inline)  # onnx_ir keeps only tiny tensors in the proto
    assert external and done[-1] == (len(external), len(external))  # one progress call per external weight
    assert len(done) == len(external)


def test_export_cli_reads_the_folder(tiny_folder, tmp_path):
    from export.__main__ import main

    assert main(["--model", str(tiny_folder), "--components", "vae_decoder", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["components"]["vae_decoder"]["max_abs_err_vs_torch"] < 1e-4
