"""Tests for mast3r_colmap.images: official-equivalent preprocessing and exact coordinate maps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mast3r_colmap.images import (ImageLoadError, LoadedImage, list_images, load_image, read_image_size,
                                  validate_image)

DATA = Path(__file__).parent / "data"
IMAGES = DATA / "images"
LANDSCAPE = IMAGES / "landscape_900x600.jpg"
PORTRAIT = IMAGES / "portrait_exif6_600x900.jpg"


def _local_copy(ref_path: str) -> Path:
    """Map a path relative to shared/reference/ (as stored in preprocess.npz) to its copy in tests/data."""
    base = os.path.basename(ref_path)
    if ref_path.startswith("images/"):
        return IMAGES / base
    if ref_path.startswith("../datasets/sacre_coeur/mapping/"):
        return DATA / "sacre_coeur" / "mapping" / base
    raise AssertionError(f"unexpected reference path {ref_path}")


def _cases() -> list[tuple[str, str, int]]:
    with np.load(DATA / "preprocess.npz") as d:
        return [(str(c), str(f), int(s)) for c, f, s in zip(d["cases"], d["files"], d["sizes"])]


CASES = _cases()


def test_preprocess_vectors_cover_all_cases() -> None:
    assert len(CASES) == 9
    assert {s for _, _, s in CASES} == {224, 512}


@pytest.mark.parametrize("case,ref_file,size", CASES, ids=[c for c, _, _ in CASES])
def test_load_image_bit_exact_against_official(case: str, ref_file: str, size: int) -> None:
    with np.load(DATA / "preprocess.npz") as d:
        u8 = d[f"{case}_img"]
        true_shape = d[f"{case}_true_shape"]
    li = load_image(_local_copy(ref_file), size=size)

    assert li.img.dtype == torch.float32
    assert li.true_shape.dtype == torch.int32
    assert li.true_shape.tolist() == [true_shape.tolist()]
    assert tuple(li.img.shape) == (1, 3, u8.shape[0], u8.shape[1])

    # Pixel-level report first (a plain tensor comparison says nothing about where it differs).
    got_u8 = np.rint((li.img[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255.0).astype(np.int32)
    diff = np.abs(got_u8 - u8.astype(np.int32))
    assert int(diff.max()) == 0, (
        f"{case}: {int((diff > 0).sum())} channel values differ, max abs diff {int(diff.max())}"
    )

    expected = ((u8.astype(np.float32) / np.float32(255)) - np.float32(0.5)) / np.float32(0.5)
    expected_t = torch.from_numpy(np.ascontiguousarray(expected.transpose(2, 0, 1)))[None]
    assert torch.equal(li.img, expected_t)
    assert float(li.img.min()) >= -1.0 and float(li.img.max()) <= 1.0


def test_landscape_geometry_and_known_pixel_centres() -> None:
    # 900x600, S = 900 > 512 -> LANCZOS to (512, round(341.33) = 341).
    # Crop: cx = 256, cy = 170; halfw = (512 // 16) * 8 = 256; halfh = (340 // 16) * 8 = 168
    # -> box (0, 2, 512, 338): left 0, top 170 - 168 = 2, network 512x336.
    li = load_image(LANDSCAPE)
    assert li.original_size == (900, 600)
    assert li.resized_size == (512, 341)
    assert li.crop_offset == (0, 2)
    assert li.network_size == (512, 336)
    assert li.true_shape.tolist() == [[336, 512]]
    assert li.name == "landscape_900x600.jpg"
    assert li.path == str(LANDSCAPE)

    net = np.array([[0.0, 0.0], [511.0, 335.0], [256.0, 168.0]])
    # x = (x_net + 0 + 0.5) * 900/512 - 0.5 ; y = (y_net + 2 + 0.5) * 600/341 - 0.5
    # (0, 0)      -> (97/256, 2659/682)
    # (511, 335)  -> (230047/256, 404659/682)
    # (256, 168)  -> (115297/256, 599/2): the network pixel (256, 168) sits exactly at original row 299.5
    expected = np.array(
        [
            [0.37890625, 3.898826979472141],
            [898.62109375, 593.341642228739],
            [450.37890625, 299.5],
        ]
    )
    np.testing.assert_allclose(li.to_original(net), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(li.to_network(expected), net, rtol=0, atol=1e-12)

    # Per-axis scales are kept separately (they differ because of rounding).
    assert li.scale == (900 / 512, 600 / 341)
    assert li.scale[0] != li.scale[1]
    # The affine map: per-axis scale and the translation (the image of network pixel (0, 0)).
    np.testing.assert_allclose(li.to_original(np.array([[0.0, 0.0]])), [[0.37890625, 3.898826979472141]],
                               rtol=0, atol=1e-12)


def test_portrait_exif_transposed_geometry() -> None:
    # Stored 900x600 with EXIF orientation 6 -> 600x900 after transpose (the network image is upright)
    # -> resized (341, 512) -> crop cx = 170: halfw = (340 // 16) * 8 = 168, left 2; network 336x512 (W x H).
    li = load_image(PORTRAIT)
    assert li.orientation == 6
    assert li.upright_size == (600, 900)
    assert li.original_size == (900, 600)  # the stored pixels: the frame of keypoints and cameras (COLMAP's)
    assert li.resized_size == (341, 512)
    assert li.crop_offset == (2, 0)
    assert li.true_shape.tolist() == [[512, 336]]
    # Upright (3.8988..., 0.3789...); orientation 6 stores upright (u, v) at (v, H_stored - 1 - u).
    np.testing.assert_allclose(
        li.to_original(np.array([[0.0, 0.0]])), [[0.37890625, 599 - 3.898826979472141]], rtol=0, atol=1e-12
    )
    assert read_image_size(PORTRAIT) == validate_image(PORTRAIT) == (900, 600)


def test_size_224_shape_and_geometry() -> None:
    # Short side to 224: 900x600 -> (336, 224); centre square crop of side 2 * min(168, 112) = 224, left 56.
    li = load_image(LANDSCAPE, size=224)
    assert li.true_shape.tolist() == [[224, 224]]
    assert tuple(li.img.shape) == (1, 3, 224, 224)
    assert li.resized_size == (336, 224)
    assert li.crop_offset == (56, 0)
    # network centre (111.5, 111.5) -> original centre (449.5, 299.5)
    np.testing.assert_allclose(li.to_original(np.array([[111.5, 111.5]])), [[449.5, 299.5]], atol=1e-12)


def test_other_size_uses_long_side_rule() -> None:
    # size 256: 900x600 -> (256, round(170.67) = 171); halfh = (170 // 16) * 8 = 80 -> 256x160.
    li = load_image(LANDSCAPE, size=256)
    assert li.resized_size == (256, 171)
    assert li.true_shape.tolist() == [[160, 256]]
    assert li.crop_offset == (0, 85 - 80)


def test_coordinate_maps_are_exact_inverses() -> None:
    rng = np.random.default_rng(0)
    for path, size in [(LANDSCAPE, 512), (PORTRAIT, 512), (LANDSCAPE, 224), (IMAGES / "small_120x70.png", 512)]:
        li = load_image(path, size=size)
        w, h = li.network_size
        xy = rng.uniform(-10.0, [w + 10.0, h + 10.0], size=(1000, 2))
        back = li.to_original(li.to_network(xy))
        np.testing.assert_allclose(back, xy, rtol=0, atol=1e-9)
        np.testing.assert_allclose(li.to_network(li.to_original(xy)), xy, rtol=0, atol=1e-9)
        assert li.to_original(np.zeros((0, 2))).shape == (0, 2)


def test_coordinate_map_matches_pixel_content(tmp_path: Path) -> None:
    """A linear ramp survives a bicubic x2 upscale, so pixel values reveal the true coordinate map."""
    # Original 210x256 (W x H): R = x, G = y (exact integers). Resized to (420, 512) with BICUBIC,
    # crop cx = 210: halfw = (420 // 16) * 8 = 208 -> left 2; network 416x512.
    w0, h0 = 210, 256
    yy, xx = np.mgrid[0:h0, 0:w0]
    arr = np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    path = tmp_path / "ramp.png"
    Image.fromarray(arr).save(path)

    li = load_image(path)
    assert li.resized_size == (420, 512) and li.crop_offset == (2, 0) and li.network_size == (416, 512)
    net_u8 = np.rint((li.img[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255.0)
    hn, wn = net_u8.shape[:2]
    yn, xn = np.mgrid[0:hn, 0:wn]
    orig = li.to_original(np.stack([xn.ravel(), yn.ravel()], axis=1).astype(np.float64))
    pred_x = orig[:, 0].reshape(hn, wn)
    pred_y = orig[:, 1].reshape(hn, wn)
    inner = (slice(8, hn - 8), slice(8, wn - 8))  # away from the borders where the kernel is clamped
    res_x = net_u8[..., 0][inner] - pred_x[inner]
    res_y = net_u8[..., 1][inner] - pred_y[inner]
    # Correct map: residual is only the uint8 rounding of values at .25/.75 -> exactly +-0.25.
    # A half-pixel convention error would shift the residual by 0.25 (to 0 / 0.5 or -0.5 / 0).
    assert np.abs(res_x).max() <= 0.25 + 1e-6
    assert np.abs(res_y).max() <= 0.25 + 1e-6
    assert abs(res_x.mean()) < 0.02 and abs(res_y.mean()) < 0.02


# ----------------------------------------------------------------------------------------- errors
def _assert_load_error(path: Path) -> None:
    with pytest.raises(ImageLoadError) as excinfo:
        load_image(path)
    assert path.name in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    _assert_load_error(tmp_path / "does_not_exist_123.jpg")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty_file.jpg"
    p.write_bytes(b"")
    _assert_load_error(p)


def test_text_file_with_jpg_extension(tmp_path: Path) -> None:
    p = tmp_path / "not_an_image.jpg"
    p.write_text("this is not an image\n" * 20)
    _assert_load_error(p)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    d = tmp_path / "folder.jpg"
    d.mkdir()
    _assert_load_error(d)


@pytest.mark.parametrize("nbytes", [100, 42000])
def test_truncated_jpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    # 100 bytes fails in Image.open; 42000 bytes opens (header complete) but fails to decode.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    p = tmp_path / f"truncated_{nbytes}.jpg"
    p.write_bytes(LANDSCAPE.read_bytes()[:nbytes])
    _assert_load_error(p)


def test_one_pixel_image(tmp_path: Path) -> None:
    p = tmp_path / "one_pixel.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(p)
    _assert_load_error(p)


def test_too_elongated_image_gives_empty_crop(tmp_path: Path) -> None:
    # 1000x10 -> resized (512, 5): halfh = (4 // 16) * 8 = 0 -> empty crop.
    p = tmp_path / "thin_strip.png"
    Image.new("RGB", (1000, 10), (1, 2, 3)).save(p)
    _assert_load_error(p)


def test_invalid_size_argument() -> None:
    with pytest.raises(ValueError):
        load_image(LANDSCAPE, size=0)


def test_loaded_image_type() -> None:
    li = load_image(IMAGES / "rgba_300x300.png", name="custom/name.png")
    assert isinstance(li, LoadedImage)
    assert li.name == "custom/name.png"
    assert li.original_size == (300, 300)
    assert li.crop_offset == (0, 64)  # square 512x512 -> 512x384, top = 256 - 192


# ----------------------------------------------------------------------------------- list_images
def test_list_images(tmp_path: Path) -> None:
    files = [
        "b.jpg",
        "a.PNG",
        "sub/c.jpeg",
        "sub/deeper/d.TIF",
        "sub/deeper/e.tiff",
        "z/f.bmp",
        "z/g.WebP",
        "z/h.JpG",
    ]
    ignored = ["notes.txt", "sub/readme.md", "z/archive.jpg.zip", "sub/noext", "model.pth"]
    for rel in files + ignored:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "dir_named.jpg").mkdir()  # a folder is not an image file
    (tmp_path / "empty_subdir").mkdir()

    names = list_images(tmp_path)
    assert names == sorted(files)
    assert names == [
        "a.PNG",
        "b.jpg",
        "sub/c.jpeg",
        "sub/deeper/d.TIF",
        "sub/deeper/e.tiff",
        "z/f.bmp",
        "z/g.WebP",
        "z/h.JpG",
    ]
    assert list_images(str(tmp_path / "sub")) == ["c.jpeg", "deeper/d.TIF", "deeper/e.tiff"]


def test_list_images_missing_root(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "missing")


def test_list_images_on_real_data() -> None:
    names = list_images(DATA / "sacre_coeur")
    assert "mapping/02928139_3448003521.jpg" in names
    assert "query/night.jpg" in names
    assert all(not n.endswith(".md") for n in names)
