"""`--backend onnxruntime --precision int8`: dynamic quantization of the weight MatMuls of the fp32 ONNX.

ONNX Runtime's `quantize_dynamic` with `op_types_to_quantize=["MatMul"]`: each MatMul whose second input is
a weight becomes DynamicQuantizeLinear (activations to uint8, scale per call) + MatMulInteger on int8
weights (scale per tensor). Conv is never quantized (the UNet's and VAE's convolutions stay fp32), nor are
MatMuls of two activations (attention scores and their product with V: `MatMulConstBOnly`, the default).
The quantizer rewrites Gemm (the UNet's time-embedding linears) as MatMul + Add first, so those count too.

Our exporter writes linear layers as MatMul(x, Transpose(W)) so that every weight keeps its parameter name;
the quantizer only sees a weight when it is an initializer, so each such Transpose is first folded into a
transposed initializer (`<name>.T`).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any


def fold_weight_transposes(model) -> int:
    """Replace Transpose(initializer) feeding only MatMuls by the transposed initializer; how many were folded."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    graph_outputs = {o.name for o in g.output}
    folded, drop_nodes, drop_inits = 0, [], set()
    for n in g.node:
        if n.op_type != "Transpose" or n.input[0] not in inits or n.output[0] in graph_outputs:
            continue
        users = consumers[n.output[0]]
        if not users or any(u.op_type != "MatMul" or u.input[1] != n.output[0] for u in users):
            continue
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[n.input[0]])
        name = n.input[0] + ".T"
        g.initializer.append(numpy_helper.from_array(w.transpose(perm).copy(), name))
        for u in users:
            u.input[1] = name
        drop_nodes.append(n)
        if all(c is n for c in consumers[n.input[0]]):
            drop_inits.add(n.input[0])
        folded += 1
    for n in drop_nodes:
        g.node.remove(n)
    for i in [i for i in g.initializer if i.name in drop_inits]:
        g.initializer.remove(i)
    for k, n in enumerate(g.node):  # the quantizer names what it makes after its nodes
        if not n.name:
            n.name = f"{n.op_type}_{k}"
    return folded


def _no_preprocess_hint(record: logging.LogRecord) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


def quantize_matmul_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Write `dst` (+ `dst`.data): `src` (fp32 ONNX with external data) with its weight MatMuls in int8."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))  # the weights too
    folded = fold_weight_transposes(model)
    root = logging.getLogger()
    root.addFilter(_no_preprocess_hint)  # the quantizer's advice on static quantization, logged on every call
    try:
        quantize_dynamic(model, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    finally:
        root.removeFilter(_no_preprocess_hint)
    del model
    quantized = onnx.load(str(dst), load_external_data=False)
    ops = [n.op_type for n in quantized.graph.node]
    if "ConvInteger" in ops:  # never: only MatMul is asked for
        raise RuntimeError(f"{dst}: the int8 quantization touched a Conv")
    return {"int8": {"scheme": "dynamic, MatMul with weights only, int8 weights / uint8 activations, per tensor",
                     "folded_transposes": folded, "matmul_integer": ops.count("MatMulInteger"),
                     "matmul_fp32": ops.count("MatMul")}}
