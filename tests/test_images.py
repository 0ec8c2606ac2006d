"""engine.images against diffusers' preprocessing, plus the errors for unusable inputs.

Expected tensors come from diffusers as its users drive it (``diffusers.utils.load_image`` then the two
VaeImageProcessor instances the inpaint pipeline builds), or from plain numpy / torch on the source
pixels, never from engine.images itself. Images are seeded noise.
"""
from __future__ import annotations

import gc
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image as diffusers_load_image

from engine import images
from engine.images import load_image, load_mask, mask_latents, masked_image, open_image

EXACT = {"atol": 0.0, "rtol": 0.0}


@pytest.fixture(scope="module")
def image_processor() -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=8)


@pytest.fixture(scope="module")
def mask_processor() -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                             do_convert_grayscale=True)


def noise(seed: int, *shape: int) -> np.ndarray:
    """Seeded uint8 noise of ``shape``."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def save(tmp_path, name: str, array: np.ndarray, mode: str | None = None):
    """Write ``array`` as a PNG under tmp_path and return its path."""
    img = PIL.Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    path = tmp_path / name
    img.save(path)
    return path


# ----------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_image_same_size_matches_diffusers(tmp_path, image_processor, mode):
    arr = noise(0, 48, 80, 4 if mode == "RGBA" else 3)
    if mode == "RGBA":
        path = save(tmp_path, "a.png", arr)  # real per-pixel alpha
    else:
        path = save(tmp_path, "a.png", arr[..., :3], mode)
    with PIL.Image.open(path) as ref:
        assert ref.mode == mode
    expected = image_processor.preprocess(diffusers_load_image(str(path)), height=48, width=80)
    got = load_image(path, 48, 80)
    assert got.shape == (1, 3, 48, 80) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
@pytest.mark.parametrize("src_hw", [(48, 80), (100, 60), (64, 72)])
def test_image_resized_matches_diffusers(tmp_path, image_processor, mode, src_hw):
    h, w = src_hw
    arr = noise(1, h, w, 4 if mode == "RGBA" else 3)
    path = save(tmp_path, "a.png", arr) if mode == "RGBA" else save(tmp_path, "a.png", arr[..., :3], mode)
    with PIL.Image.open(path) as ref:
        assert ref.mode == mode
    expected = image_processor.preprocess(diffusers_load_image(str(path)), height=64, width=64)
    got = load_image(path, 64, 64, resize=True)
    assert got.shape == (1, 3, 64, 64)
    torch.testing.assert_close(got, expected, **EXACT)


def test_image_values_are_pixels_scaled_to_unit_range(tmp_path):
    arr = noise(2, 16, 24, 3)
    got = load_image(save(tmp_path, "a.png", arr), 16, 24)
    expected = torch.from_numpy(arr.astype(np.float64) / 127.5 - 1.0).permute(2, 0, 1)[None]
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    assert got.min() >= -1.0 and got.max() <= 1.0


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1"])
def test_mask_same_size_matches_diffusers(tmp_path, mask_processor, mode):
    arr = noise(3, 48, 80, 4) if mode == "RGBA" else noise(3, 48, 80)
    path = save(tmp_path, "m.png", arr, None if mode in ("L", "RGBA") else mode)
    with PIL.Image.open(path) as ref:
        assert ref.mode == mode
    expected = mask_processor.preprocess(diffusers_load_image(str(path)), height=48, width=80)
    got = load_mask(path, 48, 80)
    assert got.shape == (1, 1, 48, 80) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **EXACT)
    assert set(got.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
@pytest.mark.parametrize("src_hw", [(48, 80), (100, 60)])
def test_mask_resized_matches_diffusers(tmp_path, mask_processor, src_hw, mode):
    arr = noise(4, *src_hw, 4) if mode == "RGBA" else noise(4, *src_hw, 3)
    path = save(tmp_path, "m.png", arr, None if mode == "RGBA" else mode)
    with PIL.Image.open(path) as ref:
        assert ref.mode == mode
    expected = mask_processor.preprocess(diffusers_load_image(str(path)), height=64, width=64)
    got = load_mask(path, 64, 64, resize=True)
    assert got.shape == (1, 1, 64, 64)
    torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("resize", [False, True])
def test_rgb_image_and_gray_mask_match_processors_without_load_image(
        tmp_path, image_processor, mask_processor, resize):
    """For these modes ``.preprocess`` of the file as opened gives the same tensors as well."""
    h, w = (64, 64) if resize else (48, 80)
    image = save(tmp_path, "a.png", noise(14, 48, 80, 3))
    mask = save(tmp_path, "m.png", noise(15, 48, 80))
    with PIL.Image.open(image) as ref:
        expected = image_processor.preprocess(ref, height=h, width=w)
    torch.testing.assert_close(load_image(image, h, w, resize=resize), expected, **EXACT)
    with PIL.Image.open(mask) as ref:
        assert ref.mode == "L"
        expected = mask_processor.preprocess(ref, height=h, width=w)
    torch.testing.assert_close(load_mask(mask, h, w, resize=resize), expected, **EXACT)


def test_mask_threshold_is_128(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = load_mask(save(tmp_path, "m.png", arr), 16, 16)
    assert torch.equal(got[0, 0], torch.from_numpy(arr >= 128).float())


# ----------------------------------------------------------------------------- in-memory sources


def test_pil_and_ndarray_sources(image_processor, mask_processor):
    rgb = noise(5, 32, 40, 3)
    gray = noise(6, 32, 40)
    expected = image_processor.preprocess(PIL.Image.fromarray(rgb), height=32, width=40)
    torch.testing.assert_close(load_image(rgb, 32, 40), expected, **EXACT)
    torch.testing.assert_close(load_image(PIL.Image.fromarray(rgb), 32, 40), expected, **EXACT)
    expected = mask_processor.preprocess(PIL.Image.fromarray(gray), height=32, width=40)
    torch.testing.assert_close(load_mask(gray, 32, 40), expected, **EXACT)
    torch.testing.assert_close(load_mask(PIL.Image.fromarray(gray), 32, 40), expected, **EXACT)
    expected = image_processor.preprocess(PIL.Image.fromarray(rgb), height=64, width=64)
    torch.testing.assert_close(load_image(rgb, 64, 64, resize=True), expected, **EXACT)
    # a grayscale array as init image becomes RGB with three equal channels
    got = load_image(gray, 32, 40)
    assert got.shape == (1, 3, 32, 40)
    assert torch.equal(got[:, 0], got[:, 1]) and torch.equal(got[:, 1], got[:, 2])


def test_pil_source_is_not_modified():
    src = PIL.Image.fromarray(noise(7, 40, 48, 3))
    before = np.array(src)
    load_image(src, 64, 64, resize=True)
    assert src.size == (48, 40) and np.array_equal(np.array(src), before)


@pytest.mark.parametrize("array, match", [
    (np.zeros((8, 8, 3), dtype=np.float32), "dtype float32; allowed: uint8"),
    (np.zeros((8, 8, 4), dtype=np.uint8), r"shape \[8, 8, 4\]; allowed: \[H, W, 3\] or \[H, W\]"),
    (np.zeros((1, 8, 8, 3), dtype=np.uint8), r"shape \[1, 8, 8, 3\]"),
])
def test_bad_array_is_rejected(array, match):
    with pytest.raises(ValueError, match=f"^init image array has {match}"):
        load_image(array, 8, 8)


def test_bad_source_type_is_rejected():
    with pytest.raises(ValueError, match="^mask must be a path, a PIL image or a uint8 numpy array, got int$"):
        load_mask(3, 8, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize("height, width, bad", [(60, 64, "height 60"), (64, 0, "width 0"), (64, -8, "width -8")])
def test_size_must_be_positive_multiple_of_8(height, width, bad):
    with pytest.raises(ValueError, match=f"^{bad} must be a positive multiple of 8$"):
        load_image(noise(8, 64, 64, 3), height, width)


# ----------------------------------------------------------------------------- size mismatch


@pytest.mark.parametrize("fn, what", [(load_image, "init image"), (load_mask, "mask")])
def test_size_mismatch_names_both_sizes_and_flag(tmp_path, fn, what):
    path = save(tmp_path, "a.png", noise(9, 480, 640, 3))
    with pytest.raises(ValueError) as err:
        fn(path, 512, 512)
    msg = str(err.value)
    assert msg == (f"{what} {path} is 640x480 but the requested size is 512x512; "
                   "set `resize` to resize it (or give an image of that size)")
    assert "\n" not in msg


def test_size_mismatch_in_memory_source_and_width_height_order():
    with pytest.raises(ValueError, match=r"^init image is 80x48 but the requested size is 64x32; set `resize`"):
        load_image(noise(10, 48, 80, 3), 32, 64)  # height 32, width 64


def test_exif_orientation_is_applied(tmp_path):
    arr = noise(11, 16, 24, 3)  # stored 24 wide x 16 high
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "rotated.png"
    PIL.Image.fromarray(arr).save(path, exif=exif)
    got = load_image(path, 24, 16)  # displayed 16 wide x 24 high
    expected = torch.from_numpy(np.rot90(arr, k=-1).astype(np.float64) / 127.5 - 1.0).permute(2, 0, 1)[None]
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize("what", ["init image", "mask"])
def test_unreadable_files_name_path_and_what(tmp_path, what):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    png = save(tmp_path, "full.png", noise(12, 64, 64, 3))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    cases = {
        text: f"^{what} {text} is not a readable image \\(cannot identify image file\\)$",
        tmp_path / "missing.png": f"^{what} {tmp_path / 'missing.png'} does not exist$",
        tmp_path: f"^{what} {tmp_path} is a directory, not an image file$",
        truncated: f"^{what} {truncated} is not a readable image \\(.+\\)$",
    }
    for path, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern):
            open_image(path, what)
        with pytest.raises(ValueError, match=f"^{what} {path} "):
            (load_image if what == "init image" else load_mask)(str(path), 64, 64)


def test_files_are_closed(tmp_path):
    arr = noise(13, 16, 16, 3)
    path = save(tmp_path, "a.png", arr)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:-40])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        img = open_image(path, "init image")
        for bad in (text, truncated):
            with pytest.raises(ValueError, match="is not a readable image"):
                open_image(bad, "mask")
        gc.collect()  # an unclosed file object warns when it is collected
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert np.array_equal(np.array(img), arr)


# ----------------------------------------------------------------------------- latent mask, masked image


def test_mask_latents_is_nearest_downsample():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 64, 48, generator=g) > 0.5).float()  # [2, 1, 64, 48]
    got = mask_latents(mask, 8)
    assert got.shape == (2, 1, 8, 6)
    torch.testing.assert_close(got, torch.nn.functional.interpolate(mask, size=(8, 6)), **EXACT)
    # nearest with an integer factor picks the top-left pixel of each 8x8 block
    torch.testing.assert_close(got, mask[:, :, ::8, ::8], **EXACT)
    with pytest.raises(ValueError, match=r"^mask has shape \[1, 3, 64, 64\]; allowed: \[B, 1, H, W\]$"):
        mask_latents(torch.zeros(1, 3, 64, 64), 8)


def test_masked_image_zeroes_masked_pixels():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 16, 24, generator=g) * 2 - 1  # [1, 3, H, W]
    mask = (torch.rand(1, 1, 16, 24, generator=g) > 0.5).float()  # [1, 1, H, W]
    got = masked_image(image, mask)
    assert got.shape == image.shape
    keep = mask[0, 0] == 0
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(got[0][:, keep], image[0][:, keep])
    assert torch.count_nonzero(got[0][:, ~keep]) == 0


def test_module_exports():
    assert images.ImageSource is not None
    assert images.VAE_SCALE == 8
