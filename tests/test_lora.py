"""LoRA weights (engine/lora.py) against diffusers' own loader: seeded random adapters on `tiny`, in PEFT/diffusers
and kohya-ss formats, merged by us vs fused by diffusers + PEFT; exact undo; bad inputs."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("peft")

from engine.lora import Adapter, apply, delta, load_lora, merged_weights, parse_adapter  # noqa: E402
from tests.helpers import apply_to_models, fused_pipe, kohya_pair, sd_pipe, write_kohya, write_peft  # noqa: E402


@pytest.fixture(scope="module")
def loras(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("loras")
    return {"peft_a": write_peft(tiny_folder, out, 1, alpha=8, metadata=True),
            "peft_b": write_peft(tiny_folder, out, 2, alpha=2, metadata=False),
            "kohya_a": write_kohya(out, 3, r=4, alpha=2.0),
            "kohya_b": write_kohya(out, 4, r=2, alpha=4.0)}


def _ours(folder: Path, adapters: list[tuple[Path, float]]):
    pipe = sd_pipe(folder)
    handle = apply_to_models({"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                             [(load_lora(p), s) for p, s in adapters])
    return pipe, handle


def _params(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.detach().clone() for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).named_parameters()}


CASES = {
    "peft-one": [("peft_a", 1.0)],
    "peft-two": [("peft_a", 0.7), ("peft_b", -0.4)],
    "kohya-one": [("kohya_a", 1.0)],
    "kohya-two": [("kohya_a", 0.5), ("kohya_b", 1.3)],
    "mixed": [("peft_b", 0.8), ("kohya_a", 0.6)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_diffusers_fuse(case, tiny_folder, loras):
    adapters = [(loras[k], s) for k, s in CASES[case]]
    want = _params(fused_pipe(tiny_folder, adapters))
    base = _params(sd_pipe(tiny_folder))
    ours, handle = _ours(tiny_folder, adapters)
    got = _params(ours)
    assert want.keys() == got.keys()
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert any(k.startswith("unet.") for k in changed) and any(k.startswith("text_encoder.") for k in changed)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    handle.unapply()
    after = _params(ours)
    assert all(torch.equal(after[k], base[k]) for k in base)


def test_pipeline_image_matches_diffusers(tiny_folder, loras):
    adapters = [(loras["peft_a"], 0.9), (loras["kohya_b"], 0.7)]
    run = dict(prompt="a red fox in snow", height=64, width=64, num_inference_steps=4, output_type="np")
    want = fused_pipe(tiny_folder, adapters)(generator=torch.Generator().manual_seed(0), **run).images
    ours, handle = _ours(tiny_folder, adapters)
    got = ours(generator=torch.Generator().manual_seed(0), **run).images
    assert abs(got - want).max() <= 2 / 255
    handle.unapply()
    base = sd_pipe(tiny_folder)(generator=torch.Generator().manual_seed(0), **run).images
    again = ours(generator=torch.Generator().manual_seed(0), **run).images
    assert (again == base).all()
    assert abs(got - base).max() > 2 / 255  # the adapters do change the image


def test_load_lora_layout(loras):
    w = load_lora(loras["kohya_a"])
    assert w.name == "kohya_3"
    assert w.digest == hashlib.sha256(loras["kohya_a"].read_bytes()).hexdigest()[:12]
    assert set(w.parts) == {"unet", "text_encoder"}
    q = w.parts["unet"].modules["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q.down.shape == (4, 64) and q.up.shape == (64, 4) and q.factor == pytest.approx(0.5)
    conv = w.parts["unet"].modules["down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape == (4, 64, 3, 3) and conv.up.shape == (64, 4, 1, 1)
    assert any(k.endswith("encoder.layers.0.self_attn.q_proj") for k in w.parts["text_encoder"].modules)
    peft = load_lora(loras["peft_a"]).parts["unet"].modules
    assert {m.factor for m in peft.values()} == {2.0}  # lora_alpha 8 / r 4 from the file's PEFT metadata
    assert {m.factor for m in load_lora(loras["peft_b"]).parts["unet"].modules.values()} == {1.0}  # no alpha: r


def test_delta_shapes():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, generator=g), torch.randn(5, 3, generator=g)
    torch.testing.assert_close(delta((5, 8), a, b, 0.5), 0.5 * b @ a)
    a4, b4 = torch.randn(3, 8, 3, 3, generator=g), torch.randn(5, 3, 1, 1, generator=g)
    conv = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.ones(1, 8, 5, 5), a4), b4)
    d = delta((5, 8, 3, 3), a4, b4, 1.0)
    torch.testing.assert_close(torch.nn.functional.conv2d(torch.ones(1, 8, 5, 5), d), conv, rtol=1e-4, atol=1e-4)
    assert delta((5, 8, 1, 1), a, b, 1.0).shape == (5, 8, 1, 1)
    assert delta((5, 8), a.half(), b.half(), 1.0).dtype == torch.float32
    with pytest.raises(ValueError, match="does not fit"):
        delta((5, 9), a, b, 1.0)


def test_merge_and_undo_on_plain_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Conv2d(4, 6, 3)).to(torch.bfloat16)
    from engine.lora import LoraModule, LoraPart

    part = LoraPart("x", "unet", {"0": LoraModule(torch.randn(2, 8), torch.randn(5, 2), 0.5),
                                  "1": LoraModule(torch.randn(2, 4, 3, 3), torch.randn(6, 2, 1, 1), 1.0)})
    base = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_weights(model, [(part, 2.0)])
    assert set(merged) == {"0.weight", "1.weight"} and all(v.dtype == torch.bfloat16 for v in merged.values())
    with apply(model, [(part, 2.0)]):
        assert all(torch.equal(model.state_dict()[k], merged[k]) for k in merged)
    assert all(torch.equal(model.state_dict()[k], base[k]) for k in base)


def test_parse_adapter(tmp_path):
    f = tmp_path / "style.safetensors"
    f.write_bytes(b"")
    assert parse_adapter(str(f)) == Adapter(f, 1.0)
    assert parse_adapter(f"{f}:0.6") == Adapter(f, 0.6)
    assert parse_adapter(f"{f}:-1e-1") == Adapter(f, -0.1)
    colon = tmp_path / "a:b.safetensors"
    colon.write_bytes(b"")
    assert parse_adapter(str(colon)) == Adapter(colon, 1.0)
    assert parse_adapter(f"{colon}:2") == Adapter(colon, 2.0)


@pytest.mark.parametrize("text, match", [
    ("model.ckpt", "pickle"), ("lora.bin:0.5", "pickle"), ("x.pt", "pickle"), ("x.pth", "pickle"),
    ("x.pkl", "pickle"), ("notes.txt", "expected a .safetensors"), ("gone.safetensors", "no such file"),
    ("gone.safetensors:nan", "not a finite"), ("gone.safetensors:inf", "not a finite"), (":0.5", "no file"),
])
def test_parse_adapter_errors(text, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match) as e:
        parse_adapter(text)
    assert text.split(":")[0] in str(e.value)


def test_adapter_for_another_architecture(tiny_folder, tmp_path):
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    kohya_pair(sd, "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64, 2, 1, g)
    path = tmp_path / "other.safetensors"
    save_file(sd, str(path))
    pipe = sd_pipe(tiny_folder)
    base = _params(pipe)
    with pytest.raises(ValueError, match=r"down_blocks\.3\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q"):
        apply_to_models({"unet": pipe.unet}, [(load_lora(path), 1.0)])
    wide: dict[str, torch.Tensor] = {}  # right module, wrong width (SD1.5's 320 channels)
    kohya_pair(wide, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320, 2, 1, g)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"attn1\.to_q.*does not fit"):
        apply_to_models({"unet": pipe.unet}, [(load_lora(tmp_path / "wide.safetensors"), 1.0)])
    with pytest.raises(ValueError, match="no text_encoder"):
        apply_to_models({"unet": pipe.unet}, [(load_lora(write_kohya(tmp_path, 5, 2, 1.0)), 1.0)])
    assert all(torch.equal(v, base[k]) for k, v in _params(pipe).items())  # a refused adapter touches nothing


def test_unknown_modules_are_counted_and_ignored(tiny_folder, tmp_path):
    """Some modules the model lacks: those are ignored with a warning counting them; the rest still merge."""
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    kohya_pair(sd, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64, 2, 2, g)
    kohya_pair(sd, "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64, 2, 2, g)
    save_file(sd, str(tmp_path / "partly.safetensors"))
    pipe = sd_pipe(tiny_folder)
    with pytest.warns(UserWarning, match=r"1 of 2 unet modules match nothing .*down_blocks\.3"):
        merged = merged_weights(pipe.unet, [(load_lora(tmp_path / "partly.safetensors").parts["unet"], 1.0)])
    assert list(merged) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
