"""Images beyond 8-bit RGB: wide greyscale modes are scaled by their range, large photos load without
Pillow's decompression-bomb warning, and the project's own pixel limit gives a clear error everywhere."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mast3r_colmap import images
from mast3r_colmap.images import ImageLoadError, load_image, load_original, read_image_size, validate_image

STEPS = np.arange(256)


def _to_u8(tensor) -> np.ndarray:
    """(1, 3, H, W) network tensor in [-1, 1] -> (H, W, 3) uint8 (exact for 8-bit input)."""
    return np.rint((tensor[0].permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.int64)


def _wide_image(mode: str, values: np.ndarray) -> Image.Image:
    rows = np.repeat(values[None, :], 64, axis=0)
    if mode == "I;16":
        return Image.fromarray(rows.astype(np.uint16))
    if mode == "I;16B":
        return Image.frombytes("I;16B", (rows.shape[1], rows.shape[0]), rows.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(rows.astype(np.int32))
    return Image.fromarray(rows.astype(np.float32))


@pytest.mark.parametrize("mode, suffix, values", [
    ("I;16", ".png", 1000 + 10 * STEPS),              # 16-bit greyscale PNG, range 1000..3550
    ("I;16B", ".tif", 40000 + 100 * STEPS),           # big-endian 16-bit TIFF
    ("I", ".tif", -2_000_000_000 + 1_000_000 * STEPS),  # 32-bit integer TIFF, negative values
    ("F", ".tif", -1.0 + 4.0 / 255.0 * STEPS),         # float TIFF, range -1..3
])
def test_wide_greyscale_is_scaled_by_its_range(tmp_path: Path, mode: str, suffix: str, values: np.ndarray) -> None:
    path = tmp_path / f"grey{suffix}"
    _wide_image(mode, values).save(path)
    with Image.open(path) as check:
        assert check.mode == mode
    original = _to_u8(load_original(path))
    assert original.shape == (64, 256, 3)
    expected = np.repeat(np.repeat(STEPS[None, :, None], 64, axis=0), 3, axis=2)
    np.testing.assert_array_equal(original, expected)       # column k -> grey level k, nothing clipped
    net = _to_u8(load_image(path).img)                       # 256x64 -> 512x128
    assert net.min() == 0 and net.max() == 255
    assert abs(net.mean() - 127.5) < 1.0                     # not saturated (Pillow alone: 99.6 % white)


def test_constant_wide_image_is_mid_grey(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((8, 8), 54321, dtype=np.uint16)).save(path)
    assert np.unique(_to_u8(load_original(path))).tolist() == [128]


def test_float_image_with_nan_and_inf(tmp_path: Path) -> None:
    arr = np.array([[0.0, 1.0, 2.0, np.nan, np.inf, -np.inf]] * 2, dtype=np.float32)
    path = tmp_path / "nan.tif"
    Image.fromarray(arr).save(path)
    assert _to_u8(load_original(path))[0, :, 0].tolist() == [0, 128, 255, 0, 255, 0]


def test_eight_bit_modes_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (6, 8, 4), dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    np.testing.assert_array_equal(_to_u8(load_original(path)), rgba[..., :3])
    grey = rng.integers(0, 40, (6, 8), dtype=np.uint8)      # a dark 8-bit image is not stretched
    Image.fromarray(grey).save(path)
    np.testing.assert_array_equal(_to_u8(load_original(path))[..., 0], grey)


@pytest.fixture(scope="module")
def photo_108mp(tmp_path_factory) -> Path:
    """12000 x 9000 = 108 MP, one colour (fast to write and to read)."""
    path = tmp_path_factory.mktemp("big") / "big.png"
    Image.new("L", (12000, 9000), 77).save(path, compress_level=1)
    return path


def test_108_megapixel_photo_loads_without_warning(photo_108mp: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # Pillow's DecompressionBombWarning would raise
        assert read_image_size(photo_108mp) == (12000, 9000)
        assert validate_image(photo_108mp) == (12000, 9000)


def test_pixel_limit_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "limit.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1200)
    assert read_image_size(path) == (40, 30)                 # exactly at the limit: accepted
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1199)
    for reader in (read_image_size, validate_image, load_image, load_original):
        with pytest.raises(ImageLoadError) as excinfo:
            reader(path)
        message = str(excinfo.value)
        assert "40x30 = 1,200 pixels" in message and "limit of 1,199" in message, reader
        assert "too large" in message and "MAX_IMAGE_PIXELS" in message and "limit.png" in message, reader
