"""Do the random full-size presets stay finite in fp16? Largest activation of every module, in fp32.

    python -m benchmarks.fp16_range [--presets sd15,sd21]

Runs clip, unet and vae_decoder of each preset once at its default size (fp32, CPU) with forward
hooks that record the largest |activation| any module produces; fp16 overflows past 65504. Writes
rows of the common schema (benchmarks/schema.py) to benchmarks/results/. Not part of CI (minutes on a CPU).
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import RESULTS
from benchmarks.schema import Results

FP16_MAX = 65504.0


def largest_activation(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst = [0.0, ""]

    def hook(mod, args, out, name=""):
        t = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            m = float(t.detach().abs().max())
            if m > worst[0]:
                worst[:] = [m, name]

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in module.named_modules()]
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        for h in handles:
            h.remove()
    return worst[0], worst[1]


def main(argv: list[str] | None = None) -> int:
    from export.models import component_module, default_size, load_model
    from export.onnx_export import example_inputs
    from export.specs import TXT2IMG_COMPONENTS, Shape, get_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="sd15,sd21")
    a = p.parse_args(argv)
    rows = []
    results = Results(suite="fp16-range")
    for preset in a.presets.split(","):
        model = load_model(preset)
        size = default_size(model.path)
        for name in TXT2IMG_COMPONENTS:
            inputs = example_inputs(get_spec(name), model.dims, Shape(1, size, size), "fp32", seed=0)
            peak, where = largest_activation(component_module(model, name), inputs)
            rows.append({"preset": preset, "component": name, "size": size, "max_abs_activation": peak,
                         "module": where, "fits_fp16": peak < FP16_MAX})
            results.add("fp16_range", {"model": preset, "component": name, "size": size}, "max_abs_activation",
                        peak, "abs", module=where, fits_fp16=peak < FP16_MAX)
            print(rows[-1], flush=True)
        del model
    dest = results.write(RESULTS)
    print(f"wrote {dest}")
    return 0 if all(r["fits_fp16"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
