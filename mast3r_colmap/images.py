"""Image loading equivalent to MASt3R/DUSt3R's ``load_images`` preprocessing.

The network image is ``crop(resize(exif_transpose(original)))``:

* open with PIL, apply the EXIF orientation, convert to RGB (alpha is dropped, not composited);
  16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) greyscale images are first scaled to
  8 bit by their own range (min -> 0, max -> 255, nothing clipped; a constant image becomes mid-grey
  128), where Pillow's conversion would saturate them;
* resize: for ``size == 224`` the short side goes to 224, otherwise the long side goes to ``size``;
  PIL LANCZOS when downscaling, BICUBIC when upscaling (or keeping the size);
* crop around the centre ``(W // 2, H // 2)`` to dimensions that are multiples of 16 (a square image
  becomes 4:3), or, for ``size == 224``, to a centre square;
* normalise to float32 ``((u8 / 255) - 0.5) / 0.5`` in CHW layout.

Two pixel frames:

* the **original** (stored) frame: the pixels as stored in the file, ignoring the EXIF orientation, as
  COLMAP (``pycolmap.import_images``, ``infer_camera_from_image``) and hloc read them. Keypoints, matches,
  camera sizes and intrinsics live in this frame (``LoadedImage.original_size``, :func:`read_image_size`);
* the **upright** frame: the image after the EXIF orientation (``exif_transpose``), which is what the
  network sees (MASt3R works best upright); coarse-to-fine crops are cut from it (:func:`load_original`).

The resize and the crop are axis-aligned and the EXIF orientation is a flip/rotation by multiples of 90°,
so the relation between network pixels and original pixels is an exact affine map, exposed by
:class:`LoadedImage` (``to_original``, ``to_network``; ``upright_to_original``, ``original_to_upright``
for the orientation alone, see :func:`upright_to_stored`). Coordinates follow hloc/COLMAP-style
*pixel-centre* conventions in which ``(0, 0)`` is the centre of the top-left pixel.

Every reader (:func:`load_image`, :func:`load_original`, :func:`validate_image`,
:func:`read_image_size`) opens files through one helper, so they accept and reject the same files with
the same :class:`ImageLoadError` messages, including images above :data:`MAX_IMAGE_PIXELS`.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "LoadedImage",
    "MAX_IMAGE_PIXELS",
    "list_images",
    "load_image",
    "load_original",
    "read_image_size",
    "stored_to_upright",
    "upright_to_stored",
    "validate_image",
]

logger = logging.getLogger(__name__)

#: File extensions (lower case, with the dot) recognised by :func:`list_images`.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: Images whose width or height is below this are rejected. The official loader
#: would upsample e.g. a 1x1 image to a constant 512x384 image; we treat such files as invalid input.
MIN_ORIGINAL_SIDE = 2

#: Images with more pixels (width x height) than this are rejected with :class:`ImageLoadError` (a
#: 350 MP RGB image decodes to 1 GB). Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89 MP, above
#: which it warns of a "decompression bomb" and at twice which it refuses) is raised to this value when
#: this module is imported (unless it is already higher or off), so large photos load without that warning.
MAX_IMAGE_PIXELS = 350_000_000

if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

#: Modes of the greyscale images with more than 8 bits that are scaled by their range (see :func:`_to_rgb`).
_WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


class ImageLoadError(ValueError):
    """Raised when an image file cannot be read or cannot be turned into a network input."""


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A preprocessed image plus the exact geometry relating it to the original file.

    Attributes:
        img: (1, 3, H, W) float32 tensor with values in [-1, 1] (upright).
        true_shape: (1, 2) int32 tensor holding (H, W) of ``img``.
        upright_size: (W, H) of the image after EXIF transpose (what was resized).
        resized_size: (W, H) of the image after resizing and before cropping.
        crop_offset: (left, top) of the crop inside the resized image, in integer pixels.
        name: image name (by default the file's base name).
        path: path of the file that was read.
        size: the ``size`` argument used for loading.
        orientation: the file's EXIF orientation (1..8; 1 when absent or invalid).
    """

    img: torch.Tensor
    true_shape: torch.Tensor
    upright_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_offset: tuple[int, int]
    name: str
    path: str
    size: int = 512
    orientation: int = 1
    _scale: np.ndarray = field(init=False, repr=False)
    _offset: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        scale = np.array(
            [
                self.upright_size[0] / self.resized_size[0],
                self.upright_size[1] / self.resized_size[1],
            ],
            dtype=np.float64,
        )
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_offset", np.asarray(self.crop_offset, dtype=np.float64))

    # ------------------------------------------------------------------ shapes
    @property
    def network_size(self) -> tuple[int, int]:
        """(W, H) of the network image."""
        return int(self.img.shape[-1]), int(self.img.shape[-2])

    @property
    def original_size(self) -> tuple[int, int]:
        """(W, H) of the stored pixels (the frame of :meth:`to_original`, keypoints and cameras)."""
        w, h = self.upright_size
        return (h, w) if self.orientation in _SWAPPING else (w, h)

    @property
    def scale(self) -> tuple[float, float]:
        """Per-axis scale (W_upright / W_resized, H_upright / H_resized)."""
        return float(self._scale[0]), float(self._scale[1])

    # ------------------------------------------------------------ coordinates
    def to_original(self, xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) network (x, y) pixel-centre coordinates to original (stored-frame) coordinates (float64).

        Upright: ``x_up = (x_net + crop_left + 0.5) * (W_upright / W_resized) - 0.5``, likewise for y;
        then :meth:`upright_to_original`.
        """
        pts = _as_points(xy)
        return self.upright_to_original((pts + self._offset + 0.5) * self._scale - 0.5)

    def to_network(self, xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) original (stored-frame) (x, y) pixel-centre coordinates to network coordinates (float64).

        Exact inverse of :meth:`to_original`.
        """
        pts = self.original_to_upright(xy)
        return (pts + 0.5) / self._scale - 0.5 - self._offset

    def upright_to_original(self, xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) upright (EXIF-transposed) pixel-centre coordinates to the stored frame (float64)."""
        return upright_to_stored(xy, self.orientation, self.original_size)

    def original_to_upright(self, xy: np.ndarray) -> np.ndarray:
        """Map (N, 2) stored-frame pixel-centre coordinates to the upright frame (float64)."""
        return stored_to_upright(xy, self.orientation, self.original_size)


#: EXIF orientations that swap width and height.
_SWAPPING = (5, 6, 7, 8)

#: Per EXIF orientation: (A, (cx, cy)) with ``stored = A @ upright + (cx * (W_s - 1), cy * (H_s - 1))``,
#: in pixel-centre coordinates and with the stored size (W_s, H_s); the inverse of what
#: ``ImageOps.exif_transpose`` does to the pixels (tests/test_exif_frame.py checks all 8 against it).
_ORIENTATION_MAPS: dict[int, tuple[tuple[tuple[int, int], tuple[int, int]], tuple[int, int]]] = {
    1: (((1, 0), (0, 1)), (0, 0)),      # as stored
    2: (((-1, 0), (0, 1)), (1, 0)),     # mirrored left-right
    3: (((-1, 0), (0, -1)), (1, 1)),    # rotated 180°
    4: (((1, 0), (0, -1)), (0, 1)),     # mirrored top-bottom
    5: (((0, 1), (1, 0)), (0, 0)),      # transposed
    6: (((0, 1), (-1, 0)), (0, 1)),     # stored rotated 90° counter-clockwise (shown rotated clockwise)
    7: (((0, -1), (-1, 0)), (1, 1)),    # transversed
    8: (((0, -1), (1, 0)), (1, 0)),     # stored rotated 90° clockwise (shown rotated counter-clockwise)
}


def _orientation_affine(orientation: int, stored_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if orientation not in _ORIENTATION_MAPS:
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation!r}")
    a, (cx, cy) = _ORIENTATION_MAPS[orientation]
    return np.array(a, np.float64), np.array([cx * (stored_size[0] - 1), cy * (stored_size[1] - 1)], np.float64)


def upright_to_stored(xy: np.ndarray, orientation: int, stored_size: tuple[int, int]) -> np.ndarray:
    """Map (N, 2) pixel-centre coordinates of the upright image (after ``exif_transpose``) to the stored
    pixels of a file of EXIF ``orientation`` and stored (W, H) ``stored_size`` (exact, float64)."""
    a, b = _orientation_affine(orientation, stored_size)
    return _as_points(xy) @ a.T + b


def stored_to_upright(xy: np.ndarray, orientation: int, stored_size: tuple[int, int]) -> np.ndarray:
    """Exact inverse of :func:`upright_to_stored`."""
    a, b = _orientation_affine(orientation, stored_size)
    return (_as_points(xy) - b) @ a  # a is orthogonal: its inverse is its transpose


def _as_points(xy: np.ndarray) -> np.ndarray:
    pts = np.asarray(xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"expected an (N, 2) array of (x, y) coordinates, got shape {pts.shape}")
    return pts


@contextmanager
def _opened(path: str) -> Iterator[Image.Image]:
    """Open ``path`` with PIL (header only; the caller decodes), checking the file and the pixel limit.

    Any failure, also inside the ``with`` block, becomes an ImageLoadError naming the file.
    """
    if not os.path.exists(path):
        raise ImageLoadError(f"image file not found: {path!r}")
    if os.path.isdir(path):
        raise ImageLoadError(f"image path is a directory, not a file: {path!r}")
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError(f"image file is empty (0 bytes): {path!r}")
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageLoadError(
                    f"image is too large: {w}x{h} = {w * h:,} pixels, above the limit of {MAX_IMAGE_PIXELS:,} "
                    f"(mast3r_colmap.images.MAX_IMAGE_PIXELS): {path!r}")
            yield img
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image file is too large to decode safely: {path!r} ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        # PIL signals unreadable/truncated/corrupt files with a variety of exception types.
        raise ImageLoadError(
            f"cannot read image file {path!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """RGB version of ``img``; greyscale images of more than 8 bits are scaled by their range first
    (min -> 0, max -> 255; a constant image -> 128; NaN -> min, +-inf -> max/min)."""
    if img.mode not in _WIDE_MODES:
        return img.convert("RGB")
    arr = np.asarray(img)
    arr = arr.astype(np.float64 if arr.dtype.itemsize > 2 and arr.dtype.kind in "iu" else np.float32)
    finite = np.isfinite(arr)
    lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
    if not finite.all():
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    if hi > lo:
        u8 = np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    else:
        u8 = np.full(arr.shape, 128, dtype=np.uint8)
    logger.debug("%s: %s image scaled to 8 bit from its range %g..%g", path, img.mode, lo, hi)
    return Image.fromarray(u8).convert("RGB")  # 2-D uint8: mode L


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image (1 when absent or not in 1..8, as ``exif_transpose``)."""
    value = img.getexif().get(0x0112, 1)
    return value if value in _ORIENTATION_MAPS else 1


def _open_rgb(path: str) -> tuple[Image.Image, int]:
    """Open and decode ``path``, apply the EXIF orientation and convert to RGB (see :func:`_to_rgb`),
    raising ImageLoadError on failure; returns the upright image and the orientation that was applied."""
    with _opened(path) as raw:
        raw.load()
        orientation = _orientation(raw)
        return _to_rgb(ImageOps.exif_transpose(raw), path), orientation


def _resize_long_side(img: Image.Image, long_side: int) -> Image.Image:
    """Resize so the long side becomes ``long_side`` (banker's rounding per axis, as in the official code)."""
    w, h = img.size
    s = max(w, h)
    new_size = (int(round(w * long_side / s)), int(round(h * long_side / s)))
    if new_size[0] < 1 or new_size[1] < 1:
        raise ValueError(f"resize to {new_size} is empty")
    resample = Image.Resampling.LANCZOS if s > long_side else Image.Resampling.BICUBIC
    return img.resize(new_size, resample)


def _crop_box(w: int, h: int, size: int, square_ok: bool = False) -> tuple[int, int, int, int]:
    """Return the integer crop box (left, top, right, bottom) in the resized image."""
    cx, cy = w // 2, h // 2
    if size == 224:
        half = min(cx, cy)
        return cx - half, cy - half, cx + half, cy + half
    halfw = ((2 * cx) // 16) * 8
    halfh = ((2 * cy) // 16) * 8
    if not square_ok and w == h:
        # 3 * halfw / 4 is an integer because halfw is a multiple of 8.
        halfh = (3 * halfw) // 4
    return cx - halfw, cy - halfh, cx + halfw, cy + halfh


def load_image(
    path: str | os.PathLike[str],
    size: int = 512,
    *,
    name: str | None = None,
) -> LoadedImage:
    """Load one image exactly like the official ``load_images([path], size)`` (``square_ok=False``).

    Args:
        path: image file.
        size: 512 (long side to 512), 224 (short side to 224, centre square crop), or any other positive
            size, handled with the 512 rule (long side to ``size``).
        name: name stored in the result; defaults to the file's base name.

    Raises:
        ImageLoadError: missing, empty, unreadable or non-image file, or an image too small to give a
            non-empty crop (the message names the file).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    path_str = os.fspath(path)
    img, orientation = _open_rgb(path_str)
    w0, h0 = img.size
    if min(w0, h0) < MIN_ORIGINAL_SIDE:
        raise ImageLoadError(
            f"image is too small ({w0}x{h0}, need at least {MIN_ORIGINAL_SIDE} px per side): {path_str!r}"
        )

    if size == 224:
        # Short side to 224: the long side target is round(224 * aspect), then the long-side rule.
        long_side = int(round(size * max(w0 / h0, h0 / w0)))
    else:
        long_side = size
    try:
        resized = _resize_long_side(img, long_side)
    except ValueError as exc:
        raise ImageLoadError(
            f"image {w0}x{h0} is too small or too elongated to resize for size={size}: {path_str!r}"
        ) from exc
    wr, hr = resized.size
    left, top, right, bottom = _crop_box(wr, hr, size)
    if right <= left or bottom <= top:
        raise ImageLoadError(
            f"image {w0}x{h0} (resized to {wr}x{hr}) gives an empty crop for size={size}: {path_str!r}"
        )
    cropped = resized.crop((left, top, right, bottom))

    arr = np.asarray(cropped, dtype=np.uint8)  # (H, W, 3)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    tensor = tensor.div(255.0).sub(0.5).div(0.5).unsqueeze(0).contiguous()
    hn, wn = arr.shape[:2]
    true_shape = torch.tensor([[hn, wn]], dtype=torch.int32)
    logger.debug(
        "loaded %s: original %dx%d -> resized %dx%d -> crop (%d, %d, %d, %d) -> %dx%d",
        path_str, w0, h0, wr, hr, left, top, right, bottom, wn, hn,
    )
    return LoadedImage(
        img=tensor,
        true_shape=true_shape,
        upright_size=(w0, h0),
        resized_size=(wr, hr),
        crop_offset=(left, top),
        name=name if name is not None else os.path.basename(path_str),
        path=path_str,
        size=size,
        orientation=orientation,
    )


def load_original(path: str | os.PathLike[str]) -> torch.Tensor:
    """The full-resolution image in the *upright* frame (EXIF-transposed) as a (1, 3, H, W) float32 tensor in
    [-1, 1], no resizing: what coarse-to-fine crops are cut from (their pixels are then mapped to the stored
    frame with ``LoadedImage.upright_to_original``). Raises ImageLoadError like :func:`load_image`."""
    arr = np.asarray(_open_rgb(os.fspath(path))[0], dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor.div(255.0).sub(0.5).div(0.5).unsqueeze(0).contiguous()


def validate_image(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Decode the whole file (catching truncated or corrupt data); returns the stored (W, H), like
    :func:`read_image_size`.

    Raises ImageLoadError naming the file when it cannot be used.
    """
    path_str = os.fspath(path)
    img, orientation = _open_rgb(path_str)
    w, h = img.size[::-1] if orientation in _SWAPPING else img.size
    if min(w, h) < MIN_ORIGINAL_SIDE:
        raise ImageLoadError(f"image is too small ({w}x{h}): {path_str!r}")
    return w, h


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(W, H) of the stored pixels, ignoring the EXIF orientation (as COLMAP and hloc), from the header.

    Raises ImageLoadError for missing, empty or unreadable files and images above :data:`MAX_IMAGE_PIXELS`.
    """
    with _opened(os.fspath(path)) as img:
        return img.size


def list_images(root: str | os.PathLike[str]) -> list[str]:
    """Return the sorted relative POSIX paths of all image files under ``root`` (recursive).

    Extensions are matched case-insensitively against :data:`IMAGE_EXTENSIONS`.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise NotADirectoryError(f"image folder not found or not a directory: {os.fspath(root)!r}")
    names = [
        p.relative_to(root_path).as_posix()
        for p in root_path.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    return sorted(names)
