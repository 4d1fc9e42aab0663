"""The focal length of a camera from a dense pointmap of its image (MASt3R's view-1 ``pts3d``).

Model: a pinhole camera with square pixels (one focal ``f``) and the principal point ``(cx, cy)`` at the
image centre. A pixel ``(u, v)`` sees the point ``(X, Y, Z)`` of the pointmap (camera frame: x right, y
down, z forward) when

    u - cx = f X / Z,    v - cy = f Y / Z.

Pixel coordinates follow hloc's convention: ``(0, 0)`` is the centre of the top-left pixel, pixel (col,
row) sits at ``(u, v) = (col, row)``, and the centre of a W x H image is ``((W - 1) / 2, (H - 1) / 2)``
(COLMAP's ``(W / 2, H / 2)``, whose (0, 0) is the top-left corner). ``f`` comes out in the pixel units of
the pointmap: a pointmap at network resolution gives the focal at network resolution (the matcher scales
it to original pixels, :meth:`~mast3r_colmap.matching.matcher.Matcher.focal_priors`).

Fit: the L1 problem ``min_f sum |b - f a|`` with ``a = X/Z``, ``b = u - cx`` and ``a = Y/Z``, ``b = v - cy``
over the confident pixels (finite, confidence above ``min_conf``, in front of the camera within
:data:`MAX_RAY_ANGLE_DEG` of its axis), by iteratively reweighted least squares: ``f = sum(w a b) / sum(w a
a)`` with ``w = 1 / max(|b - f a|, eps)``, until ``f`` changes by less than ``tol`` (relative). The L1 loss
makes a minority of wrong points (occlusion edges, sky, reflections) pull the estimate far less than least
squares would. The iteration starts at the median of the ratios ``b / a`` weighted by ``|a|`` (since
``|b - f a| = |a| |b / a - f|``, that is the L1 minimiser itself, up to ties): from the least-squares
start ``sum(a b) / sum(a a)``, IRLS needs some 50 steps to come within 1e-4 when a fifth of the points are
wrong (10 steps leave errors of 3-12 %).

The scale of the pointmap does not matter (only ratios ``X/Z``, ``Y/Z`` enter). numpy only.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

__all__ = ["DEFAULT_MIN_CONF", "MAX_RAY_ANGLE_DEG", "MIN_PIXELS", "PLAUSIBLE_FOCAL_FACTORS", "estimate_focal",
           "image_centre"]

#: Pixels with a confidence at or below this are left out (MASt3R's confidences are ``1 + exp(x)`` >= 1).
DEFAULT_MIN_CONF = 1.5
#: Points further than this from the optical axis (or behind the camera) are left out: their X/Z or Y/Z
#: would be huge, and a single junk point near Z = 0 would weigh like thousands of good ones.
MAX_RAY_ANGLE_DEG = 85.0
#: Fewer confident pixels than this: no estimate (ValueError).
MIN_PIXELS = 16
#: Focal lengths outside this range, in units of the image's long side (fields of view of about 127 to 6
#: degrees across it), are not believed as priors (a network that does not know the image, or junk).
PLAUSIBLE_FOCAL_FACTORS = (0.25, 10.0)


def image_centre(width: int, height: int) -> Tuple[float, float]:
    """The centre ``((W - 1) / 2, (H - 1) / 2)`` of a W x H image in hloc's pixel-centre convention."""
    return (width - 1) / 2.0, (height - 1) / 2.0


def estimate_focal(pts3d: np.ndarray, conf: Optional[np.ndarray] = None, min_conf: float = DEFAULT_MIN_CONF,
                   principal_point: Optional[Tuple[float, float]] = None, iterations: int = 20,
                   tol: float = 1e-10) -> float:
    """The focal length (pixels of the pointmap) that best explains a pointmap (see the module docstring).

    Args:
        pts3d: (H, W, 3) points seen at each pixel, in the camera's frame (any scale).
        conf: optional (H, W) confidences; pixels with ``conf <= min_conf`` are left out.
        min_conf: the confidence threshold.
        principal_point: ``(cx, cy)`` in hloc's convention; default :func:`image_centre` of the pointmap.
        iterations: at most this many reweighting steps.
        tol: stop when ``f`` changes by less than this fraction.

    Raises:
        ValueError: a malformed input, fewer than :data:`MIN_PIXELS` usable pixels, or no positive finite
            focal (e.g. a pointmap behind the camera).
    """
    pts = np.asarray(pts3d, np.float64)
    if pts.ndim != 3 or pts.shape[-1] != 3:
        raise ValueError(f"pts3d must be an (H, W, 3) array, got shape {pts.shape}")
    height, width = pts.shape[:2]
    cx, cy = image_centre(width, height) if principal_point is None else map(float, principal_point)
    X, Y, Z = pts[..., 0], pts[..., 1], pts[..., 2]
    with np.errstate(invalid="ignore", over="ignore"):
        keep = np.isfinite(pts).all(axis=-1) & (Z > math.cos(math.radians(MAX_RAY_ANGLE_DEG))
                                                 * np.linalg.norm(pts, axis=-1))
    if conf is not None:
        c = np.asarray(conf, np.float64)
        if c.shape != (height, width):
            raise ValueError(f"conf must be ({height}, {width}) like pts3d, got shape {c.shape}")
        keep &= np.isfinite(c) & (c > min_conf)
    count = int(keep.sum())
    if count < MIN_PIXELS:
        raise ValueError(f"only {count} of {height * width} pixels are confident (conf > {min_conf}) and in front "
                         f"of the camera; at least {MIN_PIXELS} are needed to estimate the focal length")
    rows, cols = np.nonzero(keep)
    z = Z[keep]
    a = np.concatenate([X[keep] / z, Y[keep] / z])
    b = np.concatenate([cols - cx, rows - cy])
    f = _weighted_median(b[a != 0] / a[a != 0], np.abs(a[a != 0])) if np.any(a != 0) else float("nan")
    eps = 1e-9 * max(width, height)  # a floor on the residuals: exact data must not divide by zero
    for _ in range(iterations):
        if not math.isfinite(f):
            break
        w = 1.0 / np.maximum(np.abs(b - f * a), eps)
        new = float(np.dot(w * a, b) / np.dot(w * a, a))
        done = abs(new - f) <= tol * abs(new)
        f = new
        if done:
            break
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"the pointmap gives no positive focal length (fit: {f})")
    return f


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value at which the cumulative weight of the sorted values reaches half the total."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])
