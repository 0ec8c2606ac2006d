"""Models whose init image is a low-resolution image the UNet takes concatenated to its latents, not an img2img
start (`Family.low_res`): the x4 upscaler (export/families/upscale.py) and LDM super-resolution
(export/families/ldm.py).

    LowResImage.load(files, low_res)   the DDPM table of low_res_scheduler/ and the model's max_noise_level (the
                                       upscaler's; none for LDM super-resolution)
    .size(r, dims, hi)                 the image out: the request's size, or vae_scale x the init image's
    .image(r, dims)                    the init image at the latent size, [1, 3, h, w] in [-1, 1]
    .condition(image, rows, gens, cfg) the step buffer: `concat` (after the sampler scales the latents) or
                                       `concat_scaled` (before, as LDM's pipelines), [2B or B, 3, h, w]

As diffusers' StableDiffusionUpscalePipeline with one generator per image: each row draws the image's noise from
its generator before the initial latents, then the latents start from pure noise (there is no strength); the
noised image is concatenated after the sampler scales the latents ([uncond; cond] rows alike), and the noise level
is the UNet's class label. LDMSuperResolutionPipeline concatenates the image as it is, before the scaling.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from engine import images
from engine.cache import read_json
from engine.denoise import randn_rows
from engine.request import Request, RequestError
from engine.schedulers import Config, alphas_cumprod
from export.families import LowRes
from export.specs import Dims, Shape

DDPM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     trained_betas=None, rescale_betas_zero_snr=False)  # DDPMScheduler's __init__ defaults


@dataclass(frozen=True)
class LowResImage:
    low_res: LowRes
    alphas_cumprod: torch.Tensor | None  # [T] float32, the low-res DDPM schedule; None: not noised
    max_noise_level: int  # the model's (model_index.json), within the UNet's class embeddings

    @classmethod
    def load(cls, files: Path, low_res: LowRes) -> LowResImage:
        """From an engine dir's model files: the low-res scheduler config and model_index.json's max_noise_level."""
        if low_res.scheduler_config is None:
            return cls(low_res, None, 0)
        given = read_json(files / low_res.scheduler_config)
        cfg = Config({k: given.get(k, v) for k, v in DDPM_DEFAULTS.items()})
        ac = alphas_cumprod(cfg, low_res.scheduler_config, sigma_family=False)
        top = int(read_json(files / "model_index.json").get("max_noise_level", low_res.max_noise_level))
        return cls(low_res, ac, min(top, ac.shape[0] - 1))

    def check(self, r: Request) -> None:
        """RequestError naming noise_level past this model's max_noise_level."""
        if r.noise_level is not None and r.noise_level > self.max_noise_level:
            raise RequestError("noise_level", f"noise_level {r.noise_level} is over this model's max_noise_level "
                                              f"{self.max_noise_level}: allowed [0, {self.max_noise_level}]")

    def size(self, r: Request, dims: Dims, hi: Shape) -> tuple[int, int] | None:
        """(height, width) of the image out: the request's, else the init image's times the VAE's scale (None
        without an init image); RequestError naming init_image when that is past the engine's largest size."""
        if r.init_image is None:
            return None
        w, h = _open(r.init_image).size
        out = (r.height or h * dims.vae_scale, r.width or w * dims.vae_scale)
        if r.height is None and r.width is None and (out[0] > hi.height or out[1] > hi.width):
            raise RequestError("init_image", f"init image {w}x{h} would be upscaled to {out[1]}x{out[0]}, past this "
                                             f"engine's largest {hi.width}x{hi.height}: give a smaller image (at most "
                                             f"{hi.width // dims.vae_scale}x{hi.height // dims.vae_scale}) or rebuild "
                                             f"with a larger --max-size")
        return out

    def image(self, r: Request, dims: Dims) -> torch.Tensor | None:
        """The init image at the latent size of a request whose size is known: [1, 3, H/s, W/s] in [-1, 1]."""
        if r.init_image is None:
            return None
        assert r.height is not None and r.width is not None
        h, w = r.height // dims.vae_scale, r.width // dims.vae_scale
        return images.load_field(lambda s, hh, ww, rs: images.load_image(s, hh, ww, rs, multiple=dims.unet_scale),
                                 "init_image", _open(r.init_image), h, w, r.resize)

    def condition(self, image: torch.Tensor, rows: list[Any], gens: list[torch.Generator],
                  cfg: bool) -> dict[str, torch.Tensor]:
        """The step's condition buffer of the rows' images [B, 3, h, w]: noised at each row's level, one draw per
        row's generator (before its latents): sqrt(ac[t]) x + sqrt(1 - ac[t]) noise, as DDPMScheduler.add_noise; or
        as they are. [2B, 3, h, w] with guidance."""
        x = image
        if self.alphas_cumprod is not None:
            noise = randn_rows(gens, (1, *image.shape[1:]))  # [B, 3, h, w]
            levels = torch.tensor([row.request.noise_level for row in rows])
            ac = self.alphas_cumprod[levels].view(-1, 1, 1, 1)  # [B, 1, 1, 1]
            x = ac.sqrt() * image + (1 - ac).sqrt() * noise
        return {"concat_scaled" if self.low_res.before_scaling else "concat": torch.cat([x, x]) if cfg else x}


def _open(source: images.ImageSource) -> PIL.Image.Image:
    try:
        return images.open_image(source, "init image")
    except ValueError as exc:
        raise RequestError("init_image", str(exc)) from None
