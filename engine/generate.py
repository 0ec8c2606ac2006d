"""python -m engine.generate: txt2img with the engines `python -m engine.build` wrote; PNGs out."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from engine.config import BACKENDS, GenerateConfig


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    from engine.samplers import SAMPLERS

    d = GenerateConfig()
    p = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__)
    p.add_argument("--prompt", nargs="+", default=d.prompt, help="one or more prompts (one image each, x batch size)")
    p.add_argument("--negative-prompt", default=d.negative_prompt)
    p.add_argument("--steps", "--denoising-steps", dest="steps", type=int, default=d.steps)
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    p.add_argument("--scheduler", default=d.scheduler, help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per prompt")
    p.add_argument("--output", type=Path, default=d.output, help="a .png file (single image) or a folder")
    p.add_argument("--model", default=d.model)
    p.add_argument("--engine-dir", type=Path, default=d.engine_dir)
    p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="must match the build; auto = as built")
    return GenerateConfig(**vars(p.parse_args(argv)))


def parameters_text(params: dict) -> str:
    """A1111-style 'parameters' text: prompt, then 'Key: value' pairs."""
    prompt = params["prompt"] if isinstance(params["prompt"], str) else params["prompt"][0]
    rest = ", ".join(f"{k}: {v}" for k, v in params.items() if k not in ("prompt", "negative_prompt"))
    return f"{prompt}\nNegative prompt: {params['negative_prompt']}\n{rest}"


def save_png(image: np.ndarray, path: Path, params: dict) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_itxt("sd_engine", json.dumps(params, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def output_paths(output: Path, n: int, seed: int) -> list[Path]:
    if output.suffix.lower() == ".png":
        if n == 1:
            return [output]
        return [output.with_name(f"{output.stem}-{i}.png") for i in range(n)]
    return [output / f"image-{seed}-{i}.png" for i in range(n)]


def run(cfg: GenerateConfig) -> list[Path]:
    from engine.pipeline import Pipeline

    pipe = Pipeline.from_engines(cfg.engine_dir, cfg.model)
    built = pipe.info.get("backend")
    if cfg.backend not in ("auto", built):
        raise ValueError(f"engines in {cfg.engine_dir} were built for backend {built!r}, not {cfg.backend!r}: "
                         f"run python -m engine.build --backend {cfg.backend}")
    prompts = [p for p in cfg.prompt for _ in range(cfg.batch_size)]
    result = pipe(prompts, cfg.negative_prompt, cfg.steps, cfg.guidance_scale, cfg.scheduler, cfg.seed,
                  cfg.height, cfg.width)
    paths = output_paths(cfg.output, len(prompts), cfg.seed)
    for k, (img, path) in enumerate(zip(result.images, paths)):
        save_png(img, path, {**result.params, "prompt": prompts[k], "index": k})
    t = result.timings_ms
    print(f"timings (ms): clip {t['clip']:.1f} | unet {t['unet']:.1f} ({t['unet_per_step']:.2f}/step) | "
          f"vae {t['vae']:.1f} | total {t['total']:.1f}")
    for p in paths:
        print(f"wrote {p}")
    return paths


def main(argv: list[str] | None = None) -> int:
    from engine.cache import CorruptArtifact

    warnings.simplefilter("default", UserWarning)
    try:
        run(parse_args(argv))
    except (ValueError, RuntimeError, OSError, CorruptArtifact) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
