"""Correspondence extraction from MASt3R descriptor maps (the official COLMAP-export and MASt3R-SfM modes).

- :func:`extract_correspondences_nonsym`: COLMAP-export mode, one inference pass, FRM both
  ways, ``conf = min(conf1, conf2)``.
- :func:`extract_correspondences_symmetric`: MASt3R-SfM mode, both inference passes, FRM
  both ways on each, ``conf = sqrt(q_img1 * q_img2)`` of the pass where a pair first occurs.
- :class:`Matches` and :func:`border_mask`, the border filter applied by callers.

Coordinates are integer ``(x, y)`` pixels of the network-resolution images, int64.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch

from .frm import _check_pair, _flat_to_xy, _frm_flat, _memo_pair, merge_corres

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "Matches",
    "extract_correspondences_nonsym",
    "extract_correspondences_symmetric",
    "border_mask",
]


class Matches(NamedTuple):
    """Pixel correspondences: unpacks as ``xy1, xy2, conf = matches``."""

    xy1: np.ndarray
    """(N, 2) int64 (x, y) in image 1."""
    xy2: np.ndarray
    """(N, 2) int64 (x, y) in image 2."""
    conf: np.ndarray
    """(N,) float32 confidence."""

    @property
    def num(self) -> int:
        """Number of correspondences."""
        return int(self.xy1.shape[0])

    def select(self, mask: np.ndarray) -> "Matches":
        """Subset by boolean mask or index array."""
        return Matches(self.xy1[mask], self.xy2[mask], self.conf[mask])


def _as_numpy_map(x: ArrayLike, name: str, shape: tuple[int, int]) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (H, W), got {arr.shape}")
    return arr.astype(np.float32, copy=False).ravel()


def border_mask(
    xy1: np.ndarray, xy2: np.ndarray, shape1: Sequence[int], shape2: Sequence[int], border: int = 3
) -> np.ndarray:
    """Boolean mask of matches with ``border <= x < W - border`` and ``border <= y < H - border``
    in both images; ``shape1``/``shape2`` are (H, W) (e.g. ``true_shape``)."""

    def inside(xy: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        h, w = int(shape[0]), int(shape[1])
        x, y = xy[:, 0], xy[:, 1]
        return (x >= border) & (x < w - border) & (y >= border) & (y < h - border)

    xy1 = np.asarray(xy1).reshape(-1, 2)
    xy2 = np.asarray(xy2).reshape(-1, 2)
    return inside(xy1, shape1) & inside(xy2, shape2)


def extract_correspondences_nonsym(
    desc1: ArrayLike,
    desc2: ArrayLike,
    conf1: ArrayLike,
    conf2: ArrayLike,
    subsample: int = 8,
    pixel_tol: float = 0,
    block_size: int | None = None,
) -> Matches:
    """COLMAP-export correspondences.

    FRM desc1→desc2 and desc2→desc1 (with ``pixel_tol > 0``: one iteration from each image's
    S-grid, starting at S//2, with that tolerance), forward pairs then backward pairs swapped,
    made unique (first occurrence) and sorted by (flat idx1, flat idx2);
    ``conf = min(conf1[y1, x1], conf2[y2, x2])`` (callers pass ``desc_conf``).
    """
    d1, d2 = _check_pair(desc1, desc2)
    h1, w1 = d1.shape[:2]
    h2, w2 = d2.shape[:2]
    c1 = _as_numpy_map(conf1, "conf1", (h1, w1))
    c2 = _as_numpy_map(conf2, "conf2", (h2, w2))
    nns = _memo_pair(d1, d2, block_size)  # both directions share the NN caches
    f1, f2 = _frm_flat(d1, d2, subsample, None, pixel_tol, nns=nns)
    b2, b1 = _frm_flat(d2, d1, subsample, None, pixel_tol, nns=nns[::-1])
    idx1, idx2, _ = merge_corres(np.concatenate([f1, b1]), np.concatenate([f2, b2]))
    conf = np.minimum(c1[idx1], c2[idx2]).astype(np.float32)
    logger.debug("nonsym: %d fwd + %d bwd -> %d unique", f1.size, b1.size, idx1.size)
    return Matches(_flat_to_xy(idx1, w1), _flat_to_xy(idx2, w2), conf)


def extract_correspondences_symmetric(
    descs: Sequence[ArrayLike],
    confs: Sequence[ArrayLike],
    subsample: int = 8,
    block_size: int | None = None,
) -> Matches:
    """MASt3R-SfM correspondences from both symmetric-inference passes.

    Args:
        descs: ``[d11, d21, d22, d12]``: image 1 / image 2 through head 1 / head 2 of the (1,2)
            pass, then image 2 / image 1 through head 1 / head 2 of the (2,1) pass.
        confs: the matching ``[q11, q21, q22, q12]`` descriptor confidences.

    FRM runs both ways on (d11, d21), then both ways on (d12, d22); the four sets are merged
    (unique pairs sorted by (idx1, idx2)) and ``conf = sqrt(q_img1 * q_img2)`` is read from the
    pass where the pair first occurs.
    """
    if len(descs) != 4 or len(confs) != 4:
        raise ValueError("descs and confs must each hold 4 maps: [11, 21, 22, 12]")
    d11, d21 = _check_pair(descs[0], descs[1])
    d12, d22 = _check_pair(descs[3], descs[2])
    if d11.shape != d12.shape or d21.shape != d22.shape:
        raise ValueError(
            f"image 1 maps d11 {tuple(d11.shape)} / d12 {tuple(d12.shape)} or image 2 maps "
            f"d21 {tuple(d21.shape)} / d22 {tuple(d22.shape)} differ in shape"
        )
    h1, w1 = d11.shape[:2]
    h2, w2 = d21.shape[:2]
    q11 = _as_numpy_map(confs[0], "q11", (h1, w1))
    q21 = _as_numpy_map(confs[1], "q21", (h2, w2))
    q22 = _as_numpy_map(confs[2], "q22", (h2, w2))
    q12 = _as_numpy_map(confs[3], "q12", (h1, w1))

    parts1, parts2, passes = [], [], []
    for p, (a, b) in enumerate([(d11, d21), (d12, d22)]):
        nns = _memo_pair(a, b, block_size)
        f1, f2 = _frm_flat(a, b, subsample, None, 0, nns=nns)
        b2, b1 = _frm_flat(b, a, subsample, None, 0, nns=nns[::-1])
        parts1 += [f1, b1]
        parts2 += [f2, b2]
        passes.append(np.full(f1.size + b1.size, p, dtype=np.int8))
    all1 = np.concatenate(parts1)
    all2 = np.concatenate(parts2)
    which = np.concatenate(passes)
    idx1, idx2, first = merge_corres(all1, all2)
    second = which[first] == 1
    qa = np.where(second, q12[idx1], q11[idx1])
    qb = np.where(second, q22[idx2], q21[idx2])
    conf = np.sqrt(qa * qb).astype(np.float32)
    return Matches(_flat_to_xy(idx1, w1), _flat_to_xy(idx2, w2), conf)
