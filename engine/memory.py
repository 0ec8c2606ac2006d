"""Will a request fit? An estimate of its largest activations, checked before any work (the CLI and the server
use this one estimate: engine.pipeline's prepare calls `check`).

The estimate counts only the tensors that dominate at large sizes, so it is a lower bound of what a run needs:
- the UNet's highest-resolution self-attention, where attention is decomposed in the graphs (build.json's
  "attention"): scores and their softmax, [rows x heads, N, N] each, N = (H / s) x (W / s) tokens;
- the latent decoder: three live tensors of its full-resolution blocks, [images, C, H, W], and its mid-block
  attention over every latent pixel (one head), decomposed likewise.
Rows are the UNet batch: images, twice with classifier-free guidance. A request whose estimate is over the memory
available now (RAM for CPU backends, free GPU memory for CUDA) is refused naming both, instead of failing deep in a
backend's allocator after minutes of work (16384² reached a raw OpenVINO allocation error).
"""
from __future__ import annotations

from dataclasses import dataclass

from export.errors import RequestError
from export.footprint import Footprint

GIB = 2**30
LIVE_DECODER_TENSORS = 3  # input, normalised and convolved activations of a full-resolution decoder block
HALF_PRECISIONS = ("fp16", "bf16")


@dataclass(frozen=True)
class Estimate:
    unet_bytes: int  # the UNet step's largest activations
    decoder_bytes: int  # the latent decoder's

    @property
    def peak_bytes(self) -> int:
        return max(self.unet_bytes, self.decoder_bytes)  # the stages run one after the other


def estimate(fp: Footprint, height: int, width: int, images: int, cfg: bool, precision: str,
             attention: str, latent_scale: int, decode: tuple[int, int] | None = None) -> Estimate:
    """The largest activations of one batch of `images` at height x width (bytes); `decode`: the (height, width)
    the latent decoder runs at when that is a tile (engine/tiling.py)."""
    elem = 2 if precision in HALF_PRECISIONS else 4  # int8 engines compute activations in fp32
    decomposed = attention == "decomposed"
    rows = images * (2 if cfg else 1)
    unet = 0
    if decomposed and fp.attention_scale:
        tokens = (height // fp.attention_scale) * (width // fp.attention_scale)
        unet = 2 * rows * fp.attention_heads * tokens * tokens * elem  # scores + softmax
    dh, dw = decode or (height, width)
    decoder = LIVE_DECODER_TENSORS * images * fp.decoder_channels * dh * dw * elem
    if decomposed and fp.decoder_attention:
        latents = (dh // latent_scale) * (dw // latent_scale)
        decoder = max(decoder, 2 * images * latents * latents * elem)
    return Estimate(unet, decoder)


def available_bytes(device: str) -> int:
    """Memory a run may still take now: free GPU memory on CUDA, else available RAM."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check(fp: Footprint, height: int, width: int, images: int, cfg: bool, precision: str, attention: str,
          latent_scale: int, device: str, decode: tuple[int, int] | None = None) -> Estimate:
    """The estimate; RequestError naming `height` when it is over what is available."""
    found = estimate(fp, height, width, images, cfg, precision, attention, latent_scale, decode)
    free = available_bytes(device)
    if found.peak_bytes > free:
        stage = "UNet attention" if found.unet_bytes >= found.decoder_bytes else "latent decoder"
        stage += "; vae_tiling on would cut it" if stage == "latent decoder" and decode is None else ""
        raise RequestError("height", f"{height}x{width} x {images} image(s) needs at least {_gib(found.peak_bytes)} "
                                     f"for its largest activations ({stage}); {_gib(free)} is available on {device}: "
                                     "ask for a smaller size or fewer images")
    return found


def _gib(n: int) -> str:
    return f"{n / GIB:,.1f} GiB"
