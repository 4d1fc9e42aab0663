"""Geometric part of coarse-to-fine matching: choosing pairs of crops.

Clean-room implementation written from a behavioural description of the official code (none of it is
copied or imported), checked against the golden vectors ``tests/data/crops.npz``.

Pipeline (what :func:`select_crop_pairs` does):

1. Each full-resolution image is covered by an overlapping grid of windows whose
   size is the image aspect with long side ``maxdim`` (rounded down to a
   multiple of 16), see :func:`overlapping_grid`.
2. Every grid window is forced to the crop resolution of its image
   (:func:`normalize_windows`).
3. A grid window of image 1 that holds at least 10 coarse matches is paired with
   a window of image 2 of the forced size centred on the mean of the matched
   points; each match gets a weight that is a product of two Gaussians of its
   distance to the centres of both windows (:func:`score_cells`).  This is done
   both ways (grid of image 1, then grid of image 2).
4. :func:`greedy_selection` picks candidate pairs until 90 % of the total match
   weight is covered.

Conventions: windows are ``(l, t, r, b)`` integer pixels, half-open (a point
``(x, y)`` is inside when ``l <= x < r`` and ``t <= y < b``); shapes are
``(H, W)``; points are ``(x, y)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "TRAINING_RESOLUTIONS_512",
    "training_resolution",
    "needs_coarse_to_fine",
    "overlapping_grid",
    "normalize_windows",
    "score_cells",
    "greedy_selection",
    "candidate_crop_pairs",
    "select_crop_pairs",
]

#: Landscape training resolutions of the 512 models, as (aspect W/H, (H, W)).
TRAINING_RESOLUTIONS_512: tuple[tuple[float, tuple[int, int]], ...] = (
    (4 / 3, (384, 512)),
    (32 / 21, (336, 512)),
    (16 / 9, (288, 512)),
    (2 / 1, (256, 512)),
    (16 / 5, (160, 512)),
)

#: A grid window of image 1 needs at least this many matches to give a candidate.
MIN_CORRESPONDENCES = 10
#: Lower bound (pixels) of the 10-90 % spread of matches used to size window 2.
MIN_SPREAD = 20.0

Window = tuple[int, int, int, int]


def training_resolution(H: int, W: int, maxdim: int = 512, patch: int = 16) -> tuple[int, int]:
    """(H, W) of the training resolution with the aspect class closest to the image.

    The aspect ``max(H, W) / min(H, W)`` is compared (absolute difference) with
    the aspects of :data:`TRAINING_RESOLUTIONS_512`; the first closest wins.
    The result is transposed for portrait images (``H > W``); square images
    count as landscape.  For ``maxdim != 512`` the long side is ``maxdim`` and
    the short side ``maxdim / aspect`` rounded to a multiple of ``patch``
    (for 512 this gives exactly the table).
    """
    H, W = int(H), int(W)
    if H <= 0 or W <= 0:
        raise ValueError(f"image shape must be positive, got (H, W) = ({H}, {W})")
    aspect = max(H, W) / min(H, W)
    diffs = [abs(aspect - a) for a, _ in TRAINING_RESOLUTIONS_512]
    ref_aspect, (short, long) = TRAINING_RESOLUTIONS_512[int(np.argmin(diffs))]
    if maxdim != 512:
        long = int(maxdim)
        short = max(patch, int(round(maxdim / ref_aspect / patch)) * patch)
    return (long, short) if H > W else (short, long)


def needs_coarse_to_fine(H: int, W: int, maxdim: int = 512) -> bool:
    """True when the long side of an (H, W) image exceeds ``maxdim``."""
    return max(int(H), int(W)) > maxdim


def _grid_starts(total: int, win: int, overlap: float) -> np.ndarray:
    """Window start positions along one axis: first at 0, last at ``total - win``."""
    spacing = win * (1 - overlap)
    n = 2 + int(np.floor((total - win - 1) / spacing))
    n = max(n, 1)
    return np.round(np.linspace(0, total - win, n)).astype(np.int64)


def overlapping_grid(H: int, W: int, maxdim: int = 512, overlap: float = 0.5) -> np.ndarray:
    """Overlapping (l, t, r, b) windows covering an (H, W) image, as (n, 4) int64.

    The window has the image aspect with long side ``maxdim``, each side
    rounded down to a multiple of 16: ``16 * ((S * maxdim // max(H, W)) // 16)``.
    Along each axis the windows are spaced by ``win * (1 - overlap)`` at most,
    ``n = 2 + floor((total - win - 1) / spacing)`` starts are spread evenly
    (rounded) from 0 to ``total - win``.  Row-major over (top, left).

    Images whose long side is below ``maxdim`` (where that window would not
    fit) get the window clipped to the image, i.e. a single whole-image window
    (a 16-multiple rounding that is still larger than the image is clipped too).
    This never changes the result for images with long side >= ``maxdim``.
    """
    H, W = int(H), int(W)
    if H <= 0 or W <= 0:
        raise ValueError(f"image shape must be positive, got (H, W) = ({H}, {W})")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    S = max(H, W)
    win_h = min(H, 16 * ((H * maxdim // S) // 16))
    win_w = min(W, 16 * ((W * maxdim // S) // 16))
    if win_h <= 0 or win_w <= 0:
        # Extremely elongated image: the short side rounds down to 0; use it all.
        win_h, win_w = (win_h if win_h > 0 else H), (win_w if win_w > 0 else W)
    tops = _grid_starts(H, win_h, overlap)
    lefts = _grid_starts(W, win_w, overlap)
    tt, ll = np.meshgrid(tops, lefts, indexing="ij")
    tt, ll = tt.ravel(), ll.ravel()
    return np.stack([ll, tt, ll + win_w, tt + win_h], axis=1).astype(np.int64)


def normalize_windows(windows: np.ndarray, H: int, W: int, forced_hw: Sequence[int]) -> np.ndarray:
    """Force (l, t, r, b) windows to exactly ``forced_hw = (h, w)`` inside an (H, W) image.

    Each window is grown or shrunk symmetrically about its centre to (h, w),
    floored (``r = l + w`` and ``b = t + h`` fix any flooring error), then
    shifted the least amount to lie inside the image.  Returns (n, 4) int64.
    Raises ValueError when the forced size is larger than the image.
    """
    fh, fw = int(forced_hw[0]), int(forced_hw[1])
    H, W = int(H), int(W)
    if fh <= 0 or fw <= 0:
        raise ValueError(f"forced crop size must be positive, got (h, w) = ({fh}, {fw})")
    if fh > H or fw > W:
        raise ValueError(
            f"forced crop size (h, w) = ({fh}, {fw}) does not fit in the image (H, W) = ({H}, {W})"
        )
    win = np.asarray(windows, dtype=np.float64).reshape(-1, 4)
    cx = (win[:, 0] + win[:, 2]) / 2
    cy = (win[:, 1] + win[:, 3]) / 2
    left = np.floor(cx - fw / 2).astype(np.int64)
    top = np.floor(cy - fh / 2).astype(np.int64)
    # shift inside the image: first push right/down, then left/up
    left = np.minimum(np.maximum(left, 0), W - fw)
    top = np.minimum(np.maximum(top, 0), H - fh)
    return np.stack([left, top, left + fw, top + fh], axis=1).astype(np.int64)


def _inside(windows: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(n, N) bool: point k inside window i (half-open)."""
    x, y = pts[None, :, 0], pts[None, :, 1]
    l, t, r, b = (windows[:, j, None] for j in range(4))
    return (l <= x) & (x < r) & (t <= y) & (y < b)


def _gaussian_weight(windows: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(n, N) weights ``exp(-2 * |(centre - p) / (w, h)|^2)`` of points w.r.t. windows."""
    win = windows.astype(np.float64)
    cx = (win[:, 0, None] + win[:, 2, None]) / 2
    cy = (win[:, 1, None] + win[:, 3, None]) / 2
    w = (win[:, 2] - win[:, 0])[:, None]
    h = (win[:, 3] - win[:, 1])[:, None]
    dx = (cx - pts[None, :, 0]) / w
    dy = (cy - pts[None, :, 1]) / h
    return np.exp(-2.0 * (dx * dx + dy * dy))


def score_cells(
    cells1: np.ndarray,
    H2: int,
    W2: int,
    p1: np.ndarray,
    p2: np.ndarray,
    forced_hw2: Sequence[int],
    min_corres: int = MIN_CORRESPONDENCES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair windows of image 1 with windows of image 2 and weight the matches.

    For every window of ``cells1`` holding at least ``min_corres`` points of
    ``p1`` (half-open test), the image-2 window is centred on the mean of the
    matching ``p2`` and forced to ``forced_hw2`` (the 10-90 % spread ratio that
    would size it is computed but overridden by the forced size).  Means and
    quantiles are taken on float32 copies of the points.

    Returns ``(kept_cells1 (K,4), cells2 (K,4), weights (K,N))``; the weight
    of match k for candidate i is the product of the Gaussian weights of
    ``p1[k]`` in window 1 and ``p2[k]`` in window 2, zero when ``p1[k]`` is
    not inside window 1.
    """
    cells1 = np.asarray(cells1, dtype=np.int64).reshape(-1, 4)
    p1 = np.asarray(p1, dtype=np.float64).reshape(-1, 2)
    p2 = np.asarray(p2, dtype=np.float64).reshape(-1, 2)
    N = len(p1)
    inside = _inside(cells1, p1)
    keep = inside.sum(axis=1) >= min_corres
    cells1, inside = cells1[keep], inside[keep]
    if len(cells1) == 0:
        return np.zeros((0, 4), np.int64), np.zeros((0, 4), np.int64), np.zeros((0, N))
    p1f, p2f = p1.astype(np.float32), p2.astype(np.float32)
    raw2 = np.empty((len(cells1), 4), dtype=np.float64)
    for i, (cell, sel) in enumerate(zip(cells1, inside)):
        a, b = p1f[sel], p2f[sel]
        centre = b.mean(axis=0)
        q1 = np.quantile(a, [0.1, 0.9], axis=0)
        q2 = np.quantile(b, [0.1, 0.9], axis=0)
        spread1 = np.maximum(q1[1] - q1[0], MIN_SPREAD)
        spread2 = np.maximum(q2[1] - q2[0], MIN_SPREAD)
        size1 = np.array([cell[2] - cell[0], cell[3] - cell[1]], dtype=np.float32)
        half = size1 * (spread2 / spread1) / 2
        raw2[i] = [centre[0] - half[0], centre[1] - half[1], centre[0] + half[0], centre[1] + half[1]]
    cells2 = normalize_windows(raw2, H2, W2, forced_hw2)
    weights = _gaussian_weight(cells1, p1) * _gaussian_weight(cells2, p2) * inside
    return cells1, cells2, weights


def greedy_selection(weights: np.ndarray, target: float = 0.9) -> list[int]:
    """Greedy cover: candidate indices in selection order.

    ``weights`` is (K, N), candidates by matches.  The total is the sum over
    matches of the best candidate weight.  The candidate with the largest
    remaining weight sum is picked, its weights are subtracted from all
    candidates (clipped at 0), until the picked sums reach ``target * total``.
    Ties go to the lowest index.  Returns [] when there is nothing to cover.
    """
    w = np.array(weights, dtype=np.float64, copy=True)
    if w.ndim != 2:
        raise ValueError(f"weights must be (K, N), got shape {w.shape}")
    if w.size == 0:
        return []
    total = w.max(axis=0).sum()
    order: list[int] = []
    covered = 0.0
    while covered < target * total:
        sums = w.sum(axis=1)
        best = int(np.argmax(sums))
        if sums[best] <= 0:
            break
        order.append(best)
        covered += sums[best]
        w = np.maximum(w - w[best].copy(), 0.0)
    return order


def _check_shape(shape: Sequence[int], name: str) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"{name} must be (H, W), got {shape!r}")
    H, W = int(shape[0]), int(shape[1])
    if H <= 0 or W <= 0:
        raise ValueError(f"{name} must be positive, got (H, W) = ({H}, {W})")
    return H, W


def _default_forced(H: int, W: int, maxdim: int) -> tuple[int, int]:
    """training_resolution(H, W), clipped to the image (small or very elongated images)."""
    h, w = training_resolution(H, W, maxdim)
    return min(h, H), min(w, W)


def candidate_crop_pairs(
    shape1: Sequence[int],
    shape2: Sequence[int],
    xy1: np.ndarray,
    xy2: np.ndarray,
    maxdim: int = 512,
    overlap: float = 0.5,
    forced_resolution: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """All candidate crop pairs and their per-match weights.

    Returns ``(cand1 (K,4), cand2 (K,4), weights (K,N), n_from_grid1)``: first
    the grid windows of image 1 (with >= 10 matches) paired with image-2
    windows, then grid windows of image 2 paired with image-1 windows.
    See :func:`select_crop_pairs` for the arguments.
    """
    H1, W1 = _check_shape(shape1, "shape1")
    H2, W2 = _check_shape(shape2, "shape2")
    xy1 = np.asarray(xy1, dtype=np.float64).reshape(-1, 2)
    xy2 = np.asarray(xy2, dtype=np.float64).reshape(-1, 2)
    if len(xy1) != len(xy2):
        raise ValueError(f"xy1 and xy2 must have the same length, got {len(xy1)} and {len(xy2)}")
    if forced_resolution is None:
        res1, res2 = _default_forced(H1, W1, maxdim), _default_forced(H2, W2, maxdim)
    else:
        if len(forced_resolution) != 2:
            raise ValueError("forced_resolution must be a pair ((H1, W1), (H2, W2))")
        res1 = (int(forced_resolution[0][0]), int(forced_resolution[0][1]))
        res2 = (int(forced_resolution[1][0]), int(forced_resolution[1][1]))
    grid1 = normalize_windows(overlapping_grid(H1, W1, maxdim, overlap), H1, W1, res1)
    grid2 = normalize_windows(overlapping_grid(H2, W2, maxdim, overlap), H2, W2, res2)
    c1a, c2a, wa = score_cells(grid1, H2, W2, xy1, xy2, res2)
    c2b, c1b, wb = score_cells(grid2, H1, W1, xy2, xy1, res1)
    cand1 = np.concatenate([c1a, c1b]).astype(np.int64)
    cand2 = np.concatenate([c2a, c2b]).astype(np.int64)
    weights = np.concatenate([wa, wb])
    return cand1, cand2, weights, len(c1a)


def select_crop_pairs(
    shape1: Sequence[int],
    shape2: Sequence[int],
    xy1: np.ndarray,
    xy2: np.ndarray,
    maxdim: int = 512,
    overlap: float = 0.5,
    forced_resolution: Sequence[Sequence[int]] | None = None,
) -> list[tuple[Window, Window]]:
    """Ordered pairs of crops ``((l, t, r, b) in image 1, (l, t, r, b) in image 2)``.

    Args:
        shape1, shape2: full-resolution (H, W) of both images.
        xy1, xy2: (N, 2) coarse matches (x, y) in full-resolution pixels;
            row k of both is one correspondence.
        maxdim: long side of the grid windows (network resolution).
        overlap: minimum overlap of neighbouring grid windows.
        forced_resolution: ``((h1, w1), (h2, w2))`` crop size of each image.
            When None, each image uses :func:`training_resolution` of its
            shape, clipped to the image size (so an image not larger than
            ``maxdim`` gets one whole-image window, and a very elongated image
            whose training resolution is taller than it gets full-height crops).
            An explicit size larger than its image raises ValueError.

    Returns the greedy selection (90 % of the match weight), best first, with
    Python ints.  No matches (or no window with >= 10 matches) gives [].
    In visloc terms, image 1 is the map (database) image and image 2 the query.
    """
    cand1, cand2, weights, _ = candidate_crop_pairs(
        shape1, shape2, xy1, xy2, maxdim, overlap, forced_resolution
    )
    order = greedy_selection(weights, target=0.9)
    return [
        (tuple(int(v) for v in cand1[i]), tuple(int(v) for v in cand2[i]))  # type: ignore[misc]
        for i in order
    ]

