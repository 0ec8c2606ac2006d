"""What ControlNet costs per denoise step: the UNet of an engine set built without ControlNets, the same UNet built
with one (its residual inputs fed zeros: a request without control), and that UNet plus its ControlNet (a request
with control), interleaved in one process (call i of every variant before call i+1 of any).

One classifier-free-guidance step of one image (batch 2), ONNX Runtime fp32 on the CPU, a seeded random ControlNet
(export.control.random_controlnet) for the model. Rows: `step_ms_p50/p90/p99/mean` per variant and `time_vs_plain`
(p50 over the plain UNet's p50, same run); `plain_spread` (the plain UNet's p90 over its p50) says how much noise
the run had. Writes benchmarks/results/<stamp>-controlnet-step-<cpu>.json.

    python -m benchmarks.controlnet_step --model sd15 --size 256
"""
from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import step_cost

VARIANTS = ("plain", "control built, no control", "unet + controlnet")


def _runners(model: str, engine_root: Path, net: Path):
    """(plain UNet, control-built UNet, ControlNet) runners of fresh or cached ONNX Runtime fp32 builds."""
    from engine import cache
    from engine.backends.base import get_backend
    from engine.build import build_all
    from engine.config import BuildConfig
    from export.control import PREFIX, with_controls
    from export.families import get_family
    from export.specs import Dims

    backend = get_backend("onnxruntime")
    out = []
    for sub, nets in (("plain", ()), ("control", (str(net),))):
        record = build_all(BuildConfig(model=model, backend="onnxruntime", precision="fp32", components=("unet",),
                                       engine_dir=engine_root / sub, controlnets=nets), progress=False).record
        dims = Dims(**record["dims"])
        family = with_controls(get_family(record["family"]), tuple(record.get("controls", ())), dims)
        for name, entry in record["components"].items():
            art = engine_root / sub / record["model_id"] / entry["dir"]
            runner = backend.load(family.spec(name), art, cache.verify(art), "cpu")
            out.append((sub, name.startswith(PREFIX), runner, dims))
    plain = next(r for sub, _, r, _ in out if sub == "plain")
    unet = next(r for sub, is_net, r, _ in out if sub == "control" and not is_net)
    controlnet = next(r for _, is_net, r, _ in out if is_net)
    return plain, unet, controlnet, out[-1][3]


def measure(model: str, size: int, runs: int, engine_root: Path) -> dict[str, list[float]]:
    import torch

    from engine.control import ControlStep
    from export.control import random_controlnet
    from export.models import resolve_model
    from export.onnx_export import example_inputs
    from export.specs import Shape

    net = random_controlnet(resolve_model(model)[0], engine_root / "nets" / f"{model}-controlnet", seed=0)
    plain, unet, controlnet, dims = _runners(model, engine_root, net)
    inputs = example_inputs(plain.spec, dims, Shape(1, size, size), "fp32", seed=0)  # the UNet's, batch 2 (CFG)
    image = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    zeros = ControlStep((), dims.residual_channels, dims.residual_scales)

    def with_control() -> None:
        out = controlnet(**inputs, controlnet_cond=image)
        unet(**inputs, **{k: v.float() for k, v in out.items()})

    calls = {
        VARIANTS[0]: lambda: plain(**inputs),
        VARIANTS[1]: lambda: unet(**inputs, **zeros(inputs["sample"], inputs["timestep"], {}, {}, True)),
        VARIANTS[2]: with_control,
    }
    samples = step_cost.interleave(calls, runs)
    for r in (plain, unet, controlnet):
        r.close()
    return samples


def main(argv: list[str] | None = None) -> int:
    return step_cost.main("controlnet-step", "controlnet_step", measure, argv, __doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main())
