"""Memory a pipeline keeps per request size: RSS over requests of random sizes, one JSON (issue 31 item 2).

    python -m benchmarks.shape_memory --engine-dir DIR [--requests 320] [--out PATH]

One pipeline, in this process: a 64x64 request first (the start mark), then `requests` txt2img requests of 2
steps at sizes drawn from SIDES x SIDES (seeded), RSS read every `every` requests, and the compiles the runners
made (OpenVINO: `compiles`, engine/shape_state.py compiles again past its bound). No server, no client.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import RESULTS
from benchmarks.serve_load import machine_info, write_json

SIDES = tuple(range(32, 160, 16))  # 8 x 8 = 64 sizes


@dataclass
class ShapeMemoryConfig:
    engine_dir: Path = Path("engines")
    requests: int = 320
    every: int = 32
    seed: int = 0
    out: Path | None = None


def run(cfg: ShapeMemoryConfig) -> dict:
    import psutil

    from engine import shape_state
    from engine.pipeline import Pipeline
    from engine.request import Request

    def rss_mb() -> float:
        return psutil.Process().memory_info().rss / 2**20

    pipe = Pipeline.load(cfg.engine_dir)
    rng = random.Random(cfg.seed)
    try:
        pipe.run(Request(prompt="x", steps=2, height=64, width=64), progress=False)
        start, marks, t0 = rss_mb(), [], time.perf_counter()
        for i in range(cfg.requests):
            h, w = rng.choice(SIDES), rng.choice(SIDES)
            pipe.run(Request(prompt="x", steps=2, height=h, width=w), progress=False)
            if (i + 1) % cfg.every == 0:
                marks.append({"requests": i + 1, "rss_growth_mb": round(rss_mb() - start, 1)})
        compiles = sum(getattr(r, "compiles", 0) for r in pipe.runners.values())
        return {"benchmark": "shape_memory", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                "backend": pipe.info.get("backend"), "model": pipe.info.get("model"), "sizes": len(SIDES) ** 2,
                "max_shapes": shape_state.MAX_SHAPES, "start_rss_mb": round(start, 1), "marks": marks,
                "compiles": compiles, "wall_s": round(time.perf_counter() - t0, 1), "machine": machine_info()}
    finally:
        pipe.close()


def main(argv: list[str] | None = None) -> int:
    d = ShapeMemoryConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-dir", type=Path, default=d.engine_dir)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--every", type=int, default=d.every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=d.out)
    a = p.parse_args(argv)
    cfg = ShapeMemoryConfig(**vars(a))
    doc = run(cfg)
    out = cfg.out or RESULTS / f"shape-memory-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    write_json(out, doc)
    print(" ".join(f"{m['requests']}:{m['rss_growth_mb']:+.0f}MB" for m in doc["marks"]), f"compiles {doc['compiles']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
