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
