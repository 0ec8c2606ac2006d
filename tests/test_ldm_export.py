"""Every graph of the LDM paper's families against its torch module: the ONNX each session fixture's engine dir runs
(ONNX Runtime) vs the component's torch wrapper on the same deterministic inputs (export/onnx_export.py `validate`,
what `python -m export` reports): the VQ decoders with their nearest-codebook quantisation, the class table, LDMBert
(text and layout), the spatial rescaler, the UNets."""
from __future__ import annotations

import pytest

from engine import cache
from export.families import detect_family
from export.models import default_size, folder_dims, load_component, resolve_model
from export.onnx_export import validate
from export.specs import Shape

ENGINES = {"tiny-ldm-sr": "ldm_sr_engines", "tiny-ldm-uncond": "ldm_uncond_engines",
           "tiny-ldm-cin": "ldm_class_engines", "tiny-ldm-text": "ldm_text_engines",
           "tiny-ldm-semantic": "ldm_semantic_engines", "tiny-ldm-layout": "ldm_layout_engines"}


@pytest.mark.parametrize("preset", list(ENGINES))
def test_every_graph_matches_torch(preset, request):
    engine_dir = request.getfixturevalue(ENGINES[preset])
    folder = resolve_model(preset)[0]
    family, dims = detect_family(folder), folder_dims(folder)
    record = cache.read_record(engine_dir / preset / cache.BUILD_RECORD)
    assert set(family.txt2img_components) <= set(record["components"])
    size = default_size(folder)
    for name, entry in record["components"].items():
        graph = engine_dir / preset / entry["dir"] / "model.onnx"
        module = load_component(folder, name, family=family)
        err = validate(module, family.spec(name), dims, graph, Shape(1, size, size))
        assert err <= 1e-4, (name, err)


def test_tensorrt_profiles_of_the_ldm_graphs():
    """What a TensorRT build of each LDM family would give its optimisation profile (no TensorRT here: the shapes
    only), dynamic to 512² at batch 2: every input of every component has lo <= opt <= hi, the per-row condition
    inputs follow the batch (guidance doubles the class ids), the maps follow the size."""
    from engine.build import make_profile
    from engine.config import BuildConfig

    cfg = BuildConfig(build_dynamic_shape=True, max_size=512, max_batch=2)
    for preset in ENGINES:
        folder = resolve_model(preset)[0]
        family, dims = detect_family(folder), folder_dims(folder)
        profile = make_profile(cfg, dims, default_size(folder), 32, 512, static=True)
        shapes = {name: family.spec(name).profile(dims, profile.lo, profile.opt, profile.hi) for name in family.specs}
        for name, inputs in shapes.items():
            for tensor, (lo, opt, hi) in inputs.items():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), (preset, name, tensor)
        f = dims.vae_scale
        assert shapes["unet"]["sample"][2][2:] == (512 // f, 512 // f), preset
    cin, layout, semantic = (folder_dims(resolve_model(p)[0]) for p in ("tiny-ldm-cin", "tiny-ldm-layout",
                                                                       "tiny-ldm-semantic"))
    assert detect_family(resolve_model("tiny-ldm-cin")[0]).spec("class_embedder").profile(
        cin, *_range(cfg, cin))["class_ids"][2] == (4,)  # [2B]: the unconditional rows too
    assert detect_family(resolve_model("tiny-ldm-layout")[0]).spec("layout_encoder").profile(
        layout, *_range(cfg, layout))["layout_tokens"][2] == (2, 92)
    assert detect_family(resolve_model("tiny-ldm-semantic")[0]).spec("semantic_encoder").profile(
        semantic, *_range(cfg, semantic))["labels"][2] == (2, 1, 512, 512)


def _range(cfg, dims):
    from engine.build import make_profile

    p = make_profile(cfg, dims, 64, 32, 512, static=True)
    return p.lo, p.opt, p.hi
