"""The denoise step and the latents it starts from: txt2img, img2img and both kinds of inpainting.

`denoise_step` is one UNet call + classifier-free guidance + sampler update (+ the inpainting blend),
reading everything from a dict of device buffers, so it has no host sync and can be captured in one
CUDA graph (engine/graphs.py). Buffers:

    idx            0-d int64, the step index (advanced on the device); or [B], each row's own step
                   (continuous batching: rows of one sampler with their own steps, per-row tables from
                   samplers.stack; noise then holds this step's draw per row, [B, 4, h, w])
    latents        [B, 4, h, w] float32
    state          [B, 4, h, w] float32, the sampler's multistep state
    guidance       [B, 1, 1, 1] float32, per-row guidance scale (only with CFG)
    cond.<name>    UNet conditioning inputs from the family ([2B, 77, C] encoder_hidden_states, ...)
    noise          [N, B, 4, h, w] per-step noise (ancestral samplers)
    concat         [2B, 5, h, w] mask + masked-image latents (9-channel inpainting UNets), or the x4 upscaler's
                   noised low-res image [2B, 3, h, w]: concatenated after the sampler scales the latents
    concat_scaled  [B, 3, h, w] LDM super-resolution's low-res image: concatenated before the scaling
    image_latents, init_noise, mask   the latent blend of 4-channel inpainting, as diffusers does
    table.<name>   [B, N] per-row, per-step tables of condition components (ControlNet scales: engine/tables.py)
    cache.<name>   [2B, C, h/s, w/s] the feature cache (engine/feature_cache.py): the full UNet writes it in place,
                   its shallow graph reads it
    control.*      condition components' other inputs (ControlNet images [B, 3, H, W])

Randomness follows diffusers with one generator per image (`generator=[...]`): each row draws, from its
own generator and in this order, the init image's latent sample, the initial noise, the masked image's
latent sample (inpainting), then one noise tensor per executed step. So an image's pixels do not
depend on its batch-mates, and a seed gives diffusers' image.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine import images, samplers
from engine.backends.base import Runner
from engine.graphs import Buffers
from engine.tiling import Tiling

COND = "cond."
CACHE = "cache."  # the feature cache's tensors (engine/feature_cache.py): a full step writes them, a shallow one reads


Residuals = Callable[[torch.Tensor, torch.Tensor, dict, Buffers, bool], dict]  # engine/control.py's ControlStep


def denoise_step(unet: Runner, schedule: samplers.Schedule, cfg: bool, b: Buffers,
                 residuals: Residuals | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step at index b["idx"]: returns (next latents, next sampler state); no host sync. `residuals`: the
    UNet's extra inputs from the scaled latents, timesteps and conditioning (ControlNets)."""
    i, latents = b["idx"], b["latents"]
    x = latents if "concat_scaled" not in b else torch.cat([latents, b["concat_scaled"]], dim=1)  # [B, 4+3, h, w]
    x = samplers.scale_model_input(schedule, x, i)  # [B, 4 (+3), h, w]
    x = torch.cat([x, x]) if cfg else x  # [2B, 4, h, w]
    t = _timesteps(schedule, i, x.shape[0])  # [2B]
    cond = {k[len(COND):]: v for k, v in b.items() if k.startswith(COND)}
    extra = residuals(x, t, cond, b, cfg) if residuals is not None else {}
    if "concat" in b:
        x = torch.cat([x, b["concat"]], dim=1)  # [2B, 9, h, w]
    cache = {k[len(CACHE):]: v for k, v in b.items() if k.startswith(CACHE)}
    reads = {k: v for k, v in cache.items() if k in unet.spec.input_names}  # the shallow graph's
    out = unet(sample=x, timestep=t, **cond, **extra, **reads)
    for k, v in cache.items():
        if k not in reads:  # a full step: keep the cache for the shallow steps after it
            v.copy_(out[k])
    out = out["latent"].float()
    if cfg:
        uncond, text = out.chunk(2)
        out = uncond + b["guidance"] * (text - uncond)
    noise = _step_noise(b["noise"], i) if "noise" in b else None
    latents, state = samplers.step(schedule, i, latents, out, b["state"], noise)
    if "mask" in b:  # 4-channel inpainting: keep the unmasked area on the re-noised init image
        proper = samplers.add_noise(schedule, b["image_latents"], b["init_noise"], i + 1)
        latents = (1 - b["mask"]) * proper + b["mask"] * latents
    return latents, state


def _timesteps(schedule: samplers.Schedule, i: torch.Tensor, n: int) -> torch.Tensor:
    """The UNet's timestep per input row [n]: one value for all (0-d i), or each row's (per-row i [B]; with
    CFG the uncond and cond halves repeat it)."""
    if i.dim() == 0:
        return schedule.timesteps.index_select(0, i.view(1)).expand(n)
    t = schedule.timesteps.gather(1, i.view(-1, 1)).view(-1)  # [B]
    return t.repeat(n // t.shape[0])


def _step_noise(noise: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """This step's noise [B, 4, h, w]: picked from [N, B, 4, h, w] by a 0-d i; with per-row i [B] the caller
    (engine/continuous.py, which knows each row's step on the host) passes this step's draws themselves."""
    if i.dim() == 0:
        return noise.index_select(0, i.view(1))[0]
    return noise


def randn_rows(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One draw of `shape` ([1, ...]) from each row's generator, stacked: [B, ...]."""
    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])


def sample_latents(vae_encoder: Runner, images: torch.Tensor, gens: list[torch.Generator],
                   tiling: Tiling | None = None) -> torch.Tensor:
    """Scaled latents sampled from the VAE posterior, one draw per row: [B, 4, h, w] on the CPU; encoded in tiles
    when `tiling` is given and the images span more than one (engine/tiling.py)."""
    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = vae_encoder(images=x.to(vae_encoder.device))
        return out["latent"].float().cpu(), out["latent_std"].float().cpu()  # copies: outputs are borrowed

    if tiling is not None and tiling.needed(images.shape[2], images.shape[3]):
        mean, std = tiling.encode(encode, images)
    else:
        mean, std = encode(images)
    return mean + std * randn_rows(gens, (1, *mean.shape[1:]))


def step_noise(schedule: samplers.Schedule, gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """[N, B, 4, h, w]: the noise of each executed step (zeros at the steps not run)."""
    n = schedule.num_steps
    noise = torch.zeros((n, len(gens), *shape[1:]), dtype=torch.float32)
    for s in range(schedule.start, schedule.stop):
        noise[s] = randn_rows(gens, shape)
    return noise


def start_latents(pipe: Any, rows: list, schedule: samplers.Schedule, cfg: bool) -> Buffers:
    """Initial latents, sampler state, per-step noise, inpainting inputs and (with CFG) the per-row guidance of a
    pipeline's (engine/pipeline.py) rows, from per-row generators."""
    r = rows[0].request
    gens = [torch.Generator("cpu").manual_seed(row.seed) for row in rows]
    shape = (1, pipe.dims.latent_channels, r.height // pipe.dims.vae_scale, r.width // pipe.dims.vae_scale)
    inpaint_9 = r.kind == "inpaint" and pipe.dims.inpainting_unet
    pure_noise = r.kind == "txt2img" or (r.kind == "inpaint" and r.strength == 1.0) or pipe.low_res is not None
    out: Buffers = {}
    image = torch.cat([row.image for row in rows]) if rows[0].image is not None else None  # [B, 3, H, W]
    if pipe.low_res is not None:  # a low-res image concatenated to the latents (engine/upscale.py)
        out.update(pipe.low_res.condition(image, rows, gens, cfg))  # [2B, 3, h, w]
        image = None
    image_latents = torch.cat([row.latents for row in rows]) if rows[0].latents is not None else None  # given
    if image is not None and image_latents is None and not (inpaint_9 and pure_noise):
        image_latents = sample_latents(pipe.role("latent_encoder"), image, gens, pipe.tiling(r))  # [B, 4, h, w]
    noise = None if rows[0].noised else randn_rows(gens, shape)  # [B, 4, h, w]
    if noise is None:  # latents another model left at schedule.start (engine/refiner.py): as they are
        latents = image_latents.to(pipe.device)
    elif pure_noise:
        latents = noise * schedule.init_noise_sigma
    else:  # the schedule's tables live on the device
        start = torch.tensor(schedule.start, device=pipe.device)
        latents = samplers.add_noise(schedule, image_latents.to(pipe.device), noise.to(pipe.device), start)
    if r.kind == "inpaint":
        mask = torch.cat([row.mask for row in rows])  # [B, 1, H, W]
        mask_lat = images.mask_latents(mask, pipe.dims.vae_scale)  # [B, 1, h, w]
        if inpaint_9:
            masked = sample_latents(pipe.role("latent_encoder"), images.masked_image(image, mask), gens,
                                    pipe.tiling(r))
            concat = torch.cat([mask_lat, masked], dim=1)  # [B, 5, h, w]
            out["concat"] = torch.cat([concat, concat]) if cfg else concat
        else:
            randn_rows(gens, shape)  # diffusers samples the masked image's latents here too: keep the streams
            out.update(image_latents=image_latents, init_noise=noise, mask=mask_lat)
    if schedule.needs_noise:  # from each row's generator, or one seeded again (LDM's pipelines: the global RNG)
        again = [torch.Generator("cpu").manual_seed(row.seed) for row in rows] if pipe.family.reseed_step_noise else gens
        out["noise"] = step_noise(schedule, again, shape)
    if cfg:
        out["guidance"] = torch.tensor([row.request.guidance_scale for row in rows]).view(-1, 1, 1, 1)
    out.update(latents=latents, state=samplers.init_state(schedule, latents))
    return out
