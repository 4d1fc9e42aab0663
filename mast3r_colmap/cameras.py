"""Cameras of image files: size, EXIF focal prior and the COLMAP camera an image gets.

* :func:`read_image_info` reads an image's size and focal prior from its header (EXIF
  ``FocalLengthIn35mmFilm``, or ``FocalLength`` with COLMAP's sensor database);
* :func:`make_camera` builds the ``pycolmap.Camera`` of a camera model for it (focal from the prior,
  or ``DEFAULT_FOCAL_LENGTH_FACTOR * max(W, H)`` as COLMAP does, principal point at the centre, or the
  user's intrinsics);
* :func:`camera_group_key` says which images share a camera in each :data:`CAMERA_MODES` mode.

The database side (writing cameras, rigs, frames and images) is :func:`~.export.colmap_db.import_images`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pycolmap
from PIL import Image as PILImage

__all__ = [
    "CAMERA_MODES",
    "DEFAULT_FOCAL_LENGTH_FACTOR",
    "ImageInfo",
    "camera_from_tokens",
    "camera_group_key",
    "make_camera",
    "normalise_camera_mode",
    "parse_intrinsics",
    "read_camera_list",
    "read_image_info",
]

logger = logging.getLogger(__name__)

#: Accepted ``camera_mode`` values (``_`` may be used instead of ``-``).
#: "auto": images of the same size and EXIF focal share a camera (COLMAP's AUTO); "single": one camera
#: for all images (they must have one size); "per-folder": one per parent folder; "per-image".
CAMERA_MODES: tuple[str, ...] = ("auto", "single", "per-folder", "per-image")
#: Focal length of a camera without a prior, as a multiple of max(W, H) (COLMAP's default).
DEFAULT_FOCAL_LENGTH_FACTOR = 1.2

_DIAGONAL_35MM = 43.27  # mm, the constant COLMAP uses (hypot(36, 24) = 43.267)
_EXIF_IFD = 0x8769
_TAG_FOCAL_LENGTH = 0x920A
_TAG_FOCAL_LENGTH_35MM = 0xA405


class ImageInfo:
    """Stored size (EXIF orientation ignored, as in COLMAP) and EXIF focal prior of one image file."""

    __slots__ = ("width", "height", "focal", "focal_source")

    def __init__(self, width: int, height: int, focal: float | None, focal_source: str) -> None:
        self.width = width
        self.height = height
        self.focal = focal              # pixels, or None without an EXIF prior
        self.focal_source = focal_source  # "exif-35mm", "exif-sensor", or "none"

    def __repr__(self) -> str:
        return f"ImageInfo({self.width}x{self.height}, focal={self.focal}, source={self.focal_source})"


def _rational(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def read_image_info(path: str | os.PathLike) -> ImageInfo:
    """Read an image's size and focal prior from its header without decoding the pixels.

    The size is the stored one, ignoring the EXIF orientation, as ``pycolmap.import_images`` reads it
    (the frame in which keypoints live, see :mod:`~mast3r_colmap.images`).
    The focal prior, in pixels, comes from

    1. ``FocalLengthIn35mmFilm``: ``f35 * hypot(W, H) / 43.27`` (COLMAP's diagonal rule), or
    2. ``FocalLength`` in mm plus the sensor width from COLMAP's camera database, through
       ``pycolmap.infer_camera_from_image`` (which does read the file), or
    3. nothing (``focal is None``).
    """
    path = Path(path)
    try:
        with PILImage.open(path) as im:
            width, height = im.size
            exif = im.getexif()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc
    sub = exif.get_ifd(_EXIF_IFD) if exif else {}
    f35 = _rational(sub.get(_TAG_FOCAL_LENGTH_35MM, exif.get(_TAG_FOCAL_LENGTH_35MM)))
    if f35 is not None:
        return ImageInfo(width, height, f35 * float(np.hypot(width, height)) / _DIAGONAL_35MM, "exif-35mm")
    if _rational(sub.get(_TAG_FOCAL_LENGTH, exif.get(_TAG_FOCAL_LENGTH))) is not None:
        try:
            cam = pycolmap.infer_camera_from_image(str(path))
        except Exception as exc:  # noqa: BLE001 - an unreadable file only loses the prior
            logger.debug("infer_camera_from_image failed for %s: %s", path, exc)
        else:
            if cam.has_prior_focal_length:
                # COLMAP's focal is focal_mm / sensor_mm * max(W, H): independent of the orientation.
                return ImageInfo(width, height, float(cam.mean_focal_length()), "exif-sensor")
    return ImageInfo(width, height, None, "none")


def normalise_camera_mode(camera_mode: str | pycolmap.CameraMode) -> str:
    """One of :data:`CAMERA_MODES` from a name (any case, ``_`` or ``-``) or a ``pycolmap.CameraMode``."""
    if isinstance(camera_mode, pycolmap.CameraMode):
        camera_mode = camera_mode.name  # AUTO, SINGLE, PER_FOLDER, PER_IMAGE
    mode = str(camera_mode).strip().lower().replace("_", "-")
    if mode not in CAMERA_MODES:
        raise ValueError(f"unknown camera_mode {camera_mode!r}; expected one of {', '.join(CAMERA_MODES)}")
    return mode


def parse_intrinsics(intrinsics: str | Sequence[float] | None) -> list[float] | None:
    if intrinsics is None:
        return None
    if isinstance(intrinsics, str):
        try:
            params = [float(p) for p in intrinsics.replace(" ", "").split(",") if p]
        except ValueError:
            raise ValueError(f"intrinsics {intrinsics!r} must be comma-separated numbers") from None
    else:
        params = [float(p) for p in intrinsics]
    if not params or not all(np.isfinite(params)):
        raise ValueError(f"intrinsics {intrinsics!r} must be non-empty finite numbers")
    return params


def make_camera(model: str, info: ImageInfo, params: list[float] | None,
                 focal_factor: float) -> pycolmap.Camera:
    if model not in pycolmap.CameraModelId.__members__ or model == "INVALID":
        raise ValueError(f"unknown camera_model {model!r}")
    focal = info.focal if info.focal is not None else focal_factor * max(info.width, info.height)
    cam = pycolmap.Camera.create_from_model_name(0, model, float(focal), info.width, info.height)
    cam.has_prior_focal_length = info.focal is not None
    if params is not None:
        if len(params) != len(cam.params):
            raise ValueError(f"intrinsics: camera model {model} takes {len(cam.params)} parameters "
                             f"({cam.params_info}), got {len(params)}")
        cam.params = params
        cam.has_prior_focal_length = True
    return cam


def camera_group_key(mode: str, name: str, info: ImageInfo | None = None) -> Any:
    if mode == "auto":
        return None if info is None else (info.width, info.height, info.focal)
    if mode == "single":
        return ""
    if mode == "per-folder":
        return str(PurePosixPath(name).parent)
    return name


def camera_from_tokens(tokens: Sequence[str], where: str) -> pycolmap.Camera:
    """A camera from ``MODEL WIDTH HEIGHT PARAMS...`` (COLMAP's convention); ValueError naming ``where``."""
    model = tokens[0]
    if model not in pycolmap.CameraModelId.__members__ or model == "INVALID":
        raise ValueError(f"{where}: unknown camera model {model!r}")
    try:
        width, height = int(tokens[1]), int(tokens[2])
        params = [float(p) for p in tokens[3:]]
    except (IndexError, ValueError):
        raise ValueError(f"{where}: expected 'name MODEL WIDTH HEIGHT PARAMS...'") from None
    if width <= 0 or height <= 0 or not all(np.isfinite(params)):
        raise ValueError(f"{where}: bad image size or parameters")
    expected = len(pycolmap.Camera.create_from_model_name(0, model, 1.0, width, height).params)
    if len(params) != expected:
        raise ValueError(f"{where}: camera model {model} takes {expected} parameters, got {len(params)}")
    return pycolmap.Camera(model=model, width=width, height=height, params=params)


def read_camera_list(paths: str | os.PathLike | Iterable[str | os.PathLike], what: str = "camera list",
                     require_camera: bool = False) -> dict[str, pycolmap.Camera | None]:
    """Read hloc's image lists with intrinsics (``*_queries_with_intrinsics.txt``): ``name MODEL W H
    params...`` per line, into ``{name: camera}``.

    A line holding only a name maps to ``None`` (refused with ``require_camera``). Blank lines and ``#``
    comments are skipped; several files are read in the given order.

    Raises:
        ValueError: a missing file (called ``what`` in the message), a malformed line, an unknown model, a
            wrong number of parameters or a repeated name (the message names the file and line).
    """
    from .utils import text_records

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: dict[str, pycolmap.Camera | None] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{what} {str(path)!r} does not exist")
        for where, tokens in text_records(path):
            if tokens[0] in out:
                raise ValueError(f"{where}: {tokens[0]!r} listed twice")
            if len(tokens) == 1 and require_camera:
                raise ValueError(f"{where}: expected 'name MODEL WIDTH HEIGHT PARAMS...'")
            out[tokens[0]] = camera_from_tokens(tokens[1:], where) if len(tokens) > 1 else None
    return out
