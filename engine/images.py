"""Input side of img2img and inpainting: init image / mask -> tensors, as diffusers preprocesses them.

Matches what a diffusers user gets from ``diffusers.utils.load_image`` (EXIF orientation applied, then
RGB) followed by the inpaint pipeline's two ``VaeImageProcessor`` instances (the image one is also the
img2img pipeline's), for one image with an explicit height and width:

    image   VaeImageProcessor(vae_scale_factor=8)
            RGB -> resize (lanczos) -> /255 -> 2x - 1                 [1, 3, H, W] float32 in [-1, 1]
    mask    VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                              do_convert_grayscale=True)
            RGB -> resize (lanczos) -> L -> /255 -> (>= 0.5)          [1, 1, H, W] float32 in {0, 1}

The RGB conversion comes first, as in ``load_image``: the processors themselves do not convert to RGB
(an L or RGBA image would give 1 or 4 channels), and resizing an RGBA or palette image before the
conversion would give different pixels (Pillow resizes those with premultiplied alpha / nearest).
For RGB images and L masks the result also equals ``.preprocess`` of the image as it is.
Unlike diffusers, a size mismatch is an error unless the caller asks for the resize (`resize`).
"""
from __future__ import annotations

import pathlib

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from export.specs import VAE_SCALE  # every SD VAE downsamples by 8; diffusers floors sizes to it

ImageSource = str | pathlib.Path | PIL.Image.Image | np.ndarray  # ndarray: uint8 [H, W, 3] or [H, W]

RESAMPLE = PIL.Image.Resampling.LANCZOS  # VaeImageProcessor's default resample ("lanczos")


def describe(source: ImageSource, what: str) -> str:
    """How messages name a source: ``"init image a.png"`` for a path, ``"init image"`` otherwise."""
    if isinstance(source, (str, pathlib.Path)):
        return f"{what} {source}"
    return what


def open_image(source: ImageSource, what: str) -> PIL.Image.Image:
    """A PIL image from a path, a PIL image or a uint8 array; ValueError naming ``what`` if unreadable.

    A file is fully decoded here (so a truncated file fails now, not later) and closed. As in
    ``diffusers.utils.load_image``, the EXIF orientation of a file or PIL image is applied (a new image;
    the caller's PIL image is never modified). The mode is left as it is.
    """
    if isinstance(source, PIL.Image.Image):
        return PIL.ImageOps.exif_transpose(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, what)
    if not isinstance(source, (str, pathlib.Path)):
        raise ValueError(f"{what} must be a path, a PIL image or a uint8 numpy array, "
                         f"got {type(source).__name__}")
    path = pathlib.Path(source)
    name = describe(source, what)
    if not path.exists():
        raise ValueError(f"{name} does not exist")
    if path.is_dir():
        raise ValueError(f"{name} is a directory, not an image file")
    try:
        with PIL.Image.open(path) as img:
            img.load()
            return PIL.ImageOps.exif_transpose(img)  # a loaded copy: usable after the file closes
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{name} is not a readable image (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"{name} is not a readable image ({reason})") from exc


def _from_array(array: np.ndarray, what: str) -> PIL.Image.Image:
    """PIL image of a uint8 [H, W, 3] (RGB) or [H, W] (grayscale) array."""
    if array.dtype != np.uint8:
        raise ValueError(f"{what} array has dtype {array.dtype}; allowed: uint8")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"{what} array has shape {list(array.shape)}; allowed: [H, W, 3] or [H, W]")
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def _check_size(height: int, width: int, multiple: int = VAE_SCALE) -> None:
    """ValueError unless height and width are positive multiples of `multiple` (diffusers would floor them)."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple:
            raise ValueError(f"{name} {v!r} must be a positive multiple of {multiple}")


def _sized(source: ImageSource, what: str, height: int, width: int, resize: bool,
           multiple: int = VAE_SCALE) -> PIL.Image.Image:
    """The source as an RGB PIL image of (width, height): resized as VaeImageProcessor does, or an error."""
    _check_size(height, width, multiple)
    img = open_image(source, what).convert("RGB")  # diffusers.utils.load_image's conversion
    if img.size == (width, height):
        return img
    if not resize:
        w, h = img.size
        raise ValueError(f"{describe(source, what)} is {w}x{h} but the requested size is {width}x{height}; "
                         f"set `resize` to resize it (or give an image of that size)")
    return img.resize((width, height), resample=RESAMPLE)  # VaeImageProcessor.resize, resize_mode="default"


def _to_unit(img: PIL.Image.Image) -> torch.Tensor:
    """uint8 PIL image -> float32 [H, W] or [H, W, C] in [0, 1], computed as VaeImageProcessor.pil_to_numpy."""
    return torch.from_numpy(np.array(img).astype(np.float32) / 255.0)


def load_image(source: ImageSource, height: int, width: int, resize: bool = False,
               multiple: int = VAE_SCALE) -> torch.Tensor:
    """Init image -> [1, 3, H, W] float32 in [-1, 1], equal to VaeImageProcessor(8).preprocess(img, h, w); `multiple`:
    what H and W must be multiples of (the x4 upscaler's image is at the latent size: its UNet's multiple)."""
    img = _sized(source, "init image", height, width, resize, multiple)
    x = _to_unit(img)  # [H, W, 3]
    x = x.permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
    return 2.0 * x - 1.0


def load_control_image(source: ImageSource, height: int, width: int, resize: bool = False,
                       what: str = "control image") -> torch.Tensor:
    """ControlNet image -> [1, 3, H, W] float32 in [0, 1], as the ControlNet pipelines' control image processor
    (VaeImageProcessor with do_convert_rgb, no normalisation)."""
    x = _to_unit(_sized(source, what, height, width, resize))  # [H, W, 3]
    return x.permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]


def load_mask(source: ImageSource, height: int, width: int, resize: bool = False) -> torch.Tensor:
    """Mask -> [1, 1, H, W] float32 in {0, 1} (1 = repaint), equal to diffusers' mask processor output."""
    img = _sized(source, "mask", height, width, resize).convert("L")
    m = _to_unit(img)[None, None]  # [1, 1, H, W]
    return (m >= 0.5).to(torch.float32)


def mask_latents(mask: torch.Tensor, vae_scale: int = VAE_SCALE) -> torch.Tensor:
    """[B, 1, H, W] pixel mask -> [B, 1, H/vae_scale, W/vae_scale] (nearest), as prepare_mask_latents."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask has shape {list(mask.shape)}; allowed: [B, 1, H, W]")
    h, w = mask.shape[-2:]
    return torch.nn.functional.interpolate(mask, size=(h // vae_scale, w // vae_scale))


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] image with the pixels to repaint (mask >= 0.5) zeroed, as the inpaint pipeline."""
    return image * (mask < 0.5)


def load_field(loader, field: str, source, height: int, width: int, resize: bool) -> torch.Tensor | None:
    """A request's image (`source`: None when not given, or a function that makes it, such as a control image's
    preprocessor) through `loader` at the request's size; RequestError naming `field` for one that is no image."""
    from export.errors import RequestError

    if source is None:
        return None
    try:
        return loader(source() if callable(source) else source, height, width, resize)
    except ValueError as exc:
        raise RequestError(field, str(exc)) from None
