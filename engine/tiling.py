"""Tiled VAE decoding and encoding: large images through the autoencoder in overlapping tiles, blended as diffusers'
`AutoencoderKL.enable_vae_tiling` blends them, so the images equal diffusers' tiled output.

A tile is `tile` pixels square (default: the VAE's `sample_size`, as diffusers), `tile / scale` latents. Tiles start
every `tile * (1 - overlap)` input units (latents when decoding, pixels when encoding), the last ones smaller where
the image ends. Each tile's output is blended into the tile above and the tile to its left over
`overlap * output tile` rows / columns (a linear ramp, the blended tile kept for its right and lower neighbours),
then cut to `output tile - that extent` and the pieces joined. Encoding blends the posterior's mean and log-variance
(diffusers blends its moments), so the encoder's std output is taken back to a log-variance first.

`vae_tiling` on a request: "off", "on" (whenever the image is larger than one tile), or "auto" (the default: on only
when the untiled decode would not fit in the memory available: engine/memory.py), resolved once in `prepare`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from export.errors import RequestError

if TYPE_CHECKING:
    import torch

    from export.specs import Shape

MODES = ("auto", "on", "off")
OVERLAP = 0.25  # diffusers' tile_overlap_factor
MAX_OVERLAP = 0.5  # below it a tile still starts after the one before ends its blend


@dataclass(frozen=True)
class Tiling:
    tile: int  # pixels per tile side (diffusers' tile_sample_min_size)
    overlap: float  # the share of a tile blended with each neighbour (diffusers' tile_overlap_factor)
    scale: int  # pixels per latent

    @property
    def latent_tile(self) -> int:
        return self.tile // self.scale

    def needed(self, height: int, width: int) -> bool:
        """Whether an image of this size spans more than one tile (diffusers tiles only then)."""
        return height > self.tile or width > self.tile

    def decode(self, run: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        """`run` (latents -> pixels) over tiles of `latents` [B, C, h, w]: pixels [B, 3, h·scale, w·scale]."""
        extent = int(self.tile * self.overlap)
        return _tiled(run, latents, self.latent_tile, int(self.latent_tile * (1 - self.overlap)), extent,
                      self.tile - extent)

    def encode(self, run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`run` (pixels -> scaled latent mean and std) over tiles of `images` [B, 3, H, W]: the blended mean and
        std [B, C, H/scale, W/scale], blended as a mean and a log-variance."""
        import torch

        def moments(tile: torch.Tensor) -> torch.Tensor:
            mean, std = run(tile)
            return torch.cat([mean, 2 * torch.log(std)], dim=1)  # [B, 2C, h, w]: the scale is a shift in log space

        extent = int(self.latent_tile * self.overlap)
        out = _tiled(moments, images, self.tile, int(self.tile * (1 - self.overlap)), extent, self.latent_tile - extent)
        mean, logvar = out.chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar)

    def tiles(self, height: int, width: int) -> set[tuple[int, int]]:
        """The pixel sizes (height, width) of the tiles an image of this size is decoded in (and encoded in)."""
        out = set()
        for stride, unit in ((int(self.latent_tile * (1 - self.overlap)) * self.scale, self.scale),
                             (int(self.tile * (1 - self.overlap)), 1)):
            sizes = [{min(self.tile, n - i) // unit * unit for i in range(0, n, stride)} for n in (height, width)]
            out |= {(h, w) for h in sizes[0] for w in sizes[1]}
        return out


def _tiled(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, stride: int, extent: int,
           keep: int) -> torch.Tensor:
    """diffusers' tiling: `run` on tiles of `tile` input units starting every `stride`, each output blended into its
    upper and left neighbours over `extent` units, cut to `keep` and joined."""
    import torch

    rows = [[run(x[:, :, i:i + tile, j:j + tile]).float() for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    joined = []
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], t, extent, axis=2)
            if j > 0:
                _blend(row[j - 1], t, extent, axis=3)
        joined.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
    return torch.cat(joined, dim=2)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, axis: int) -> None:
    """b's first `extent` rows (axis 2) or columns (axis 3), in place: a's last ones fading into b's own."""
    import torch

    n = min(a.shape[axis], b.shape[axis], extent)
    if n == 0:
        return
    w = (torch.arange(n, dtype=b.dtype, device=b.device) / n).view([-1, 1] if axis == 2 else [-1])  # b's share
    near = b.narrow(axis, 0, n)
    near.copy_(a.narrow(axis, a.shape[axis] - n, n) * (1 - w) + near * w)


def resolve(r: Any, scale: int, sample_size: int, too_big: Callable[[], bool],
            bounds: tuple[Shape, Shape] | None) -> tuple[Tiling, bool]:
    """The tiling of a request whose size is known (`r`: vae_tiling, vae_tile_size, vae_tile_overlap, height, width;
    the VAE's `scale` and `sample_size`, the default tile) and whether it is on: "on" where the image spans more
    than a tile, "auto" only where also `too_big()` (the untiled decode would not fit). RequestError naming the
    field for a tile that is no multiple of the scale, or a tile outside a static-shape engine's `bounds`."""
    check(r.vae_tiling, r.vae_tile_size, r.vae_tile_overlap, scale)
    plan = Tiling(r.vae_tile_size or sample_size, r.vae_tile_overlap, scale)
    on = r.vae_tiling != "off" and plan.needed(r.height, r.width) and (r.vae_tiling == "on" or too_big())
    if on and bounds is not None:
        lo, hi = bounds
        for th, tw in sorted(plan.tiles(r.height, r.width)):
            if not (lo.height <= th <= hi.height and lo.width <= tw <= hi.width):
                raise RequestError("vae_tiling", f"a {th}x{tw} tile is outside these engines' profile ({lo.height}x"
                                                 f"{lo.width} to {hi.height}x{hi.width}): build with "
                                                 "--build-dynamic-shape down to the tiles, or vae_tiling off")
    return plan, on


def check(mode: object, tile: object, overlap: object, multiple: int) -> None:
    """RequestError naming the field for a tiling mode, tile size (pixels, a multiple of `multiple`, at least two
    of them) or overlap ([0, 0.5)) that is not one."""
    if mode not in MODES:
        raise RequestError("vae_tiling", f"vae_tiling {mode!r} is not one of {', '.join(MODES)}")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 2 * multiple
                             or tile % multiple):
        raise RequestError("vae_tile_size", f"vae_tile_size {tile!r} must be a multiple of {multiple} pixels, at least "
                                            f"{2 * multiple} (None = the VAE's sample size)")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < MAX_OVERLAP:
        raise RequestError("vae_tile_overlap", f"vae_tile_overlap {overlap!r} must be in [0, {MAX_OVERLAP})")
