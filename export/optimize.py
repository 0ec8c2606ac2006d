"""ONNX clean-up after export: constant folding, dead-node removal, shape inference.

Done with onnx-graphsurgeon (folding through ONNX Runtime) and onnx's shape inference; graphs over
2 GB keep their weights as external data.
"""
from __future__ import annotations

from pathlib import Path

import onnx

EXTERNAL_DATA_LIMIT = 2 * 1024**3  # protobuf's 2 GB limit: bigger graphs keep weights as external data


def optimize_onnx(path: Path) -> None:
    """Fold constants, drop dead nodes, infer shapes; rewrite `path` in place."""
    import onnx_graphsurgeon as gs

    model = onnx.load(str(path), load_external_data=True)
    graph = gs.import_onnx(model)
    graph.fold_constants(size_threshold=16 * 1024**2).cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)  # keep custom domains (sd_engine) declared
    big = sum(len(t.raw_data) for t in out.graph.initializer) > EXTERNAL_DATA_LIMIT * 0.9
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    if big:
        onnx.save_model(out, str(path), save_as_external_data=True, location=path.name + ".data")
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    else:
        onnx.save_model(onnx.shape_inference.infer_shapes(out), str(path))


def count_ops(path: Path) -> dict[str, int]:
    """op_type (prefixed by its domain when custom) -> count, over the main graph."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts
