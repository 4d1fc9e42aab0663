"""Pictures of matches and models, drawn with matplotlib's Agg canvas (no display needed).

    python -m mast3r_colmap.visualize matches DB_OR_H5 IMAGE0 IMAGE1 --images DIR -o matches.png
    python -m mast3r_colmap.visualize model MODEL_DIR [--images DIR] -o model.png

* **matches** (:func:`read_pair`, :func:`plot_matches`): the two images side by side, every match as a dot
  at both ends and a line for up to ``max_lines`` of them (a fixed random sample), coloured by its score
  (``viridis``, the 2nd to 98th percentile of the pair's scores). From a COLMAP database the raw matches
  are split by the pair's two-view geometry: verified inliers in the score colours, outliers in red, drawn
  on top; scores come from :mod:`.export.scores` (none stored: one colour). From hloc files
  (``matches0`` / ``matching_scores0`` of ``matches.h5`` with ``features.h5`` beside it) nothing is
  verified, so every match is drawn in the score colours.
* **model** (:func:`plot_model`): a top view and a side view of the camera centres (red, with a short
  line along each viewing direction) and of the 3D points (in their colours, subsampled, axis limits from
  the 1st to 99th percentiles), and for a few registered images their keypoints: green with a 3D point,
  red without (as hloc's ``visualize_sfm_2d``). "Up" is the mean of the cameras' up axes (COLMAP's
  cameras look along +z with y down), the top view's horizontal axis the points' main direction.
* :func:`write_overview`: the pictures of ``mast3r-colmap --plots``: the pairs with the most and with the
  fewest verified inliers, and the model.

Pixel frame: pictures show the images as stored in their files (no EXIF rotation), the frame of the
keypoints; hloc's convention ((0, 0) is the centre of the top-left pixel) is matplotlib's ``imshow``
default, and COLMAP's keypoints (database, model) are shifted by -0.5 to it.

Every picture is a :class:`matplotlib.figure.Figure` of its own on an Agg canvas: pyplot, its backend and
its open figures are never touched, and matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from . import cli
from .utils import atomic_replace

if TYPE_CHECKING:  # pragma: no cover
    import pycolmap
    from matplotlib.figure import Figure

__all__ = [
    "BLANK",
    "FADE",
    "FOOTER_PX",
    "HEADER_PX",
    "PairView",
    "build_parser",
    "main",
    "matches_gap",
    "pairs_by_inliers",
    "plot_matches",
    "plot_model",
    "read_image",
    "read_pair",
    "save_figure",
    "stored_names",
    "write_overview",
]

logger = logging.getLogger(__name__)

#: Height in pixels of the title band above the images of a matches picture.
HEADER_PX = 36
#: Height in pixels of the band below the images of a matches picture (colour bar and legend).
FOOTER_PX = 44
#: Colours: outliers, keypoints with and without a 3D point, camera centres.
OUTLIER_COLOR = "#ff1a1a"
TRIANGULATED_COLOR = "#00e000"
UNTRIANGULATED_COLOR = "#ff1a1a"
CAMERA_COLOR = "#e00000"
_COLORMAP = "viridis"
#: Images under the marks are drawn in grey, blended toward white by this much (see ``fade`` arguments).
FADE = 0.3
#: Grey level of the blank canvases of a model picture drawn without images.
BLANK = 235
_DPI = 100
_SQLITE_HEADER = b"SQLite format 3\x00"


# ---- reading --------------------------------------------------------------------------------------


@dataclass
class PairView:
    """The matches of one pair, ready to draw: ``xy0``/``xy1`` (M, 2) in the stored pixel frame (hloc's
    convention), ``scores`` (M,) or None (none stored), ``inliers`` (M,) bool or None (not verified),
    ``sizes`` ((W, H) of the two images as the source records them, or None where unknown)."""

    name0: str
    name1: str
    xy0: np.ndarray
    xy1: np.ndarray
    scores: Optional[np.ndarray]
    inliers: Optional[np.ndarray]
    sizes: Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, int]]] = (None, None)


@dataclass(frozen=True)
class _Source:
    kind: str                        # "db" or "h5"
    path: Path                       # the database, or matches.h5
    features: Optional[Path] = None  # features.h5 of an "h5" source


def _has_images_table(path: Path) -> bool:
    import sqlite3
    from contextlib import closing

    try:
        with closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)) as con:
            return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'images'").fetchone() \
                is not None
    except sqlite3.Error as exc:
        raise ValueError(f"cannot read database {str(path)!r}: {exc}") from None


def _source(path: str | os.PathLike, features: Optional[str | os.PathLike] = None) -> _Source:
    """Classify ``path``: a COLMAP database, an hloc folder (``matches.h5`` + ``features.h5``) or an hloc
    ``matches.h5`` (``features`` or ``features.h5`` beside it)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist (expected a COLMAP database, an hloc folder or matches.h5)")
    if path.is_dir():
        matches = path / "matches.h5"
        if not matches.is_file():
            raise ValueError(f"folder {str(path)!r} holds no matches.h5 (expected hloc's features.h5 + matches.h5)")
        path = matches
    with open(path, "rb") as f:
        head = f.read(len(_SQLITE_HEADER))
    if head == _SQLITE_HEADER:
        if not _has_images_table(path):  # checked read-only: pycolmap would add its tables to any SQLite file
            raise ValueError(f"{str(path)!r} is an SQLite file but not a COLMAP database (no images table)")
        return _Source("db", path)
    import h5py

    if not h5py.is_hdf5(path):
        raise ValueError(f"{str(path)!r} is neither a COLMAP database nor an hloc matches.h5")
    feats = Path(features) if features is not None else path.parent / "features.h5"
    if not feats.is_file():
        raise ValueError(f"no features file {str(feats)!r} for {str(path)!r} (give --features)")
    return _Source("h5", path, feats)


def _image_ids(db: "pycolmap.Database") -> Dict[str, int]:
    return {img.name: int(img.image_id) for img in db.read_all_images()}


def _open_db(path: Path):
    import pycolmap

    try:
        return pycolmap.Database.open(str(path))
    except Exception as exc:  # noqa: BLE001 - pycolmap raises RuntimeError from its C++ checks
        raise ValueError(f"cannot open database {str(path)!r}: {exc}") from None


def stored_names(source: str | os.PathLike, features: Optional[str | os.PathLike] = None) -> List[str]:
    """The image names of a COLMAP database or of hloc files (see :func:`read_pair` for ``source``)."""
    src = _source(source, features)
    if src.kind == "db":
        with _open_db(src.path) as db:
            return sorted(_image_ids(db))
    from .export.hloc_h5 import list_h5_names

    return list_h5_names(src.features)


def _unknown(name: str, names: Sequence[str], where: Path) -> ValueError:
    some = ", ".join(repr(n) for n in sorted(names)[:3])
    return ValueError(f"unknown image {name!r}: not in {str(where)!r} ({len(names)} images, e.g. {some})")


def _inlier_mask(matches: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """Which rows of ``matches`` (M, 2) are rows of ``inliers`` (K, 2)."""
    if not len(matches) or not len(inliers):
        return np.zeros(len(matches), bool)
    base = int(max(matches.max(), inliers.max())) + 1
    return np.isin(matches[:, 0] * base + matches[:, 1], inliers[:, 0] * base + inliers[:, 1])


def _read_pair_db(path: Path, name0: str, name1: str) -> PairView:
    import pycolmap

    from .export.scores import read_match_scores

    with _open_db(path) as db:
        ids = _image_ids(db)
        for name in (name0, name1):
            if name not in ids:
                raise _unknown(name, list(ids), path)
        id0, id1 = ids[name0], ids[name1]
        if not db.exists_matches(id0, id1):
            raise ValueError(f"pair {name0!r}/{name1!r} has no matches in {str(path)!r}")
        matches = np.asarray(db.read_matches(id0, id1), np.int64).reshape(-1, 2)  # columns in (name0, name1)
        kps = [np.asarray(db.read_keypoints(i), np.float64)[:, :2] - 0.5 for i in (id0, id1)]  # COLMAP -> hloc
        inliers = None
        if db.exists_two_view_geometry(id0, id1):
            geometry = db.read_two_view_geometry(id0, id1)
            inliers = _inlier_mask(matches, np.asarray(geometry.inlier_matches, np.int64).reshape(-1, 2))
        sizes = []
        for i in (id0, id1):
            camera = db.read_camera(db.read_image(i).camera_id)
            sizes.append((int(camera.width), int(camera.height)))
    pair_id = int(pycolmap.image_pair_to_pair_id(id0, id1))
    scores = read_match_scores(path, [pair_id]).get(pair_id)  # COLMAP's row order, as read_matches
    if scores is not None and len(scores) != len(matches):
        logger.warning("pair %s/%s: %d stored scores for %d matches; drawn without scores", name0, name1,
                       len(scores), len(matches))
        scores = None
    return PairView(name0, name1, kps[0][matches[:, 0]], kps[1][matches[:, 1]], scores, inliers, tuple(sizes))


def _read_pair_h5(src: _Source, name0: str, name1: str) -> PairView:
    import h5py

    from .export.hloc_h5 import find_pair, list_h5_names, read_features

    names = list_h5_names(src.features)
    for name in (name0, name1):
        if name not in names:
            raise _unknown(name, names, src.features)
    features = read_features(src.features, [name0, name1])
    with h5py.File(src.path, "r") as f:
        try:
            key, reverse = find_pair(f, name0, name1)
        except KeyError:
            raise ValueError(f"pair {name0!r}/{name1!r} has no matches in {str(src.path)!r}") from None
        group = f[key]
        matches0 = np.asarray(group["matches0"], np.int64)
        scores0 = np.asarray(group["matching_scores0"], np.float32) if "matching_scores0" in group else None
        sizes = []
        with h5py.File(src.features, "r") as g:
            for name in (name0, name1):
                size = np.asarray(g[name]["image_size"]).tolist() if "image_size" in g[name] else None
                sizes.append(tuple(int(v) for v in size) if size is not None else None)
    idx = np.flatnonzero(matches0 >= 0)
    m = np.stack([idx, matches0[idx]], -1)
    if reverse:
        m = m[:, ::-1]
    kp0, kp1 = features[name0].keypoints, features[name1].keypoints
    if len(m) and (m[:, 0].max() >= len(kp0) or m[:, 1].max() >= len(kp1)):
        raise ValueError(f"pair {name0!r}/{name1!r}: a match index is beyond the keypoints in {str(src.features)!r}")
    scores = None if scores0 is None else scores0[idx].astype(np.float32)
    return PairView(name0, name1, kp0[m[:, 0]], kp1[m[:, 1]], scores, None, tuple(sizes))


def read_pair(source: str | os.PathLike, name0: str, name1: str,
              features: Optional[str | os.PathLike] = None) -> PairView:
    """The matches of ``(name0, name1)`` (stored image names) from ``source``: a COLMAP database (``.db``),
    an hloc folder (``matches.h5`` + ``features.h5``) or an hloc ``matches.h5`` (``features``, default
    ``features.h5`` beside it).

    Raises:
        ValueError: a missing or unknown source, an unknown image name (named), or a pair without matches.
    """
    src = _source(source, features)
    return _read_pair_db(src.path, name0, name1) if src.kind == "db" else _read_pair_h5(src, name0, name1)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The pixels of an image file as stored (no EXIF rotation: the keypoints' frame), (H, W, 3) uint8;
    greyscale images of more than 8 bits are scaled by their range. ValueError if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                arr = np.asarray(img, np.float64)
                finite = np.isfinite(arr)
                lo, hi = (arr[finite].min(), arr[finite].max()) if finite.any() else (0.0, 0.0)
                arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
                u8 = np.rint((arr - lo) * (255.0 / (hi - lo))) if hi > lo else np.full(arr.shape, 128.0)
                return np.repeat(u8.astype(np.uint8)[..., None], 3, axis=-1)
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image file {str(path)!r}: {exc}") from None


# ---- drawing --------------------------------------------------------------------------------------


def _new_figure(width_px: int, height_px: int, dpi: int = _DPI) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _faded(pixels: np.ndarray, fade: float) -> np.ndarray:
    """``pixels`` in grey, blended toward white by ``fade`` (0: grey image, 1: white), so that the coloured
    marks drawn over them stand out on any picture."""
    grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.rint(grey * (1.0 - fade) + 255.0 * fade).astype(np.uint8)[..., None], 3, axis=-1)


def _show(ax: Any, pixels: np.ndarray, offset: float = 0.0, max_px: Optional[float] = None,
          fade: Optional[float] = None) -> None:
    """Draw ``pixels`` (H, W, 3) with its pixel centres at (col + offset, row), shrunk first (box filter)
    where it is more than twice as wide as ``max_px`` (its drawn width in figure pixels), and
    :func:`_faded` unless ``fade`` is None."""
    w = pixels.shape[1]
    factor = int(w // (2 * max_px)) if max_px else 1
    if factor >= 2:  # each new pixel covers factor x factor old ones (the last row / column partly)
        pixels = np.asarray(Image.fromarray(pixels).reduce(factor))
    else:
        factor = 1
    if fade is not None:
        pixels = _faded(pixels, fade)
    rh, rw = pixels.shape[:2]
    ax.imshow(pixels, extent=(offset - 0.5, offset - 0.5 + rw * factor, rh * factor - 0.5, -0.5),
              interpolation="antialiased", zorder=0)


def matches_gap(size0: Tuple[int, int], size1: Tuple[int, int]) -> int:
    """Pixels (of the images) between the two images of a matches picture."""
    return max(1, round(0.02 * max(size0[0], size1[0])))


def _score_norm(scores: Optional[np.ndarray]):
    from matplotlib.colors import Normalize

    if scores is None or not len(scores):
        return None
    lo, hi = np.percentile(scores, [2, 98])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return Normalize(vmin=float(lo), vmax=float(hi), clip=True)


def plot_matches(view: PairView, image0: np.ndarray, image1: np.ndarray, width: int = 1600,
                 max_lines: int = 300, title: Optional[str] = None, seed: int = 0,
                 fade: Optional[float] = FADE) -> "Figure":
    """A picture of ``view`` on ``image0`` / ``image1`` ((H, W, 3) uint8, see :func:`read_image`).

    Layout (figure pixels): a title band of :data:`HEADER_PX`, the images side by side scaled to ``width``
    (top-aligned, :func:`matches_gap` apart), a band of :data:`FOOTER_PX` with the score colour bar and the
    legend. Every match gets a dot at both ends; ``max_lines`` of them (a fixed random sample) get a line.
    The images are drawn in grey, blended toward white by ``fade`` (None: in their own colours).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    (h0, w0), (h1, w1) = image0.shape[:2], image1.shape[:2]
    gap = matches_gap((w0, h0), (w1, h1))
    offset = w0 + gap
    wc, hc = offset + w1, max(h0, h1)
    scale = width / wc
    height = HEADER_PX + round(hc * scale) + FOOTER_PX
    fig = _new_figure(width, height)
    ax = fig.add_axes((0, FOOTER_PX / height, 1, (height - HEADER_PX - FOOTER_PX) / height))
    ax.set_axis_off()
    _show(ax, image0, 0.0, w0 * scale, fade)
    _show(ax, image1, float(offset), w1 * scale, fade)
    ax.set_xlim(-0.5, wc - 0.5)
    ax.set_ylim(hc - 0.5, -0.5)
    ax.set_aspect("auto")

    cmap = colormaps[_COLORMAP]
    norm = _score_norm(view.scores)
    n = len(view.xy0)
    colors = cmap(norm(view.scores)) if norm is not None else np.tile(cmap(0.6), (n, 1))
    inliers = np.ones(n, bool) if view.inliers is None else np.asarray(view.inliers, bool)
    xy1 = view.xy1 + np.array([offset, 0.0])
    rng = np.random.default_rng(seed)
    lined = np.zeros(n, bool)
    lined[rng.permutation(n)[:max_lines]] = True
    dot = (3.0 * 72 / _DPI) ** 2  # 3 px wide: covers the whole pixel of its centre
    for group, color, lw, z in ((inliers, None, 0.7, 2), (~inliers, OUTLIER_COLOR, 0.9, 4)):
        sel = group & lined
        if sel.any():
            segments = np.stack([view.xy0[sel], xy1[sel]], 1)
            ax.add_collection(LineCollection(segments, colors=colors[sel] if color is None else color,
                                             linewidths=lw, alpha=0.8, zorder=z))
        if group.any():
            pts = np.concatenate([view.xy0[group], xy1[group]])
            c = np.concatenate([colors[group], colors[group]]) if color is None else color
            ax.scatter(pts[:, 0], pts[:, 1], s=dot if color is None else 1.8 * dot, c=c, marker="o",
                       linewidths=0, zorder=z + 1)

    if title is None:
        title = f"{view.name0}  |  {view.name1}"
    stats = f"{n} matches"
    if view.inliers is not None:
        k = int(inliers.sum())
        stats += f", {k} verified inliers ({100 * k / max(n, 1):.1f} %), {n - k} outliers (red)"
    else:
        stats += " (not verified)"
    stats += f"; lines for {int(lined.sum())}"
    fig.text(0.005, 1 - 4 / height, title, va="top", ha="left", fontsize=10)
    fig.text(0.005, 1 - 20 / height, stats, va="top", ha="left", fontsize=8, color="#333333")

    if norm is not None:
        cax = fig.add_axes((0.01, 24 / height, 0.3, 10 / height))
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
        cax.tick_params(labelsize=7, length=2, pad=1)
        fig.text(0.315, 29 / height, "match score", va="center", ha="left", fontsize=8)
    else:
        fig.text(0.01, 29 / height, "no match scores stored", va="center", ha="left", fontsize=8)
    handles = [Line2D([], [], color=cmap(0.6), lw=1.5,
                      label="match (not verified)" if view.inliers is None else "verified inlier")]
    if view.inliers is not None:
        handles.append(Line2D([], [], color=OUTLIER_COLOR, lw=1.5, label="outlier"))
    fig.legend(handles=handles, loc="lower right", ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(0.995, 2 / height))
    return fig


def _up_and_axes(centers: np.ndarray, ups: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A world frame for the views: rows (horizontal main direction, horizontal second, up)."""
    up = ups.mean(0) if len(ups) else np.zeros(3)
    if np.linalg.norm(up) < 1e-6:  # no consistent camera orientation: the points' thinnest direction
        cloud = points if len(points) >= 3 else centers
        up = np.linalg.svd(cloud - cloud.mean(0), full_matrices=False)[2][-1] if len(cloud) >= 3 else np.eye(3)[2]
    up = up / np.linalg.norm(up)
    cloud = points if len(points) >= 3 else centers
    flat = cloud - cloud.mean(0)
    flat = flat - np.outer(flat @ up, up)
    e1 = np.linalg.svd(flat, full_matrices=False)[2][0] if len(flat) >= 2 and np.abs(flat).max() > 0 else None
    if e1 is None or abs(e1 @ up) > 0.99:
        e1 = np.eye(3)[int(np.argmin(np.abs(up)))]
        e1 = e1 - (e1 @ up) * up
    e1 = e1 / np.linalg.norm(e1)
    e2 = np.cross(up, e1)
    return np.stack([e1, e2, up])


def _limits(values: np.ndarray, always: np.ndarray) -> Tuple[float, float]:
    """Axis limits: the 1st to 99th percentile of ``values``, widened to every value of ``always``, 5 % margin."""
    lo, hi = (np.percentile(values, [1, 99]) if len(values) else (np.inf, -np.inf))
    lo, hi = min(lo, always.min()), max(hi, always.max())
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    return float(lo - pad), float(hi + pad)


def _fit(xlim: Tuple[float, float], ylim: Tuple[float, float], box: Tuple[float, float]):
    """Widen the shorter of two ranges about its centre so that one unit spans as many pixels along x as
    along y in a box of ``box`` (width, height) pixels (equal aspect that fills the box)."""
    unit = max((xlim[1] - xlim[0]) / box[0], (ylim[1] - ylim[0]) / box[1])
    cx, cy = sum(xlim) / 2, sum(ylim) / 2
    return (cx - unit * box[0] / 2, cx + unit * box[0] / 2), (cy - unit * box[1] / 2, cy + unit * box[1] / 2)


def plot_model(reconstruction: "pycolmap.Reconstruction", image_dir: Optional[str | os.PathLike] = None,
               num_images: int = 4, max_points: int = 100_000, width: int = 1600, title: str = "",
               seed: int = 0, fade: Optional[float] = FADE) -> "Figure":
    """A picture of a model: top and side views of cameras and points (up to ``max_points``, a fixed random
    sample), and the keypoints of ``num_images`` registered images (evenly spaced in name order) on their
    pixels from ``image_dir`` (blank canvases of the camera size without it; ``fade`` as in
    :func:`plot_matches`).

    Raises:
        ValueError: a model without registered images, or an image file missing from ``image_dir`` or of
            another size than its camera.
    """
    from matplotlib.collections import LineCollection

    images = sorted((reconstruction.image(i) for i in reconstruction.reg_image_ids()), key=lambda im: im.name)
    if not images:
        raise ValueError("the model has no registered image")
    centers = np.array([im.projection_center() for im in images], np.float64)
    rotations = [np.asarray(im.cam_from_world().rotation.matrix(), np.float64) for im in images]
    ups = np.array([-r[1] for r in rotations])          # camera y points down in the image
    looks = np.array([r[2] for r in rotations])         # camera z: the viewing direction
    pts = list(reconstruction.points3D.values())
    rng = np.random.default_rng(seed)
    if len(pts) > max_points:
        pts = [pts[i] for i in np.sort(rng.choice(len(pts), max_points, replace=False))]
    xyz = np.array([p.xyz for p in pts], np.float64).reshape(-1, 3)
    rgb = np.array([p.color for p in pts], np.float64).reshape(-1, 3) / 255.0
    if len(rgb) and not rgb.any():  # colours were not extracted
        rgb[:] = 0.45
    frame = _up_and_axes(centers, ups, xyz)
    p_loc, c_loc, l_loc = xyz @ frame.T, centers @ frame.T, looks @ frame.T

    chosen = [images[i] for i in np.unique(np.linspace(0, len(images) - 1, min(num_images, len(images))).round()
                                                    .astype(int))] if num_images > 0 else []
    # layout in figure pixels, from the top: title, view titles, views, tick labels, image titles, images
    title_h, label_h, ticks_h, view_w = 26, 18, 30, 0.44 * width
    view_h = round(0.26 * width)
    cell_w = width / max(len(chosen), 1)
    aspect = max((im.camera.height / im.camera.width for im in chosen), default=0.75)
    image_h = round((cell_w - 8) * min(aspect, 1.5)) if chosen else 0  # portrait images: at most 1.5 x wide
    cell_h = label_h + image_h + 4 if chosen else 0
    height = title_h + label_h + view_h + ticks_h + cell_h
    fig = _new_figure(width, height)
    n_reg, n_pts = len(images), reconstruction.num_points3D()
    head = f"{title}:  " if title else ""
    fig.text(0.005, 1 - 5 / height, f"{head}{n_reg} registered images, {n_pts} points "
             f"(drawn: {len(xyz)}), mean reprojection error {reconstruction.compute_mean_reprojection_error():.2f} px",
             va="top", ha="left", fontsize=10)

    for k, (a, b, name) in enumerate(((0, 1, "top view"), (0, 2, "side view"))):
        ax = fig.add_axes(((0.04 + 0.5 * k), (cell_h + ticks_h) / height, view_w / width, view_h / height))
        if len(p_loc):
            ax.scatter(p_loc[:, a], p_loc[:, b], s=0.6, c=rgb, marker="o", linewidths=0, zorder=1, rasterized=True)
        span = max(np.ptp(np.concatenate([p_loc, c_loc])[:, [a, b]], axis=0).max(), 1e-9)
        tips = c_loc + 0.04 * span * l_loc
        ax.add_collection(LineCollection(np.stack([c_loc[:, [a, b]], tips[:, [a, b]]], 1), colors=CAMERA_COLOR,
                                         linewidths=1.0, zorder=3))
        ax.scatter(c_loc[:, a], c_loc[:, b], s=12, c=CAMERA_COLOR, marker="o", linewidths=0, zorder=4)
        xlim, ylim = _fit(_limits(p_loc[:, a], c_loc[:, a]), _limits(p_loc[:, b], c_loc[:, b]), (view_w, view_h))
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_title(f"{name} (cameras red)", fontsize=9, pad=3)
        ax.tick_params(labelsize=7)

    for k, im in enumerate(chosen):
        cam = im.camera
        w, h = int(cam.width), int(cam.height)
        if image_dir is not None:
            pixels = read_image(Path(image_dir) / im.name)
            if pixels.shape[:2] != (h, w):
                raise ValueError(f"image {im.name!r} is {pixels.shape[1]}x{pixels.shape[0]} but its camera is "
                                 f"{w}x{h}: not the picture the model was made from")
        else:
            pixels = np.full((h, w, 3), BLANK, np.uint8)
        scale = min((cell_w - 8) / w, image_h / h)
        ax = fig.add_axes(((k * cell_w + (cell_w - w * scale) / 2) / width, 4 / height,
                           w * scale / width, h * scale / height))
        ax.set_axis_off()
        _show(ax, pixels, 0.0, w * scale, fade if image_dir is not None else None)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        xy = np.array([p.xy for p in im.points2D], np.float64).reshape(-1, 2) - 0.5   # COLMAP -> hloc
        has = np.array([p.has_point3D() for p in im.points2D], bool)
        # 3 px wide, down to 1.5 px where the keypoints are dense (a dot per 9 picture pixels at 1.5 px)
        wide = float(np.clip(0.5 * np.sqrt(w * h * scale ** 2 / max(len(xy), 1)), 1.5, 3.0))
        dot = (wide * 72 / _DPI) ** 2
        ax.scatter(xy[~has, 0], xy[~has, 1], s=dot, c=UNTRIANGULATED_COLOR, linewidths=0, zorder=2)
        ax.scatter(xy[has, 0], xy[has, 1], s=dot, c=TRIANGULATED_COLOR, linewidths=0, zorder=3)
        ax.set_title(f"{im.name}: {int(has.sum())} / {len(has)} with a 3D point (green)", fontsize=8, pad=3)
    return fig


def save_figure(fig: "Figure", path: str | os.PathLike) -> Path:
    """Write ``fig`` atomically to ``path`` (format from the suffix, e.g. ``.png``; folders created)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if not fmt:
        raise ValueError(f"output {str(path)!r} has no suffix (e.g. .png)")
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"output {str(path)!r}: unknown picture format {fmt!r} "
                         f"(one of {', '.join(sorted(supported))})")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=fig.dpi)
    logger.info("wrote %s", path)
    return path


# ---- the pictures of a run --------------------------------------------------------------------------


def _pixels_for(path: Path, name: str, size: Optional[Tuple[int, int]]) -> np.ndarray:
    """The pixels of image ``name`` from ``path``, checked against the size the keypoints were made on."""
    pixels = read_image(path)
    if size is not None and (pixels.shape[1], pixels.shape[0]) != tuple(size):
        raise ValueError(f"image {name!r} is {pixels.shape[1]}x{pixels.shape[0]} but the keypoints were made "
                         f"on a {size[0]}x{size[1]} picture: wrong image folder?")
    return pixels


def _matches_picture(source: str | os.PathLike, name0: str, name1: str, image_dir: Path, path: Path,
                     features: Optional[str | os.PathLike] = None, **kwargs: Any) -> Path:
    view = read_pair(source, name0, name1, features)
    pixels = [_pixels_for(image_dir / n, n, s) for n, s in zip((name0, name1), view.sizes)]
    return save_figure(plot_matches(view, *pixels, **kwargs), path)


def _load_model(model_dir: str | os.PathLike) -> "pycolmap.Reconstruction":
    from .mapping import load_reference

    return load_reference(model_dir)


def pairs_by_inliers(database: str | os.PathLike) -> List[Tuple[int, str, str]]:
    """``(verified inliers, name0, name1)`` of every matched pair of a COLMAP database (0 inliers where
    unverified), most inliers first, ties by name."""
    import pycolmap

    src = _source(database)
    if src.kind != "db":
        raise ValueError(f"{str(database)!r} is not a COLMAP database")
    with _open_db(src.path) as db:
        names = {v: k for k, v in _image_ids(db).items()}
        pair_ids, _ = db.read_num_matches()
        inlier_ids, inlier_counts = db.read_two_view_geometry_num_inliers()
    inliers = dict(zip((int(p) for p in inlier_ids), (int(c) for c in inlier_counts)))
    pairs = []
    for pid in pair_ids:
        a, b = pycolmap.pair_id_to_image_pair(int(pid))
        pairs.append((inliers.get(int(pid), 0), names[int(a)], names[int(b)]))
    return sorted(pairs, key=lambda p: (-p[0], p[1], p[2]))


def write_overview(database: str | os.PathLike, image_dir: str | os.PathLike,
                   model_dir: Optional[str | os.PathLike], out_dir: str | os.PathLike,
                   num_pairs: int = 3, width: int = 1600) -> List[Path]:
    """The pictures of a run, written into ``out_dir``: ``matches_most_inliers_<rank>.png`` and
    ``matches_fewest_inliers_<rank>.png`` for the ``num_pairs`` matched pairs of ``database`` with the
    most and the fewest verified inliers (rank 1 first; a pair appears once), and ``model.png`` when
    ``model_dir`` holds a model, each ``width`` pixels wide. Pictures of this kind left there by an
    earlier overview are removed. Returns the paths written."""
    database, image_dir, out_dir = Path(database), Path(image_dir), Path(out_dir)
    pairs = pairs_by_inliers(database)
    most = pairs[:num_pairs]
    fewest = [p for p in reversed(pairs) if p not in most][:num_pairs]
    out_dir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    for kind, chosen in (("most", most), ("fewest", fewest)):
        for rank, (_, name0, name1) in enumerate(chosen, start=1):
            title = f"{kind} inliers #{rank}: {name0}  |  {name1}"
            written.append(_matches_picture(database, name0, name1, image_dir,
                                            out_dir / f"matches_{kind}_inliers_{rank}.png", title=title,
                                            width=width))
    if model_dir is not None and Path(model_dir).is_dir():
        try:
            rec = _load_model(model_dir)
        except ValueError as exc:
            logger.warning("no model picture: %s", exc)
        else:
            written.append(save_figure(plot_model(rec, image_dir, title=str(model_dir), width=width),
                                       out_dir / "model.png"))
    keep = {p.name for p in written}
    for stale in [*out_dir.glob("matches_most_inliers_*.png"), *out_dir.glob("matches_fewest_inliers_*.png"),
                  out_dir / "model.png"]:
        if stale.name not in keep and stale.is_file():
            stale.unlink()
    logger.info("%d pictures in %s", len(written), out_dir)
    return written


# ---- command line ---------------------------------------------------------------------------------


def _resolve(arg: str, names: Sequence[str], image_dir: Optional[Path], where: Path) -> Tuple[str, Path]:
    """(stored name, image file) of an IMAGE argument: a stored name (file under ``image_dir``) or the path
    of an image file whose path ends with a stored name."""
    known = set(names)
    if arg in known:
        if image_dir is not None:
            return arg, image_dir / arg
        if Path(arg).is_file():
            return arg, Path(arg)
        raise ValueError(f"image {arg!r}: give the image folder with --images DIR (or the path of the file)")
    path = Path(arg)
    if path.is_file():
        full = Path(os.path.abspath(path)).as_posix()  # not resolved: the image folder may be a link
        ends = [n for n in known if full.endswith("/" + n)]
        if ends:
            return max(ends, key=len), path
    raise _unknown(arg, names, where)


def images_of_run(*reports: str | os.PathLike) -> Optional[Path]:
    """The image folder that a run recorded in its report (``settings.image_dir`` of ``report.json``), from the
    first of ``reports`` that exists and names a folder that still exists; None if none does."""
    for path in reports:
        try:
            folder = json.loads(Path(path).read_text(encoding="utf-8"))["settings"]["image_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(folder, str) and Path(folder).is_dir():
            logger.info("images from the run report %s: %s", path, folder)
            return Path(folder)
    return None


def _run_matches(args: argparse.Namespace) -> int:
    from .mapping import default_output_dir
    from .report import REPORT_FILE, report_beside_database

    src = _source(args.source, args.features)
    names = stored_names(args.source, args.features)
    where = src.path if src.kind == "db" else src.features
    images = args.images
    if images is None and src.kind == "db":  # the run's report (with or without a model) names the folder
        images = images_of_run(report_beside_database(src.path), default_output_dir(src.path) / REPORT_FILE)
    if images is not None and not images.is_dir():
        raise ValueError(f"image folder {str(images)!r} does not exist or is not a folder")
    (name0, path0), (name1, path1) = (_resolve(a, names, images, where) for a in (args.image0, args.image1))
    view = read_pair(args.source, name0, name1, args.features)
    pixels = [_pixels_for(p, n, s) for p, n, s in zip((path0, path1), (name0, name1), view.sizes)]
    fig = plot_matches(view, *pixels, width=args.width, max_lines=args.max_lines, fade=args.fade)
    save_figure(fig, args.output)
    return 0


def _run_model(args: argparse.Namespace) -> int:
    from .report import REPORT_FILE

    if args.images is not None and not args.images.is_dir():
        raise ValueError(f"image folder {str(args.images)!r} does not exist or is not a folder")
    images = args.images if args.images is not None else images_of_run(args.model / REPORT_FILE)
    rec = _load_model(args.model)
    fig = plot_model(rec, images, num_images=args.num_images, max_points=args.max_points, width=args.width,
                     title=str(args.model), fade=args.fade)
    save_figure(fig, args.output)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number from 0 to 1")
    return value


def _add_picture_arguments(parser: argparse.ArgumentParser) -> None:
    """What every picture command takes: ``--width``, ``--fade F`` / ``--colours`` (``--colours`` sets ``fade``
    to None), ``-o/--output`` and the logging options."""
    parser.add_argument("--width", type=_positive, default=1600, help="picture width in pixels")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fade", type=_fraction, default=FADE,
                       help="images are drawn in grey, blended toward white by this much, so the marks stand out")
    group.add_argument("--colours", dest="fade", action="store_const", const=None,
                       help="draw the images in their own colours")
    parser.add_argument("-o", "--output", type=Path, required=True, help="picture to write (.png, .jpg, .svg, ...)")
    cli.add_logging_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m mast3r_colmap.visualize",
                       "Pictures of the matches of an image pair or of a sparse model (PNG, no display needed).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{matches,model}")
    common = {"formatter_class": p.formatter_class, "epilog": p.epilog}
    m = sub.add_parser(
        "matches", help="the matches of one pair", **common,
        description="The two images side by side with their matches, coloured by score; from a COLMAP\n"
                    "database verified inliers and outliers (red) are told apart, hloc files hold no\n"
                    "verification.\n\n"
                    "IMAGE0 and IMAGE1 are image names as stored (paths relative to the image folder, e.g.\n"
                    "'seq1/img_003.jpg'), whose pixels are read from --images DIR, or paths of the image files\n"
                    "themselves that end with a stored name (then --images is not needed).")
    m.add_argument("source", type=Path, metavar="DB_OR_H5",
                   help="COLMAP database, hloc folder (matches.h5 + features.h5) or hloc matches.h5")
    m.add_argument("image0", metavar="IMAGE0", help="stored image name (or path to the image file)")
    m.add_argument("image1", metavar="IMAGE1", help="stored image name (or path to the image file)")
    m.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="image folder the stored names are relative to (default: the one in the report of the run "
                        "that wrote DATABASE, if any)")
    m.add_argument("--features", type=Path, default=None, metavar="FILE",
                   help="hloc features file of a matches.h5 (None: features.h5 beside it)")
    m.add_argument("--max-lines", type=_count, default=300, help="matches drawn as lines (every match gets its dots)")
    _add_picture_arguments(m)
    m.set_defaults(run=_run_matches)

    d = sub.add_parser(
        "model", help="cameras, points and keypoint coverage of a sparse model", **common,
        description="Top and side views of the cameras and 3D points of a COLMAP sparse model, and the\n"
                    "keypoints of a few images: green with a 3D point, red without.")
    d.add_argument("model", type=Path, metavar="MODEL_DIR", help="COLMAP sparse model folder (.bin or .txt)")
    d.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="image folder (default: the one in the model's report.json, if any; without one the "
                        "keypoints are drawn on blank canvases)")
    d.add_argument("--num-images", type=_count, default=4, help="images whose keypoints are shown")
    d.add_argument("--max-points", type=_positive, default=100_000, help="3D points drawn (a random sample)")
    _add_picture_arguments(d)
    d.set_defaults(run=_run_model)
    return p


def main(argv: Optional[Sequence[Any]] = None) -> int:
    """``python -m mast3r_colmap.visualize {matches,model} ...``; bad input exits with 2."""
    return cli.main(build_parser(), lambda args: args.run(args), argv)


if __name__ == "__main__":
    sys.exit(main())
