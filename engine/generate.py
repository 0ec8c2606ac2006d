"""python -m engine.generate: txt2img, img2img and inpainting with the engines `python -m engine.build` wrote.

Checks run in this order, each before any work: the arguments, the output location (`--output`: its
suffix, and that files can be created there), the engines (`--engine-dir`, `--model`, `--backend`),
then the requests against the engines (size, steps, sampler, images). So a bad `--output` is reported
even when the engine directory does not exist, and nothing is computed for an image that could not be
written.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from engine.config import BACKENDS
from engine.control import PREPROCESS, Control
from engine.hires import UPSCALERS as HIRES_UPSCALERS
from engine.png import IMAGE_FORMATS
from engine.prompts import SYNTAXES
from engine.request import (
    CACHE_SCHEDULES,
    DECODERS,
    DEFAULT_PROMPT,
    MAX_SEED,
    MAX_STEPS,
    RANDOM_SEED,
    Request,
    RequestError,
    flag,
)
from engine.sampler_registry import SAMPLERS
from engine.tiling import MODES as TILING_MODES
from export.families.upscale import LOW_RES
from export.quiet import add_verbose_flag, quiet_cli

_R = Request()  # generation defaults live on Request
_C = Control(name="", image="")  # and a ControlNet's on Control


@dataclass
class GenerateConfig:
    """What the CLI adds to a Request: prompts, where the engines are, where images go."""

    prompt: list[str | None] = field(default_factory=lambda: [_R.prompt])  # [None]: none given (a text model reads
    # the default prompt; an unconditional or class-conditional one takes none)
    negative_prompt: str | None = _R.negative_prompt  # None: none given
    prompt_syntax: str = _R.prompt_syntax  # engine/prompts.py: a1111 or plain
    clip_skip: int | None = _R.clip_skip
    steps: int = _R.steps
    guidance_scale: float = _R.guidance_scale
    scheduler: str = _R.sampler
    eta: float = _R.eta  # DDIM's eta
    seed: int = _R.seed
    height: int | None = _R.height
    width: int | None = _R.width
    images_per_prompt: int = _R.images
    batch_size: int | None = None  # images denoised together; None = the engine's built batch size
    init_image: Path | None = None
    strength: float | None = _R.strength
    mask: Path | None = None
    resize: bool = _R.resize
    original_size: tuple[int, int] | None = _R.original_size  # SDXL time ids (see Request)
    crop: tuple[int, int] | None = _R.crop
    target_size: tuple[int, int] | None = _R.target_size
    aesthetic_score: float | None = _R.aesthetic_score  # SDXL refiner
    negative_aesthetic_score: float | None = _R.negative_aesthetic_score
    noise_level: int | None = _R.noise_level  # the x4 upscaler (export/families/upscale.py)
    class_label: int | None = _R.class_label  # a class-conditional LDM (export/families/ldm_class.py)
    semantic_map: Path | None = None  # semantic synthesis's label image (export/families/ldm_semantic.py)
    semantic_palette: Path | None = None  # a colour map's palette, a JSON file {"#rrggbb": class id}
    layout: Path | None = None  # the layout model's objects, a JSON file (export/families/ldm_layout.py)
    lora: list[str] = field(default_factory=list)  # "path[:scale]", repeatable (engine/lora.py)
    embeddings: Path | None = None  # a folder of textual-inversion .safetensors prompts may name (engine/embeddings.py)
    controlnet: list[str] = field(default_factory=list)  # ControlNet names (engine/control.py), repeatable
    control_image: list[Path] = field(default_factory=list)  # one per --controlnet
    control_scale: list[float] = field(default_factory=list)  # one for all, or one per --controlnet; [] = 1.0
    control_start: list[float] = field(default_factory=list)  # likewise; [] = 0.0
    control_end: list[float] = field(default_factory=list)  # likewise; [] = 1.0
    control_preprocess: str | None = None  # "canny": make the maps from ordinary images
    canny_low: int = _C.low
    canny_high: int = _C.high
    guess_mode: bool = _R.guess_mode
    ip_image: Path | None = None  # an image prompt (engines built with engine.build --ip-adapter)
    ip_scale: float = _R.ip_scale
    vae_tiling: str = _R.vae_tiling  # engine/tiling.py: auto | on | off
    vae_tile_size: int | None = _R.vae_tile_size
    vae_tile_overlap: float = _R.vae_tile_overlap
    hires_scale: float | None = _R.hires_scale  # engine/hires.py: A1111's hires fix
    hires_steps: int | None = _R.hires_steps
    hires_strength: float = _R.hires_strength
    hires_upscaler: str = _R.hires_upscaler
    refiner_switch: float | None = _R.refiner_switch  # engine/refiner.py: SDXL base -> the refiner in the engine dir
    cache_interval: int = _R.cache_interval  # engine/feature_cache.py: DeepCache's feature caching
    cache_schedule: str = _R.cache_schedule
    decoder: str = _R.decoder  # engine/previews.py: full (the VAE) or tiny (engines built with --tiny-vae)
    preview_every: int = 0  # write a preview PNG every K steps (into <output folder>/previews); 0 = none
    output: Path = Path("out")
    model: str | None = None  # None = the only model in the engine dir
    engine_dir: Path = Path("engines")
    backend: str = "auto"
    verify: bool = False  # re-hash every engine file before loading

    def requests(self) -> list[Request]:
        from engine.lora import parse_adapter

        return [Request(prompt=p, negative_prompt=self.negative_prompt, prompt_syntax=self.prompt_syntax,
                        clip_skip=self.clip_skip, vae_tiling=self.vae_tiling, vae_tile_size=self.vae_tile_size,
                        vae_tile_overlap=self.vae_tile_overlap, hires_scale=self.hires_scale,
                        hires_steps=self.hires_steps, hires_strength=self.hires_strength,
                        hires_upscaler=self.hires_upscaler, refiner_switch=self.refiner_switch,
                        cache_interval=self.cache_interval, cache_schedule=self.cache_schedule, decoder=self.decoder,
                        steps=self.steps,
                        guidance_scale=self.guidance_scale, sampler=self.scheduler, eta=self.eta, seed=self.seed,
                        height=self.height, width=self.width, images=self.images_per_prompt,
                        init_image=self.init_image, strength=self.strength, mask=self.mask, resize=self.resize,
                        original_size=self.original_size, crop=self.crop, target_size=self.target_size,
                        aesthetic_score=self.aesthetic_score, negative_aesthetic_score=self.negative_aesthetic_score,
                        noise_level=self.noise_level, class_label=self.class_label, semantic_map=self.semantic_map,
                        semantic_palette=self.semantic_palette, layout=self.layout, loras=tuple(parse_adapter(a) for a in self.lora), controls=self.controls(),
                        guess_mode=self.guess_mode, ip_image=self.ip_image, ip_scale=self.ip_scale)
                for p in self.prompt]

    def controls(self) -> tuple[Control, ...]:
        """One Control per --controlnet, its image, and its scale / start / end (one value given: for all)."""
        n = len(self.controlnet)
        per_net = {"--control-scale": (self.control_scale, _C.scale), "--control-start": (self.control_start, _C.start),
                   "--control-end": (self.control_end, _C.end)}
        values = {}
        for flag_name, (given, default) in per_net.items():
            if len(given) not in (0, 1, n) or (given and not n):
                raise ValueError(f"argument {flag_name}: {len(given)} values for {n} --controlnet names; give one "
                                 "for all or one per --controlnet")
            values[flag_name] = given * n if len(given) == 1 else given or [default] * n
        if len(self.control_image) != n:
            raise ValueError(f"argument --control-image: {len(self.control_image)} images for {n} --controlnet "
                             "names; give one image per --controlnet, in the same order")
        return tuple(Control(name, image, scale, start, end, self.control_preprocess, self.canny_low, self.canny_high)
                     for name, image, scale, start, end in zip(self.controlnet, self.control_image,
                                                               values["--control-scale"], values["--control-start"],
                                                               values["--control-end"], strict=True))


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    d = GenerateConfig()
    p = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", nargs="+", default=d.prompt,
                   help=f"one or more prompts (default for text models: {DEFAULT_PROMPT!r}; models without text, "
                        "such as unconditional or class-conditional LDMs, take none)")
    p.add_argument("--negative-prompt", default=d.negative_prompt,
                   help="what to steer away from; not given: none (SDXL then zeroes the unconditional half, as "
                        "diffusers does), while an explicit \"\" is encoded like any prompt (as diffusers, A1111 "
                        "and ComfyUI do)")
    p.add_argument("--clip-skip", type=int, default=d.clip_skip, metavar="N",
                   help="A1111's clip skip: the text encoder's N-th layer from the end, through its final norm (1 = "
                        "the last, as without it; 2 = the penultimate); SD 1.x / 2.x only (SDXL's conditioning is "
                        "the penultimate layer already: refused)")
    p.add_argument("--prompt-syntax", choices=SYNTAXES, default=d.prompt_syntax,
                   help="a1111: prompts read as AUTOMATIC1111 reads them: (word) x1.1, [word] /1.1, (word:1.5), "
                        "\\( for a literal bracket, BREAK starts a new 75-token chunk, longer prompts in chunks of 75 "
                        "tokens (a long prompt is refused when the engines take fewer chunks); plain: the text as it "
                        "is, cut at 77 tokens with a warning")
    p.add_argument("--steps", "--denoising-steps", dest="steps", type=int, default=d.steps,
                   help=f"sampler steps, 1..{MAX_STEPS} (lcm: 1..original_inference_steps of the model, usually 50)")
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale, help="CFG scale; <= 1 turns CFG off")
    p.add_argument("--scheduler", "--sampler", dest="scheduler", default=d.scheduler, help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM's eta in [0, 1]: 0 deterministic, 1 DDPM-like "
                   "(other samplers take 0)")
    p.add_argument("--seed", type=int, default=d.seed, help="image k uses seed + k, 0..2**64-1; -1 = random")
    p.add_argument("--height", type=int, default=d.height, help="pixels; None = the size the engines were built for")
    p.add_argument("--width", type=int, default=d.width, help="pixels; None = the size the engines were built for")
    p.add_argument("--images-per-prompt", "--num-images", dest="images_per_prompt", type=int,
                   default=d.images_per_prompt, help="images for each prompt")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images denoised together (as in engine.build); None = the built batch size")
    p.add_argument("--init-image", type=Path, default=d.init_image, help="img2img / inpainting source image")
    p.add_argument("--strength", type=float, default=d.strength,
                   help="img2img strength in (0, 1]; None = diffusers' default for the model: SD 0.8 (1.0 "
                   "when inpainting), SDXL 0.3 (0.9999)")
    p.add_argument("--mask", type=Path, default=d.mask, help="inpainting mask (white = repaint); needs --init-image")
    p.add_argument("--noise-level", type=int, default=d.noise_level, metavar="N",
                   help=f"x4 upscaler: the noise added to --init-image (the low-resolution image), [0, "
                        f"{LOW_RES.max_noise_level}]; None = {LOW_RES.default_noise_level}")
    p.add_argument("--class-label", type=int, default=d.class_label, metavar="N",
                   help="class-conditional LDM: the class id to draw, 0..n-1 (the last: the unconditional class, "
                        "guidance runs against it); None = that class")
    p.add_argument("--semantic-map", type=Path, default=d.semantic_map, metavar="PNG",
                   help="semantic synthesis LDM: a label image (one class id per pixel: mode L, P or I) at the "
                        "output size (--height/--width; or --resize, nearest)")
    p.add_argument("--semantic-palette", type=Path, default=d.semantic_palette, metavar="JSON",
                   help='with a colour --semantic-map: a JSON file {"#rrggbb": class id, ...} giving each colour\'s '
                        "class")
    p.add_argument("--layout", type=Path, default=d.layout, metavar="JSON",
                   help='layout-to-image LDM: a JSON file of objects [{"label": "dog" or a class id, "box": [x0, y0, '
                        'x1, y1]}] (fractions of the image, or pixels), at most 30')
    p.add_argument("--resize", action="store_true", default=d.resize,
                   help="resize the init image and mask to --height/--width instead of refusing another size")
    _add_time_id_flags(p, d)
    p.add_argument("--vae-tiling", choices=TILING_MODES, default=d.vae_tiling,
                   help="decode (and encode) in overlapping tiles as diffusers' enable_vae_tiling: on, off, or auto "
                        "(only where the whole image would not fit in memory)")
    p.add_argument("--vae-tile-size", type=int, default=d.vae_tile_size, metavar="PX",
                   help="pixels per tile side; None = the VAE's sample size (512 for SD 1.x)")
    p.add_argument("--vae-tile-overlap", type=float, default=d.vae_tile_overlap,
                   help="share of a tile blended with each neighbour, [0, 0.5)")
    p.add_argument("--hires-scale", type=float, default=d.hires_scale,
                   help="A1111's hires fix: generate at --height/--width, upscale by this (1, 4], then img2img there")
    p.add_argument("--hires-steps", type=int, default=d.hires_steps, help="the second pass's steps; None = --steps")
    p.add_argument("--hires-strength", type=float, default=d.hires_strength,
                   help="the second pass's denoising strength, (0, 1]")
    p.add_argument("--hires-upscaler", choices=HIRES_UPSCALERS, default=d.hires_upscaler,
                   help="latent: bilinear latents (A1111's Latent); latent-nearest; lanczos: in pixels (needs the "
                        "VAE encoder)")
    p.add_argument("--refiner-switch", type=float, default=d.refiner_switch, metavar="FRACTION",
                   help="SDXL: the base denoises this share of the schedule, (0, 1), the refiner built into the same "
                        "--engine-dir the rest (diffusers' denoising_end / denoising_start)")
    p.add_argument("--cache-interval", type=int, default=d.cache_interval, metavar="N",
                   help="feature caching (DeepCache; engines built with --cache-branch): a full UNet step every N "
                        "steps, the shallow graph between; 1 = every step in full")
    p.add_argument("--cache-schedule", choices=CACHE_SCHEDULES, default=d.cache_schedule,
                   help="where the full steps go: uniform (every N, DeepCache's default) or center (its non-uniform "
                        "schedule: denser around the middle step)")
    p.add_argument("--decoder", choices=DECODERS, default=d.decoder,
                   help="what decodes the final images: full (the model's VAE) or tiny (the tiny VAE built with "
                        "engine.build --tiny-vae: faster, rougher)")
    p.add_argument("--preview-every", type=int, default=d.preview_every, metavar="K",
                   help="write a preview PNG every K steps into <output folder>/previews (the tiny VAE decodes them "
                        "where built, else the VAE); 0 = none")
    p.add_argument("--output", type=Path, default=d.output,
                   help=f"an image file ({', '.join(IMAGE_FORMATS)}), or a folder (no suffix) for numbered PNGs")
    p.add_argument("--model", default=d.model, help="model id, preset or path given to engine.build; "
                   "None = the only model in --engine-dir")
    p.add_argument("--engine-dir", type=Path, default=d.engine_dir, help="what engine.build wrote")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend, help="must match the build; auto = as built")
    p.add_argument("--verify", action="store_true", default=d.verify, help="re-hash every engine file before loading")
    p.add_argument("--lora", action="append", default=list(d.lora), metavar="PATH[:SCALE]",
                   help="a LoRA .safetensors (diffusers/PEFT or kohya) merged at SCALE (default 1); repeatable, "
                        "no rebuild (TensorRT: engines built with --build-enable-refit)")
    p.add_argument("--embeddings", type=Path, default=d.embeddings, metavar="DIR",
                   help="a folder of textual-inversion embeddings (.safetensors: A1111's or diffusers' layout) that "
                        "prompts use by file stem; no rebuild")
    _add_control_flags(p, d)
    add_verbose_flag(p)
    args = p.parse_args(argv)
    if not (args.seed == RANDOM_SEED or 0 <= args.seed <= MAX_SEED):
        p.error(f"argument --seed: {args.seed} is outside 0..2**64-1 (-1 draws a random seed)")
    if args.embeddings is not None and not args.embeddings.is_dir():
        p.error(f"argument --embeddings: {args.embeddings} is not a folder (of textual-inversion .safetensors)")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"argument --batch-size: {args.batch_size} must be >= 1")
    if args.preview_every < 0:
        p.error(f"argument --preview-every: {args.preview_every} must be >= 0 (0 = no previews)")
    values = {f.name: getattr(args, f.name) for f in fields(GenerateConfig)}
    for name in ("original_size", "crop", "target_size"):
        values[name] = tuple(values[name]) if values[name] is not None else None
    cfg = GenerateConfig(**values)
    try:
        cfg.controls()  # counts of the per-net flags, before any work
    except ValueError as e:
        p.error(str(e))
    return cfg


def _add_control_flags(p: argparse.ArgumentParser, d: GenerateConfig) -> None:
    """ControlNet: which nets (built with engine.build --controlnet), their images and how they apply."""
    p.add_argument("--controlnet", action="append", default=list(d.controlnet), metavar="NAME",
                   help="a ControlNet these engines were built with (the name of its folder); repeatable")
    p.add_argument("--control-image", action="append", type=Path, default=list(d.control_image), metavar="PATH",
                   help="the control image of each --controlnet, in order (its size: --height x --width, or --resize)")
    for name, what in (("scale", "residual scale, 0..2"), ("start", "fraction of the steps where control starts"),
                       ("end", "fraction of the steps where control ends")):
        p.add_argument(f"--control-{name}", action="append", type=float, default=[], metavar="F",
                       help=f"{what} (diffusers' controlnet_conditioning_scale / control_guidance_start / _end): one "
                            f"for all nets or one per --controlnet; default {getattr(_C, name)}")
    p.add_argument("--control-preprocess", choices=PREPROCESS, default=d.control_preprocess,
                   help="make each control map from an ordinary image first (canny: OpenCV's Canny edges)")
    p.add_argument("--canny-low", type=int, default=d.canny_low, help="--control-preprocess canny: low threshold")
    p.add_argument("--canny-high", type=int, default=d.canny_high, help="--control-preprocess canny: high threshold")
    p.add_argument("--guess-mode", action="store_true", default=d.guess_mode,
                   help="ControlNet guess mode: the nets see the conditional rows only, their residuals weighted "
                        "0.1..1 from the first to the last")
    p.add_argument("--ip-image", type=Path, default=d.ip_image, metavar="PATH",
                   help="an image prompt, for engines built with --ip-adapter (IP-Adapter; any size: resized and "
                        "centre-cropped for its image encoder)")
    p.add_argument("--ip-scale", type=float, default=d.ip_scale, metavar="S",
                   help="the image prompt's weight, 0..2 (diffusers' set_ip_adapter_scale); 0 = the text-only image")


def _add_time_id_flags(p: argparse.ArgumentParser, d: GenerateConfig) -> None:
    """SDXL's size conditioning (time ids); None = diffusers' defaults. Other models refuse them."""
    from export.families.sdxl import AESTHETIC_SCORES

    positive, negative = AESTHETIC_SCORES
    p.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), default=d.original_size,
                   help="SDXL: the original image size the model is told of, in pixels; None = --height --width")
    p.add_argument("--crop", type=int, nargs=2, metavar=("TOP", "LEFT"), default=d.crop,
                   help="SDXL: crop top-left coordinates, in pixels, inside --original-size; None = 0 0")
    p.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), default=d.target_size,
                   help="SDXL (not the refiner): target size in pixels; None = --height --width")
    p.add_argument("--aesthetic-score", type=float, default=d.aesthetic_score,
                   help=f"SDXL refiner: aesthetic score of the conditional rows; None = {positive}")
    p.add_argument("--negative-aesthetic-score", type=float, default=d.negative_aesthetic_score,
                   help=f"SDXL refiner: aesthetic score of the unconditional rows; None = {negative}")


def output_is_file(output: Path) -> bool:
    """True for an image file (a suffix of IMAGE_FORMATS), False for a folder (no suffix, or an existing
    folder); ValueError naming --output for any other suffix or an image name that is an existing folder."""
    allowed = f"{', '.join(IMAGE_FORMATS)}, or no suffix for a folder"
    if output.suffix.lower() in IMAGE_FORMATS:
        if output.is_dir():
            raise ValueError(f"--output {output} is an existing folder, not an image file; allowed: a file "
                             f"name ending in {allowed}")
        return True
    if not output.suffix or output.is_dir():
        return False
    raise ValueError(f"--output {output}: suffix {output.suffix!r} is not an image format; allowed: {allowed}")


def _nearest_existing(path: Path) -> Path:
    """`path` made absolute, or its closest ancestor that exists (the root always does)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(output: Path) -> None:
    """ValueError naming --output and the path given unless images can be written there (before any work).

    Nothing is created here (the folder is made when the first image is saved): the nearest existing
    ancestor of the output folder must be a folder in which a probe file can be created and removed.
    os.access is not enough: root "may write" /proc, yet creating a file there fails.
    """
    folder = output.parent if output_is_file(output) else output
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ValueError(f"--output {output}: {existing} is a file, not a folder; allowed: a path in a writable folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".sd-engine-probe-")
    except OSError as err:
        raise ValueError(f"--output {output}: cannot create files in {existing} ({err.strerror or err}); "
                         "allowed: a path in a writable folder") from None
    os.close(fd)
    os.unlink(probe)


def output_paths(output: Path, n: int, seeds: list[int]) -> list[Path]:
    """`x.png` (x-0.png, x-1.png, ... for several; same for .jpg/.jpeg/.webp), or a folder of numbered PNGs
    that never overwrite."""
    if output_is_file(output):
        return [output] if n == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]
    taken = [int(m.group(1)) for f in (output.glob("*.png") if output.is_dir() else [])
             if (m := re.match(r"(\d+)-", f.name))]
    first = max(taken, default=0) + 1
    return [output / f"{first + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def run(cfg: GenerateConfig) -> list[Path]:
    """Check the output location, load the engines, generate and save; the paths written."""
    check_output(cfg.output)  # before the engines load: see the module docstring for the order of checks
    from engine.pipeline import Pipeline

    pipe = Pipeline.load(cfg.engine_dir, cfg.model, batch_size=cfg.batch_size, verify=cfg.verify,
                         embeddings=cfg.embeddings)
    built = pipe.info.get("backend")
    if cfg.backend not in ("auto", built):
        raise ValueError(f"engines in {cfg.engine_dir} were built for backend {built!r}, not {cfg.backend!r}: "
                         f"run python -m engine.build --backend {cfg.backend}")
    preview = None
    if cfg.preview_every:
        from engine.previews import Previews, writer

        folder = (cfg.output.parent if output_is_file(cfg.output) else cfg.output) / "previews"
        preview = Previews(cfg.preview_every, writer(folder))
    results = pipe.run(cfg.requests(), preview=preview)
    paths = output_paths(cfg.output, len(results), [r.params["seed"] for r in results])
    for result, path in zip(results, paths, strict=True):
        result.save(path)
    t = results[0].timings_ms
    print(f"timings (ms): clip {t['clip']:.1f} | unet {t['unet']:.1f} ({t['unet_per_step']:.2f}/step) | "
          f"vae {t['vae']:.1f} | total {t['total']:.1f}")
    for p, result in zip(paths, results, strict=True):  # a drawn seed is said: it is the way back to the image
        drawn = f" (seed {result.params['seed']}, drawn for --seed -1)" if cfg.seed == RANDOM_SEED else ""
        print(f"wrote {p}{drawn}")
    return paths


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)  # --help and argument errors answer before torch loads
    try:
        check_output(cfg.output)  # so does a bad --output (run checks it again: callers of run rely on it)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quiet_cli(argv)  # imports torch, then quiets the libraries (nothing imported so far prints)
    from engine.cache import CorruptArtifact

    try:
        run(cfg)
    except RequestError as e:  # the request's fields named as this CLI's flags
        print(f"error: {flag_message(e)}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError, CorruptArtifact) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def flag_message(error: RequestError) -> str:
    """A request error's message in this CLI's terms: the Request fields it names written as flags (`name` in
    backticks, or a field of two words or more: original_size -> --original-size; one-word fields read as words),
    led by "argument FLAG:" (as argparse's own errors) when the message does not name its field's flag already."""
    names = [f.name for f in fields(Request)]
    text = re.sub(r"`(" + "|".join(names) + r")`", lambda m: flag(m[1]), str(error))
    text = re.sub(r"\b(" + "|".join(n for n in names if "_" in n) + r")\b", lambda m: flag(m[1]), text)
    own = flag(error.field) if error.field else None
    return text if own is None or own in text else f"argument {own}: {text}"


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown (about a second of freeing torch's and the runtimes'
    objects for nothing): every image is written, closed and renamed into place by then; stdout and stderr
    are flushed here. Only for `python -m engine.generate`, never for a caller of `main` or `run`."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
