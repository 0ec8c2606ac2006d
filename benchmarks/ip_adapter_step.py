"""What an IP-Adapter costs per denoise step: the UNet of an engine set built without it, and the UNet of the same
model built with one (export/ip_adapter.py: image projection and one more attention over the image tokens in every
cross-attention), fed a request without an image prompt (zero embeddings, scale 0) and with one (scale 1). The
graph does the same work either way (no branch on the scale), so the two adapted rows should agree; interleaved in
one process (call i of every variant before call i+1 of any).

One classifier-free-guidance step of one image (batch 2), ONNX Runtime fp32 on the CPU, a seeded random adapter
(export.ip_adapter.random_ip_adapter) for the model. Rows: `step_ms_p50/p90/p99/mean` per variant and
`time_vs_plain` (p50 over the plain UNet's p50, same run); `plain_spread` (the plain UNet's p90 over its p50) says
how much noise the run had. The image encoder runs once per request, not per step, and is not timed here (the
random one is far smaller than a real CLIP ViT-H). Writes benchmarks/results/<stamp>-ip-adapter-step-<cpu>.json.

    python -m benchmarks.ip_adapter_step --model sd15 --size 256
"""
from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import step_cost

VARIANTS = ("plain", "ip built, no image prompt", "ip built, image prompt")


def _runner(model: str, engine_dir: Path, adapter: Path | None):
    """The UNet runner and dims of a fresh or cached ONNX Runtime fp32 build (with `adapter`, if given)."""
    from engine import cache
    from engine.backends.base import get_backend
    from engine.build import build_all
    from engine.config import BuildConfig
    from export.families import get_family
    from export.ip_adapter import with_ip_adapter
    from export.specs import Dims

    record = build_all(BuildConfig(model=model, backend="onnxruntime", precision="fp32", components=("unet",),
                                   engine_dir=engine_dir, ip_adapter=str(adapter) if adapter else None),
                       progress=False).record
    dims = Dims(**record["dims"])
    family = with_ip_adapter(get_family(record["family"]), dims)
    art = engine_dir / record["model_id"] / record["components"]["unet"]["dir"]
    return get_backend("onnxruntime").load(family.spec("unet"), art, cache.verify(art), "cpu"), dims


def measure(model: str, size: int, runs: int, engine_root: Path) -> dict[str, list[float]]:
    import torch

    from export.ip_adapter import random_ip_adapter
    from export.models import resolve_model
    from export.onnx_export import example_inputs
    from export.specs import Shape

    adapter = random_ip_adapter(resolve_model(model)[0], engine_root / "adapters" / f"{model}-ip", seed=0,
                                image_size=224, embed_dim=1024)
    plain, dims = _runner(model, engine_root / "plain", None)
    adapted, ip_dims = _runner(model, engine_root / "adapted", adapter)
    inputs = example_inputs(plain.spec, dims, Shape(1, size, size), "fp32", seed=0)  # the UNet's, batch 2 (CFG)
    embeds = torch.randn(2, ip_dims.ip_embed_dim, generator=torch.Generator().manual_seed(1))
    calls = {
        VARIANTS[0]: lambda: plain(**inputs),
        VARIANTS[1]: lambda: adapted(**inputs, image_embeds=torch.zeros_like(embeds), ip_scale=torch.zeros(2)),
        VARIANTS[2]: lambda: adapted(**inputs, image_embeds=embeds, ip_scale=torch.ones(2)),
    }
    samples = step_cost.interleave(calls, runs)
    for r in (plain, adapted):
        r.close()
    return samples


def main(argv: list[str] | None = None) -> int:
    return step_cost.main("ip-adapter-step", "ip_adapter_step", measure, argv, __doc__.splitlines()[0])

if __name__ == "__main__":
    sys.exit(main())
