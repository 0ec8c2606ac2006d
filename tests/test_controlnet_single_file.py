"""Single-file ControlNets in the original layout (export/control_single_file.py, `engine.build --controlnet FILE`):
seeded random diffusers ControlNets written as one `.safetensors` file in lllyasviel's / A1111's layout by the
reference writer below, converted back to exactly the source weights and residuals (tiny, and tiny-xl with its
added conditioning), built by `engine.build` into a component that gives the source's residuals, cached once; bad
files are named in one line and leave nothing behind."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.control import random_controlnet
from export.control_single_file import prepare_controlnet

SIZE = 64
EMBEDDING = (8, 16, 16, 32)  # the hint block's channels, as tests/test_controlnet.py's nets

# ---- the reference layout: the inverse of diffusers' mapping, written out independently of its code ----

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
         "conv_in": "input_blocks.0.0", "controlnet_mid_block": "middle_block_out.0",
         "controlnet_cond_embedding.conv_in": "input_hint_block.0"}


def original_key(key: str, layers: int, hint_blocks: int) -> str:
    """A ControlNetModel key -> its name in the original `cldm` ControlNet (lllyasviel's ControlNet 1.1 files, as
    sd-webui-controlnet reads them): `input_blocks.<i>` are conv_in (0), then per down block `layers` resnets
    (`.0`, with LDM's ResBlock names) and their attentions (`.1`, same names inside), then its downsampler
    (`.0.op`); `middle_block.{0,1,2}` the mid resnet, attention, resnet; `zero_convs.<k>.0` and
    `middle_block_out.0` the zero convolutions; `input_hint_block.{0, 2, ..}` the hint convolutions (SiLUs between);
    `time_embed.{0,2}` and SDXL's `label_emb.0.{0,2}` the embeddings."""
    module, param = key.rsplit(".", 1)
    parts = module.split(".")
    if module in FIXED:
        return f"{FIXED[module]}.{param}"
    if parts[0] == "down_blocks":
        first, kind, j, rest = 1 + int(parts[1]) * (layers + 1), parts[2], int(parts[3]), parts[4:]
        if kind == "resnets":
            return f"input_blocks.{first + j}.0.{RESNET[rest[0]]}.{param}"
        if kind == "attentions":
            return f"input_blocks.{first + j}.1.{'.'.join(rest)}.{param}"
        return f"input_blocks.{first + layers}.0.op.{param}"  # downsamplers.0.conv
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{RESNET[parts[3]]}.{param}"
        return f"middle_block.1.{'.'.join(parts[3:])}.{param}"
    if parts[0] == "controlnet_down_blocks":
        return f"zero_convs.{parts[1]}.0.{param}"
    if parts[:2] == ["controlnet_cond_embedding", "blocks"]:
        return f"input_hint_block.{2 * int(parts[2]) + 2}.{param}"
    if module == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{2 * hint_blocks + 2}.{param}"
    raise KeyError(key)


def original_state(folder: Path, prefix: str = "control_model.") -> dict[str, torch.Tensor]:
    """The ControlNetModel folder's weights in the original layout, keys under `prefix`."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(folder)
    layers, hints = net.config["layers_per_block"], len(net.controlnet_cond_embedding.blocks)
    return {prefix + original_key(k, layers, hints): v.clone() for k, v in net.state_dict().items()}


def write_file(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def unet_config(folder: Path) -> dict:
    import json

    return json.loads((folder / "unet" / "config.json").read_text())


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_folder) -> Path:
    """A seeded random tiny ControlNetModel folder (named `edges`), its zero convolutions non-zero."""
    return random_controlnet(tiny_folder, tmp_path_factory.mktemp("sf_nets") / "edges", 11, EMBEDDING, std=0.3)


@pytest.fixture(scope="module")
def single(tmp_path_factory, source) -> Path:
    """`source` as one original-layout file (control_model.*), named `edges_file`."""
    return write_file(original_state(source), tmp_path_factory.mktemp("sf_files") / "edges_file.safetensors")


def residuals(net, seed: int, xl: bool) -> tuple[torch.Tensor, ...]:
    """The net's down and mid residuals on a seeded random input (SDXL: with random text and time ids)."""
    g = torch.Generator().manual_seed(seed)
    c = net.config
    extra = {}
    if xl:
        text = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, text, generator=g),
                                       "time_ids": torch.rand(2, 6, generator=g) * 64}}
    with torch.no_grad():
        down, mid = net(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 20.0]),
                        torch.randn(2, 5, c["cross_attention_dim"], generator=g),
                        torch.rand(2, 3, SIZE, SIZE, generator=g), return_dict=False, **extra)
    return (*down, mid)


@pytest.mark.parametrize("model,prefix", [("tiny", "control_model."), ("tiny-xl", "")])
def test_conversion_gives_the_source_weights_and_residuals(tmp_path, tiny_folder, xl_folder, model, prefix):
    from diffusers import ControlNetModel

    base = tiny_folder if model == "tiny" else xl_folder
    src = random_controlnet(base, tmp_path / "src" / "net", 21, EMBEDDING, std=0.3)
    file = write_file(original_state(src, prefix), tmp_path / "net.safetensors")
    folder = prepare_controlnet(file, unet_config(base), model)
    want, got = ControlNetModel.from_pretrained(src), ControlNetModel.from_pretrained(folder)
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    torch.testing.assert_close(residuals(got, 3, model != "tiny"), residuals(want, 3, model != "tiny"))
    if model == "tiny":
        assert "add_embedding.linear_1.weight" not in b
    else:
        assert got.config["addition_embed_type"] == "text_time"  # SDXL: label_emb -> add_embedding


def test_conversion_is_cached_and_reused(engine_cache, single, tiny_folder):
    first = prepare_controlnet(single, unet_config(tiny_folder), "tiny")
    weights = first / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns, (first / "config.json").stat().st_mtime_ns
    assert first.parent == engine_cache / "controlnets" and first.name.startswith("edges_file-")
    again = prepare_controlnet(single, unet_config(tiny_folder), "tiny")
    assert again == first
    assert (weights.stat().st_mtime_ns, (first / "config.json").stat().st_mtime_ns) == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".edges_file-") and ".lock" not in p.name]


def test_build_with_the_file_runs_the_source_net(tmp_path, source, single):
    """`python -m engine.build --controlnet FILE` builds component `controlnet.<stem>`, and its ONNX Runtime
    artifact gives the source folder's torch residuals. Compared at the component level: an engine set that can
    generate (UNet, VAE) costs a minute of export on 2 cores; the generation path of a ControlNet folder is
    tests/test_controlnet.py's, and the converted folder is one (its weights equal the source's, above)."""
    import json

    import onnxruntime as ort
    from diffusers import ControlNetModel

    from engine import build

    engine_dir = tmp_path / "engines"
    assert build.main(["--model", "tiny", "--backend", "onnxruntime", "--precision", "fp32", "--height", str(SIZE),
                       "--width", str(SIZE), "--engine-dir", str(engine_dir), "--components", "clip",
                       "--controlnet", str(single)]) == 0
    record = json.loads(next(engine_dir.glob("*/build.json")).read_text())
    assert record["controls"] == ["edges_file"]
    artifact = engine_dir / record["model_id"] / record["components"]["controlnet.edges_file"]["dir"]
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(7)
    feed = {"sample": torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g), "timestep": torch.tensor([500.0, 20.0]),
            "encoder_hidden_states": torch.randn(2, 77, 32, generator=g),
            "controlnet_cond": torch.rand(2, 3, SIZE, SIZE, generator=g)}
    got = session.run(None, {k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        down, mid = ControlNetModel.from_pretrained(source)(*feed.values(), return_dict=False)
    want = [x.numpy() for x in (*down, mid)]
    assert [o.name for o in session.get_outputs()] == [f"down_residual_{k}" for k in range(len(down))] + ["mid_residual"]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert min(float(np.abs(x).max()) for x in want) > 0.01  # every residual is non-zero: not a vacuous comparison


def test_a_shuffle_file_pools_its_residuals(tmp_path, source, tiny_folder):
    """ControlNet 1.1's shuffle pools its residuals globally; a single file says so only by its name (`*_shuffle`,
    `*_shuffle_fp16`), as ComfyUI and Forge read it."""
    import json

    state = original_state(source)
    for stem, pooled in (("edges_shuffle_fp16", True), ("edges", False)):
        folder = prepare_controlnet(write_file(state, tmp_path / f"{stem}.safetensors"), unet_config(tiny_folder),
                                    "tiny")
        assert json.loads((folder / "config.json").read_text())["global_pool_conditions"] is pooled, stem


def test_a_full_controlnet_1_0_checkpoint_keeps_only_its_control_model(tmp_path, source, single, tiny_folder):
    """ControlNet 1.0's checkpoints carry the SD model they were trained with beside `control_model.*`: ignored."""
    from safetensors.torch import load_file

    full = {**original_state(source), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(2), "cond_stage_model.transformer.x": torch.zeros(1)}
    folder = prepare_controlnet(write_file(full, tmp_path / "full.safetensors"), unet_config(tiny_folder), "tiny")
    plain = prepare_controlnet(single, unet_config(tiny_folder), "tiny")
    a, b = (load_file(str(f / "diffusion_pytorch_model.safetensors")) for f in (folder, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad files: one line naming the file, as a ValueError and as `engine.build` exit 2; nothing written ----


def _lora_like(src: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 64, generator=g),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(64, 4, generator=g)}


def _wider_text(src: Path) -> dict[str, torch.Tensor]:
    """Made for a 64-wide text encoder: attn2.to_k / to_v read 64 channels where tiny's read 32."""
    state = original_state(src)
    return {k: torch.zeros(v.shape[0], 64) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else v
            for k, v in state.items()}


def _without(key: str):
    return lambda src: {k: v for k, v in original_state(src).items() if k != key}


def _with(key: str, value: torch.Tensor):
    return lambda src: {**original_state(src), key: value}


BAD = {
    "lora": (_lora_like, "is not a ControlNet in the original layout: no 'input_hint_block.0.weight'"),
    "cross_attention": (_wider_text, "was made for another base model: its cross_attention_dim is 64, the UNet of "
                                     "tiny has 32"),
    "missing": (_without("control_model.zero_convs.2.0.bias"),
                "does not fit a ControlNetModel for tiny exactly: missing: no tensor for "
                "'controlnet_down_blocks.2.bias'"),
    "extra": (_with("control_model.zero_convs.9.0.weight", torch.zeros(2, 2, 1, 1)),
              "unused: 'control_model.zero_convs.9.0.weight' is not part of a ControlNet"),
    "misshaped": (_with("control_model.zero_convs.1.0.weight", torch.zeros(64, 64, 3, 3)),
                  "misshaped: 'control_model.zero_convs.1.0.weight' is [64, 64, 3, 3], 'controlnet_down_blocks.1."
                  "weight' needs [64, 64, 1, 1]"),
    "stray": (_with("lora_te_text_model.weight", torch.zeros(2)), "tensor 'lora_te_text_model.weight' (1 such) is "
                                                                  "neither under 'control_model.'"),
}


def _bad_file(kind: str, src: Path, folder: Path) -> tuple[Path, str]:
    if kind == "pickled":
        path = folder / "bad_pickled.pth"
        path.write_bytes(b"\x80\x04K\x01.")  # a pickle: never loaded
        return path, "pickled files"
    if kind == "truncated":
        whole = write_file(original_state(src), folder / "whole.safetensors").read_bytes()
        path = folder / "bad_truncated.safetensors"
        path.write_bytes(whole[: len(whole) // 2])
        return path, "is not a readable .safetensors file"
    make, words = BAD[kind]
    return write_file(make(src), folder / f"bad_{kind}.safetensors"), words


@pytest.mark.parametrize("kind", ["pickled", "truncated", *BAD])
def test_bad_files_are_named_in_one_line(engine_cache, tmp_path, tiny_folder, source, capsys, kind):
    import re

    from engine import build

    path, words = _bad_file(kind, source, tmp_path)
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        prepare_controlnet(path, unet_config(tiny_folder), "tiny")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not list((engine_cache / "controlnets").glob(f"{path.stem}-*"))  # nothing half-built, nothing at all
    capsys.readouterr()
    assert build.main(["--model", "tiny", "--backend", "onnxruntime", "--engine-dir", str(tmp_path / "e"),
                       "--controlnet", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and words in err, err
    assert not (tmp_path / "e").exists()  # refused before any work


def test_a_file_for_another_base_model_is_refused_naming_both_values(single, xl_folder):
    with pytest.raises(ValueError, match=r"was made for another base model: its block_out_channels is \[64, 128\], "
                                         r"the UNet of tiny-xl has \[32, 64\]"):
        prepare_controlnet(single, unet_config(xl_folder), "tiny-xl")
