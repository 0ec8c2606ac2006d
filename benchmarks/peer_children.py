"""The peers benchmark's children (benchmarks/peers.py runs each in a process of its own): `--prepare JSON` makes the
model files every contestant reads (the preset's diffusers folder, the single-file checkpoint, optimum-intel's
export), `--child JSON` loads one contestant, warms it up and times its images; each prints one JSON line.

    python -m benchmarks.peer_children --prepare '{"model": "sd15", "work": DIR, "checkpoint": true, ...}'
    python -m benchmarks.peer_children --child '{"name": "ours-openvino-bf16", "size": 256, ...}'
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.peers import CACHE_BRANCH, CONTESTANTS, PROMPT, WARMUP_STEPS, Contestant, version


def _write_checkpoint(folder: Path, dest: Path) -> Path:
    """The diffusers folder's UNet, VAE and CLIP as one fp16 single-file checkpoint in the original SD layout."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.ldm_layout import to_ldm

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    state = to_ldm(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
                   load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
                   load_file(folder / "text_encoder" / "model.safetensors"),
                   unet_cfg["layers_per_block"], len(vae_cfg["block_out_channels"]))
    state = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v for k, v in state.items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(dest)
    return dest


def _export_optimum(folder: Path, dest: Path) -> None:
    from optimum.intel import OVStableDiffusionPipeline  # pyright: ignore[reportMissingImports]

    pipe = OVStableDiffusionPipeline.from_pretrained(str(folder), export=True, compile=False)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))
    tmp.replace(dest)


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """The preset's diffusers folder; the single-file checkpoint and optimum-intel's export where asked (each error
    returned as the reason, not raised)."""
    from export.models import materialize_preset
    from export.presets import ALL_PRESETS

    folder = materialize_preset(ALL_PRESETS[spec["model"]])
    work = Path(spec["work"])
    out: dict[str, Any] = {"folder": str(folder)}
    if spec.get("checkpoint"):
        dest = work / "checkpoints" / f"{folder.name}-fp16.safetensors"
        try:
            out["checkpoint"] = str(dest if dest.is_file() else _write_checkpoint(folder, dest))
        except Exception as e:  # noqa: BLE001 - the reason goes into the results
            out["checkpoint_error"] = f"single-file checkpoint: {type(e).__name__}: {e}"
    if spec.get("optimum"):
        dest = work / "optimum" / folder.name
        try:
            if not (dest / "model_index.json").is_file():
                _export_optimum(folder, dest)
            out["optimum"] = str(dest)
        except Exception as e:  # noqa: BLE001
            out["optimum_error"] = f"{type(e).__name__}: {e}"
    return out


def _diffusers(spec: dict[str, Any], c: Contestant) -> tuple[Callable[[int, int], Any], str]:
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler

    dtype = torch.bfloat16 if c.precision == "bf16" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(spec["folder"], torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if c.cached:
        from DeepCache import DeepCacheSDHelper  # pyright: ignore[reportMissingImports]

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=c.cache_interval, cache_branch_id=CACHE_BRANCH)
        helper.enable()

    def generate(steps: int, seed: int) -> Any:
        with torch.inference_mode():
            out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=spec["guidance"], height=spec["size"],
                       width=spec["size"], generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        return out.images[0]  # pyright: ignore[reportAttributeAccessIssue]

    return generate, f"diffusers {version('diffusers')}, torch {version('torch')}"


def _optimum(spec: dict[str, Any], c: Contestant) -> tuple[Callable[[int, int], Any], str]:
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline  # pyright: ignore[reportMissingImports]

    hint = {"fp32": "f32", "bf16": "bf16"}[c.precision]
    pipe = OVStableDiffusionPipeline.from_pretrained(spec["optimum"], compile=False,
                                                     ov_config={"INFERENCE_PRECISION_HINT": hint})
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.reshape(batch_size=1, height=spec["size"], width=spec["size"], num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)

    def generate(steps: int, seed: int) -> Any:
        import numpy as np

        out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=spec["guidance"], height=spec["size"],
                   width=spec["size"], generator=np.random.RandomState(seed), output_type="np")
        return out.images[0]

    return generate, f"optimum-intel {version('optimum-intel')}, openvino {version('openvino')}"


def _sdcpp(spec: dict[str, Any], c: Contestant) -> tuple[Callable[[int, int], Any], str]:
    import numpy as np
    from stable_diffusion_cpp import StableDiffusion  # pyright: ignore[reportMissingImports]

    from benchmarks.schema import cores

    # verbose: its log (stderr) is what names the cause when it makes no image (e.g. an architecture it does not know)
    sd = StableDiffusion(model_path=spec["checkpoint"], wtype=c.precision, n_threads=cores(), verbose=True)

    def generate(steps: int, seed: int) -> Any:
        try:
            (img,) = sd.generate_image(prompt=PROMPT, negative_prompt="", width=spec["size"], height=spec["size"],
                                       cfg_scale=spec["guidance"], sample_method="euler", sample_steps=steps,
                                       seed=seed)
        except ValueError as e:  # the binding's "NULL pointer access": the library returned no image
            raise RuntimeError(f"stable-diffusion.cpp made no image ({e})") from None
        return np.asarray(img.convert("RGB"))

    return generate, f"stable-diffusion-cpp-python {version('stable-diffusion-cpp-python')}"


def _ours(spec: dict[str, Any], c: Contestant) -> tuple[Callable[[int, int], Any], str]:
    from engine.pipeline import Pipeline
    from engine.request import Request

    pipe = Pipeline.load(spec["engine_dir"])

    def generate(steps: int, seed: int) -> Any:
        (g,) = pipe.run(Request(prompt=PROMPT, steps=steps, seed=seed, guidance_scale=spec["guidance"],
                                sampler="euler", height=spec["size"], width=spec["size"],
                                cache_interval=c.cache_interval), progress=False)
        return g.pixels

    return generate, f"ours ({pipe.info.get('backend')} {pipe.info.get('precision')}), openvino {version('openvino')}"


LOADERS = {"diffusers": _diffusers, "optimum": _optimum, "sdcpp": _sdcpp, "ours": _ours}


def to_uint8(image: Any) -> Any:
    """An image as uint8 [H, W, 3]: floats in [0, 1] are scaled as diffusers' numpy_to_pil does (round)."""
    import numpy as np

    x = np.asarray(image)
    if x.dtype != np.uint8:
        x = (x.astype(np.float64) * 255).round().clip(0, 255).astype(np.uint8)
    return x[..., :3]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one contestant, warm up, time `images` seed-0 images; the last image goes to spec["image_out"]."""
    from PIL import Image

    from benchmarks.schema import peak_rss_bytes

    c = CONTESTANTS[spec["name"]]
    t0 = time.perf_counter()
    generate, what = LOADERS[c.kind](spec, c)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate(WARMUP_STEPS, 1)
    warmup_s = time.perf_counter() - t0
    seconds, image = [], None
    for _ in range(spec["images"]):
        t0 = time.perf_counter()
        image = generate(spec["steps"], 0)
        seconds.append(time.perf_counter() - t0)
    if spec.get("image_out"):
        Image.fromarray(to_uint8(image)).save(spec["image_out"])
    return {"seconds": seconds, "load_s": load_s, "warmup_s": warmup_s, "peak_rss_gib": peak_rss_bytes() / 2**30,
            "what": what}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_children", description=(__doc__ or "").splitlines()[0])
    job = p.add_mutually_exclusive_group(required=True)
    job.add_argument("--prepare", help="JSON: the model, the work folder, which extra files to make")
    job.add_argument("--child", help="JSON: one contestant's measurement")
    a = p.parse_args(argv)
    print(json.dumps(prepare(json.loads(a.prepare)) if a.prepare else child(json.loads(a.child))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
