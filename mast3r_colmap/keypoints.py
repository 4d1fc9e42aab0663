"""Per-pair raw matches -> per-image shared keypoints and one-to-one index matches.

Dense matchers return, for every pair, float correspondences in original-image pixels
(:class:`~mast3r_colmap.structures.PairMatches`). COLMAP and hloc instead want, per image, one
list of keypoints that every pair of that image indexes into. :func:`consolidate` builds those
lists from full-resolution float coordinates and, where a match says so, from the lattice it was
sampled on (``PairMatches.grid0`` / ``grid1``, a :class:`~mast3r_colmap.structures.SamplingGrid`):
the network pixels of a single pass (3.125 px apart for a 1600-px image matched at 512 px), the
full-resolution pixels of coarse-to-fine crops (origin 0, step 1), none for matches of arbitrary
positions (hloc features, user input). Pairs matched at different scales, by coarse-to-fine tiles
or by other sources share keypoints all the same.

Each image is handled in one of three modes.

**Quantised** (the default). Every raw observation of the image, from any pair and on either
side, falls into a cell of a lattice of cells, chosen per image from the grids of its
observations (grids are compared with :meth:`~mast3r_colmap.structures.SamplingGrid.same_lattice`,
a relative tolerance of 1e-9):

* **On its grid**: all observations carry the same grid ``(ox, oy, sx, sy)`` (the usual case: one
  matcher run). Cell ``(i, j)`` is centred on the lattice point ``(ox + i*sx, oy + j*sy)`` and
  covers ``x in [ox + (i - 1/2)*sx, ox + (i + 1/2)*sx)`` (likewise y); its keypoint lies
  **exactly on the lattice point**, not at a mean. A single pass thus gives one keypoint per
  network pixel observed, at its full-resolution centre, shared by every pair of the image, and
  coarse-to-fine gives keypoints on integer pixels. Observations carry the rounding of their source
  (e.g. float32 in the match store) and snap back to the lattice; one more than 0.1 step away from
  its lattice point is snapped all the same, with a warning (its grid was wrong). Of equal grids
  with different origins the smallest ``(ox, oy, sx, sy)`` is used.
* **Mixed**: the grids differ, or some observations have none. The cells are those of the finest
  grid (smallest ``sx * sy``, ties by ``(sx, sy, ox, oy)``), centred on its lattice points, or,
  without any grid, squares of ``cell_size`` px: cell ``(i, j)`` covers ``x in [i*c - 0.5,
  (i+1)*c - 0.5)`` and ``y in [j*c - 0.5, (j+1)*c - 0.5)``, so with the hloc convention (pixel
  centres at integers) cells are aligned with pixel blocks. The keypoint's **position** is the
  score-weighted mean of the observations in the cell. Weights are the match scores clipped at 0;
  a cell whose weights sum to 0 uses the plain mean. The mean always lies inside its cell (hloc's
  most-voted sub-position instead snaps keypoints to a ``max_error`` grid).

In both:

* A keypoint's **score** is its vote: the sum of the clipped scores of its observations.
* With ``max_kps``, only the ``max_kps`` cells with the highest votes are kept. Ties go to the
  cell with more observations, then to the one first in (y, x) order. Observations in a
  dropped cell are re-assigned to the nearest kept keypoint within the radius (``max_error``,
  default ``cell_size``; inclusive; ties go to the lower id). If none is that close, they are
  dropped. On a grid, distances are measured from the dropped lattice point, in whole steps,
  so all its observations go to the same keypoint and symmetric neighbours tie exactly.
  Kept keypoints keep their position and score: the re-assigned observations do not move
  them. ``max_kps=None``: no cap.
* Limitation (shared with hloc): in mixed mode, the observations of one scene point that
  straddle a cell border become two keypoints a few pixels apart, and different pairs may use
  either one. On a grid, pairs that sample one scene point at different lattice points give
  different keypoints (one step apart) just the same.

**Fixed** (``fixed[name]``: existing keypoints, e.g. from a database or a reference map). The
keypoints are returned unchanged, in the same order. Each observation snaps to the nearest
existing keypoint within ``max_error`` (default ``cell_size``; a ``cKDTree`` query; the bound is
inclusive). If none is that close, the observation is dropped. Scores are the votes of the
snapped observations (0 for keypoints that got none). Grids are not used.

**Unquantised** (``unquantized``, e.g. a localisation query). Every distinct raw position
becomes its own keypoint, with its coordinates exactly as given. Identical coordinates share
one id. ``max_kps`` does not apply, grids are not used. This is hloc's localisation special case;
to reproduce it, use ``KeypointConfig(max_kps=None)``, ``fixed=<db keypoints>`` and
``unquantized={query}``.

Keypoint ids are ordered by (y, x): by cell for quantised images, by exact position for
unquantised ones. They do not depend on the order, orientation or grouping of the input pairs.
Float sums always run over observations in a canonical order, so results are bitwise
reproducible.

**Matches.** For each pair, both sides are mapped to keypoint ids, and a match is dropped if
either side has none. The rest are made one-to-one by a greedy matching in order of descending
raw score: a match is kept when neither of its keypoints is taken by a better one. Ties are
broken by (idx0, idx1) in the name-sorted orientation. Duplicate (idx0, idx1) rows collapse to
their best score. This keeps more matches than hloc's "best per idx0, then best per idx1": a
keypoint whose best partner is taken may still match its second choice. The greedy matching
runs as vectorised rounds of mutual-best selection (the best remaining match is always mutual
best, so every round makes progress). Only long conflict chains outlast ``_MAX_ROUNDS`` rounds;
the few rows left then are finished by a sequential pass, which gives the same result. Scores
are the raw match scores (float32), and rows are sorted by (idx0, idx1).

**Repeated pairs.** A pair given more than once, in the same or the opposite orientation, is
merged: the raw matches of all its copies are pooled (so they vote once each, each with the grid
of its copy) and one :class:`IndexMatches` is returned, oriented like the copy seen first. The
output list follows the order in which pairs are first seen. Self-pairs (``name0 == name1``)
raise ``ValueError``.

**Filtering.** Raw matches with a non-finite coordinate or score, or with a score below
``min_score``, are dropped before voting (a copy of a pair left without matches brings no grid).
Images that appear only in empty pairs still get an (empty) entry. The output dict has one entry
per image named in a pair (sorted by name). Fixed images named in no pair are not returned.

**Cost.** Everything is vectorised numpy/scipy work per image and per pair; there is no Python
loop over matches. Cells are grouped with a ``bincount`` over a dense cell table of the image.
The same table serves the re-assignment as a neighbour gather (at most 5x5 cells; on a grid, a
scatter from the kept lattice points over the at most 1024 offsets within the radius, nearest first). A sort
and a ``cKDTree`` are the fallbacks for far-flung coordinates or larger radii (on a grid, ties are
then broken by the tree's rounding). The one-to-one rounds work on tables of the ids of one pair.

**Two drivers, one implementation.** Both run the same steps, in the same order, on the same values: merge
the copies of each pair (``_merge_parts``), make the keypoints of each image from its observations
(``_image``, images sorted by name, observations in the canonical order of its pairs sorted by name), then
the one-to-one matches of each pair (``_pair_matches``). They differ only in where the values wait between
the steps, so their results are bitwise the same (``tests/test_out_of_core.py``).

* :func:`consolidate` (in memory): all pairs must be seen before any image is final, so the filtered raw
  matches are held once; arrays are shared, not copied, when nothing is filtered. Each image then
  concatenates its observations, which is transient. Each pair also keeps one int32 id per side and match.
  A pair's coordinates are released as soon as both of its images are done. Memory grows with the whole
  collection: about 36 bytes per raw match (float64 coordinates, float32 score).
* :func:`consolidate_out_of_core` (for a match store): image by image, it reads every pair that names the
  image (``read``: indexed reads of the store, one pair at a time), keeps only that image's side, makes
  its keypoints and writes them and the ids of its observations to a scratch folder (per pair: the
  merged scores, the ids of side a, the ids of side b; int32 and float32, 12 bytes per match). Each pair
  is thus read twice, once for each image. Then pair by pair, in first-seen order, the one-to-one
  matches are made from the stored ids and written to the scratch folder too. Memory: the observations
  of one image (its pairs read one at a time, plus their merge), a few integers per pair and image, and
  what ``read`` costs; the result (:class:`DiskConsolidation`) reads keypoints and matches back on demand.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
from scipy.spatial import cKDTree
from tqdm import tqdm

from .structures import ImageKeypoints, IndexMatches, PairMatches, SamplingGrid

__all__ = ["DiskConsolidation", "KeypointConfig", "consolidate", "consolidate_out_of_core"]

logger = logging.getLogger(__name__)

_MAX_ROUNDS = 32          # vectorised mutual-best rounds before the sequential finish
_CELL_LIMIT = float(2 ** 52)  # cell coordinates are clipped here before the int64 cast
_DENSE_MIN = 1 << 22      # a dense cell table up to this size (32 MiB; or 8 entries per observation) is fine
_MAX_REACH = 2            # re-assignment scans (2 * reach + 1)**2 cells at most, else uses a cKDTree
_MAX_OFFSETS = 1024       # lattice re-assignment scans this many neighbour cells at most, else uses a cKDTree
_OFF_GRID = 0.1           # an observation farther than this (in steps) from its lattice point is reported


@dataclass(frozen=True)
class KeypointConfig:
    """How raw matches become keypoints (see the module docstring).

    Observations on a sampling grid are quantised on that grid; ``cell_size`` is the cell of those without
    one, and the radius of re-assignment (``max_kps``) and snapping (``fixed``) unless ``max_error`` is set.
    """

    cell_size: float = 4.0          # px at full resolution: the cell of observations without a sampling grid
    #: cap per quantised image (top cells by vote), then re-assign; None: no cap. No cap is the default: on
    #: benchmarks/bench_sfm_accuracy.py a cap of 8192 at 1600 px doubles the rotation and centre errors
    #: (network-pixel keypoints: ~35k per image), at ~1/4 of the mapping time
    max_kps: Optional[int] = None
    max_error: Optional[float] = None  # re-assignment / snapping radius in px; None = cell_size
    min_score: float = 0.0          # raw matches scoring lower are dropped before voting

    def __post_init__(self) -> None:
        if not (np.isfinite(self.cell_size) and self.cell_size > 0):
            raise ValueError(f"cell_size must be a positive number, got {self.cell_size}")
        if self.max_kps is not None and int(self.max_kps) < 1:
            raise ValueError(f"max_kps must be >= 1 or None, got {self.max_kps}")
        if self.max_error is not None and not (np.isfinite(self.max_error) and self.max_error >= 0):
            raise ValueError(f"max_error must be >= 0 or None, got {self.max_error}")
        if np.isnan(self.min_score):
            raise ValueError("min_score must not be NaN")

    @property
    def radius(self) -> float:
        """The effective re-assignment / snapping radius in pixels."""
        return float(self.cell_size if self.max_error is None else self.max_error)


_Grid = Optional[SamplingGrid]
_Part = Tuple[np.ndarray, np.ndarray, np.ndarray, _Grid, _Grid]   # xy_a, xy_b, scores, grid_a, grid_b


@dataclass
class _Pair:
    """One unordered pair; the arrays are in name-sorted orientation (a < b)."""

    a: str
    b: str
    flipped: bool                      # first-seen orientation was (b, a)
    parts: List[_Part]
    xy: Optional[List[np.ndarray]] = None   # [xy_a, xy_b] after merging; freed when both images are done
    scores: Optional[np.ndarray] = None
    ids: Optional[List[Optional[np.ndarray]]] = None
    grids: Optional[List[Set[_Grid]]] = None  # [grids of side a, of side b] of the copies with matches


@dataclass(frozen=True)
class _Lattice:
    """The cells of a quantised image: cell (i, j) covers ``[x0 + i*sx, x0 + (i+1)*sx) x [y0 + j*sy, ...)``.
    ``exact``: its keypoint is the cell centre (a lattice point of the image's grid), else the weighted mean."""

    x0: float
    y0: float
    sx: float
    sy: float
    exact: bool = False
    ox: float = 0.0                    # exact: the lattice point of cell (0, 0)
    oy: float = 0.0


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------

def _filtered(pm: PairMatches, min_score: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop rows with non-finite values or a score below ``min_score``; no copy if none goes."""
    s = pm.scores
    if len(s) == 0 or (s.min() >= min_score and np.isfinite(s.max())
                       and np.isfinite(pm.xy0.sum()) and np.isfinite(pm.xy1.sum())):
        return pm.xy0, pm.xy1, s                        # fast path: nothing to drop
    keep = np.isfinite(s) & (s >= min_score)
    keep &= np.isfinite(pm.xy0).all(1) & np.isfinite(pm.xy1).all(1)
    if keep.all():
        return pm.xy0, pm.xy1, s
    return pm.xy0[keep], pm.xy1[keep], s[keep]


def _merge_parts(pair: _Pair) -> None:
    """Pool the copies of a pair; several copies are put into a canonical row order."""
    parts = [p for p in pair.parts if len(p[2])]
    pair.grids = [{p[3] for p in parts}, {p[4] for p in parts}]
    parts = parts or pair.parts[:1]
    if len(parts) == 1:
        xa, xb, s = parts[0][:3]
    else:
        xa = np.concatenate([p[0] for p in parts])
        xb = np.concatenate([p[1] for p in parts])
        s = np.concatenate([p[2] for p in parts])
        order = np.lexsort((s, xb[:, 1], xb[:, 0], xa[:, 1], xa[:, 0]))
        xa, xb, s = xa[order], xb[order], s[order]
    pair.xy, pair.scores, pair.parts = [xa, xb], s, []
    pair.ids = [None, None]


def _add(pairs: Dict[Tuple[str, str], _Pair], pm: PairMatches, min_score: float) -> None:
    """Add one input to its unordered pair in ``pairs`` (created in the orientation seen first)."""
    if pm.name0 == pm.name1:
        raise ValueError(f"self-pair {pm.name0!r}/{pm.name1!r}")
    xy0, xy1, s = _filtered(pm, min_score)
    flip = pm.name0 > pm.name1
    key = (pm.name1, pm.name0) if flip else (pm.name0, pm.name1)
    if key not in pairs:
        pairs[key] = _Pair(key[0], key[1], flip, [])
    pairs[key].parts.append((xy1, xy0, s, pm.grid1, pm.grid0) if flip else (xy0, xy1, s, pm.grid0, pm.grid1))


def _collect(pair_matches: Iterable[PairMatches], min_score: float) -> List[_Pair]:
    """Group the input by unordered pair, in first-seen order."""
    pairs: Dict[Tuple[str, str], _Pair] = {}
    for pm in pair_matches:
        _add(pairs, pm, min_score)
    out = list(pairs.values())
    for p in out:
        _merge_parts(p)
    return out


def _check_inputs(fixed: Optional[Mapping[str, np.ndarray]], unquantized: Collection[str]
                  ) -> Tuple[Dict[str, np.ndarray], Set[str]]:
    """``fixed`` as finite (K, 2) float64 arrays and ``unquantized`` as a set; ValueError if bad."""
    fixed_pts: Dict[str, np.ndarray] = {}
    for name, pts in (fixed or {}).items():
        pts = np.asarray(pts, np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            raise ValueError(f"fixed keypoints of {name!r} must be a finite (K, 2) array, got {pts.shape}")
        fixed_pts[name] = pts
    unq = set(unquantized)
    both = unq.intersection(fixed_pts)
    if both:
        raise ValueError(f"images both fixed and unquantized: {sorted(both)}")
    return fixed_pts, unq


# --------------------------------------------------------------------------------------------
# Per-image keypoints: each returns (keypoints (K,2) f64, scores (K,) f64, ids (N,) int32)
# --------------------------------------------------------------------------------------------

def _snap(points: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    """Index of the nearest of ``points`` within ``radius`` (inclusive) of each row of ``xy``, else -1."""
    ids = np.full(len(xy), -1, np.int32)
    if len(points) == 0 or len(xy) == 0:
        return ids
    bound = radius + max(radius, 1.0) * 1e-9            # the tree's bound is strict (and squared)
    d, i = cKDTree(points).query(xy, k=1, distance_upper_bound=bound)
    ok = (i < len(points)) & (d <= radius)
    ids[ok] = i[ok]
    return ids


class _Cells:
    """Distinct integer cells ``(cx, cy)`` in (y, x) order; ``inv[i]`` is the cell of row i.

    When the bounding box of the cells is small (the usual case) the cells are laid out on a
    dense row-major table (``flat`` = table index per row), which makes grouping a ``bincount``
    and neighbour look-ups a gather. Far-flung coordinates fall back to sorting.
    """

    def __init__(self, cx: np.ndarray, cy: np.ndarray) -> None:
        n = len(cx)
        self.x0, self.y0 = int(cx.min()), int(cy.min())
        self.nx, self.ny = int(cx.max()) - self.x0 + 1, int(cy.max()) - self.y0 + 1
        self.dense = self.nx * self.ny <= max(8 * n, _DENSE_MIN)
        if self.dense:
            self.flat = (cy - self.y0) * self.nx + (cx - self.x0)
            seen = np.zeros(self.nx * self.ny, bool)
            seen[self.flat] = True
            self.occupied = np.flatnonzero(seen)
            rank = np.empty(self.nx * self.ny, np.int64)   # read only where occupied
            rank[self.occupied] = np.arange(len(self.occupied))
            self.inv = rank[self.flat]
            self.cx = self.occupied % self.nx + self.x0
            self.cy = self.occupied // self.nx + self.y0
        else:
            order = np.lexsort((cx, cy))
            sx, sy = cx[order], cy[order]
            new = np.empty(n, bool)
            new[0] = True
            np.not_equal(sx[1:], sx[:-1], out=new[1:])
            new[1:] |= sy[1:] != sy[:-1]
            self.inv = np.empty(n, np.int64)
            self.inv[order] = np.cumsum(new) - 1
            self.cx, self.cy = sx[new], sy[new]

    def __len__(self) -> int:
        return len(self.cx)

    def nearest(self, kept: np.ndarray, kx: np.ndarray, ky: np.ndarray, rows: np.ndarray,
                x: np.ndarray, y: np.ndarray, reach: int) -> Tuple[np.ndarray, np.ndarray]:
        """For each of ``rows`` (at ``x, y``), the nearest keypoint ``(kx, ky)`` of the cells ``kept``
        among the cells up to ``reach`` cells away: (index into kx or -1, distance). Ties go to
        the lower index. Dense layout only."""
        wd = self.nx + 2 * reach                        # padded table: no bounds checks needed
        table = np.full((self.ny + 2 * reach) * wd, -1, np.int64)
        occ = self.occupied[kept]
        table[(occ // self.nx + reach) * wd + occ % self.nx + reach] = np.arange(len(kept))
        f = self.flat[rows]
        base = (f // self.nx + reach) * wd + f % self.nx + reach
        best = np.full(len(rows), -1, np.int64)
        d2best = np.full(len(rows), np.inf)
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                cand = table[base + (dy * wd + dx)]
                hit = np.flatnonzero(cand >= 0)
                cand = cand[hit]
                d2 = (kx[cand] - x[hit]) ** 2 + (ky[cand] - y[hit]) ** 2
                old = d2best[hit]
                better = (d2 < old) | ((d2 == old) & (cand < best[hit]))
                best[hit[better]] = cand[better]
                d2best[hit[better]] = d2[better]
        return best, np.sqrt(d2best)

    def nearest_cell(self, kept: np.ndarray, lost: np.ndarray, sx: float, sy: float, radius: float
                     ) -> Optional[np.ndarray]:
        """For each cell ``lost``, the index into ``kept`` of the nearest kept cell within ``radius``, -1 if
        none, measured between cell centres of a lattice of steps ``(sx, sy)``. Distances are computed from
        whole cell offsets, so equal offsets tie exactly, and ties go to the lower index. None when the
        cells are not laid out densely or the radius spans more than ``_MAX_OFFSETS`` cells."""
        rx, ry = int(radius // sx) + 1, int(radius // sy) + 1
        if not self.dense or (2 * rx + 1) * (2 * ry + 1) > 4 * _MAX_OFFSETS:
            return None
        dy, dx = np.divmod(np.arange((2 * ry + 1) * (2 * rx + 1)), 2 * rx + 1)
        dx, dy = dx - rx, dy - ry
        d2 = (dx * sx) ** 2 + (dy * sy) ** 2            # (-a)**2 == a**2: symmetric offsets tie exactly
        ok = (np.sqrt(d2) <= radius) & (d2 > 0)
        if ok.sum() > _MAX_OFFSETS:
            return None
        order = np.lexsort((dx[ok], dy[ok], d2[ok]))
        dx, dy, d2 = dx[ok][order], dy[ok][order], d2[ok][order]
        wd = self.nx + 2 * rx                           # padded table: no bounds checks needed
        size, n = (self.ny + 2 * ry) * wd, len(kept)
        occ = self.occupied[kept]
        at = (occ // self.nx + ry) * wd + occ % self.nx + rx
        ids = np.arange(n, dtype=np.int32)
        best = np.empty(size, np.int32)                 # per cell reached: the lowest id at the nearest distance
        done = np.zeros(size, bool)                     # reached (best is set)
        bounds = np.flatnonzero(np.diff(d2, prepend=-1.0, append=np.inf))   # groups of equal distance
        for start, end in zip(bounds[:-1], bounds[1:]):  # scatter from the kept cells, nearest first
            cells = np.concatenate([at + (dy[o] * wd + dx[o]) for o in range(start, end)])
            free = ~done[cells]
            cells = cells[free]
            best[cells] = n
            np.minimum.at(best, cells, np.tile(ids, end - start)[free])
            done[cells] = True
        f = self.occupied[lost]
        f = (f // self.nx + ry) * wd + f % self.nx + rx
        return np.where(done[f], best[f], -1)


def _top_cells(vote: np.ndarray, count: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of the ``n`` cells with the highest vote (ties: more observations, then lower index)."""
    thr = np.partition(vote, len(vote) - n)[len(vote) - n]   # the n-th highest vote
    keep = vote > thr
    tie = np.flatnonzero(vote == thr)
    keep[tie[np.lexsort((tie, -count[tie]))][: n - int(keep.sum())]] = True
    return np.flatnonzero(keep)


def _lattice(grids: Set[_Grid], cell_size: float) -> _Lattice:
    """The cells of an image whose observations carry ``grids`` (None: observations without a grid)."""
    real = sorted((g for g in grids if g is not None), key=lambda g: (g.ox, g.oy, g.sx, g.sy))
    if not real:
        return _Lattice(-0.5, -0.5, cell_size, cell_size)
    exact = None not in grids and all(real[0].same_lattice(g) for g in real[1:])
    g = real[0] if exact else min(real, key=lambda g: (g.sx * g.sy, g.sx, g.sy, g.ox, g.oy))
    return _Lattice(g.ox - 0.5 * g.sx, g.oy - 0.5 * g.sy, g.sx, g.sy, exact, g.ox, g.oy)


def _cell_index(v: np.ndarray, start: float, c: float) -> np.ndarray:
    """Cell of each coordinate: cell k covers [start + k*c, start + (k+1)*c)."""
    return np.clip(np.floor((v - start) / c), -_CELL_LIMIT, _CELL_LIMIT).astype(np.int64)


def _quantised(xy: np.ndarray, w: np.ndarray, lat: _Lattice, conf: KeypointConfig, name: str
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(xy) == 0:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0, np.int32)
    x, y = np.ascontiguousarray(xy[:, 0]), np.ascontiguousarray(xy[:, 1])
    cells = _Cells(_cell_index(x, lat.x0, lat.sx), _cell_index(y, lat.y0, lat.sy))
    inv, k = cells.inv, len(cells)
    vote = np.bincount(inv, w, minlength=k)
    count = np.bincount(inv, minlength=k)
    kp = []
    if lat.exact:                                       # the lattice points themselves
        off = np.zeros(len(x), bool)
        for v, cv, o, c in ((x, cells.cx, lat.ox, lat.sx), (y, cells.cy, lat.oy, lat.sy)):
            kp.append(o + cv * c)
            off |= np.abs(v - kp[-1][inv]) > _OFF_GRID * c
        if off.any():
            logger.warning("%s: %d of %d observations lie more than %g step from their sampling grid; snapped "
                           "to it", name, int(off.sum()), len(x), _OFF_GRID)
    else:                                               # the score-weighted mean of each cell
        heavy = vote > 0
        for v, cv, start, c in ((x, cells.cx, lat.x0, lat.sx), (y, cells.cy, lat.y0, lat.sy)):
            corner = cv * c + start                     # cell start; sums of v - corner are better conditioned
            local = v - corner[inv]
            pos = np.bincount(inv, w * local, minlength=k) / np.where(heavy, vote, 1.0)
            if not heavy.all():                         # all-zero weights: plain mean
                plain = np.bincount(inv, local, minlength=k) / count
                pos[~heavy] = plain[~heavy]
            kp.append(corner + np.clip(pos, 0.0, np.nextafter(c, 0.0)))
    kx, ky = kp
    ids = inv.astype(np.int32)

    if conf.max_kps is not None and k > conf.max_kps:
        kept = _top_cells(vote, count, conf.max_kps)
        remap = np.full(k, -1, np.int32)
        remap[kept] = np.arange(len(kept), dtype=np.int32)
        kx, ky, vote = kx[kept], ky[kept], vote[kept]
        ids = remap[inv]
        r = conf.radius
        if lat.exact:                                   # per dropped lattice point: all its observations alike
            lost = np.flatnonzero(remap < 0)
            best = cells.nearest_cell(kept, lost, lat.sx, lat.sy, r)
            if best is None:
                centres = np.stack([lat.ox + cells.cx[lost] * lat.sx, lat.oy + cells.cy[lost] * lat.sy], 1)
                best = _snap(np.stack([kx, ky], 1), centres, r)
            remap[lost] = best
            return np.stack([kx, ky], 1), vote, remap[inv]
        lost = np.flatnonzero(ids < 0)
        reach = int(np.ceil(r / min(lat.sx, lat.sy)))  # a keypoint within r lies at most this many cells away
        if cells.dense and reach <= _MAX_REACH:
            best, dist = cells.nearest(kept, kx, ky, lost, x[lost], y[lost], reach)
            ids[lost] = np.where(dist <= r, best, -1)
        else:
            ids[lost] = _snap(np.stack([kx, ky], 1), xy[lost], r)
    return np.stack([kx, ky], 1), vote, ids


def _unquantised(xy: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(xy)
    if n == 0:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0, np.int32)
    order = np.lexsort((xy[:, 0], xy[:, 1]))            # by y, then x
    s = xy[order]
    new = np.empty(n, bool)
    new[0] = True
    np.any(s[1:] != s[:-1], axis=1, out=new[1:])
    ids = np.empty(n, np.int32)
    ids[order] = np.cumsum(new) - 1
    kps = s[new].copy()
    return kps, np.bincount(ids, w, minlength=len(kps)), ids


def _fixed(points: np.ndarray, xy: np.ndarray, w: np.ndarray, radius: float
           ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = _snap(points, xy, radius)
    ok = ids >= 0
    return points.copy(), np.bincount(ids[ok], w[ok], minlength=len(points)), ids


def _image(name: str, refs: Sequence[Tuple[_Pair, int]], conf: KeypointConfig, fixed_pts: Mapping[str, np.ndarray],
           unq: Collection[str]) -> Tuple[ImageKeypoints, List[np.ndarray]]:
    """The keypoints of one image from its observations: side ``j`` of each merged pair of ``refs``, in the
    canonical order (pairs sorted by name), and the keypoint id (-1: none) of each ref's observations."""
    xy = np.concatenate([p.xy[j] for p, j in refs]) if refs else np.zeros((0, 2))  # type: ignore[index]
    w = np.maximum(np.concatenate([p.scores for p, _ in refs]).astype(np.float64), 0.0)  # type: ignore[misc]
    if name in fixed_pts:
        kps, votes, ids = _fixed(fixed_pts[name], xy, w, conf.radius)
    elif name in unq:
        kps, votes, ids = _unquantised(xy, w)
    else:
        grids = set().union(*(p.grids[j] for p, j in refs))  # type: ignore[index]
        kps, votes, ids = _quantised(xy, w, _lattice(grids, float(conf.cell_size)), conf, name)
    logger.debug("%s: %d observations -> %d keypoints (%d unassigned)", name, len(xy), len(kps), int((ids < 0).sum()))
    bounds = np.cumsum([len(p.scores) for p, _ in refs])  # type: ignore[arg-type]
    return ImageKeypoints(name, kps, votes.astype(np.float32)), np.split(ids, bounds[:-1])


# --------------------------------------------------------------------------------------------
# One-to-one matches
# --------------------------------------------------------------------------------------------

def _score_key(s: np.ndarray) -> np.ndarray:
    """uint64 keys in [0, 2**32) that sort like the float32 scores ``s`` (no NaN; -0.0 == 0.0)."""
    bits = (s + np.float32(0)).view(np.uint32).astype(np.uint64)
    return np.where(bits >> np.uint64(31), ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))


def _one_to_one(i0: np.ndarray, i1: np.ndarray, s: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy one-to-one matching by descending score, ties by (i0, i1); duplicates keep their best score.

    Returns the kept (i0, i1, score), in no particular order.
    """
    if len(s) == 0:
        return i0, i1, s
    n1 = int(i1.max()) + 1
    pairs, inv = np.unique(i0 * n1 + i1, return_inverse=True)     # distinct (i0, i1), sorted
    best = np.full(len(pairs), -np.inf, np.float32)
    np.maximum.at(best, inv, s)
    i0, i1, s = pairs // n1, pairs % n1, best
    # one argsort on (score descending, position in (i0, i1) order): a strict total order
    order = np.argsort(((np.uint64(0xFFFFFFFF) - _score_key(s)) << np.uint64(32))
                       | np.arange(len(s), dtype=np.uint64))
    # the rounds work on dense ranks of the ids of this pair: tables as small as the pair, not the image
    new0 = np.empty(len(i0), bool)                      # i0 is sorted
    new0[0] = True
    np.not_equal(i0[1:], i0[:-1], out=new0[1:])
    r0 = np.cumsum(new0) - 1
    u1, r1 = np.unique(i1, return_inverse=True)
    a, b, m = r0[order], r1[order], len(order)
    n0, n1 = int(r0[-1]) + 1, len(u1)
    used0, used1 = np.zeros(n0, bool), np.zeros(n1, bool)
    kept: List[np.ndarray] = []
    live = np.arange(m)
    for _ in range(_MAX_ROUNDS):
        if len(live) == 0:
            break
        la, lb = a[live], b[live]
        first0 = np.full(n0, m)
        np.minimum.at(first0, la, live)
        first1 = np.full(n1, m)
        np.minimum.at(first1, lb, live)
        won = live[(first0[la] == live) & (first1[lb] == live)]     # mutual best among what is left
        kept.append(won)
        used0[a[won]] = True
        used1[b[won]] = True
        live = live[~(used0[la] | used1[lb])]
    if len(live):                                       # long conflict chains: finish sequentially
        logger.debug("one-to-one: %d rows left after %d rounds", len(live), _MAX_ROUNDS)
        won_rows = []
        for r, x, y in zip(live.tolist(), a[live].tolist(), b[live].tolist()):
            if not (used0[x] or used1[y]):
                used0[x] = used1[y] = True
                won_rows.append(r)
        kept.append(np.asarray(won_rows, np.int64))
    rows = order[np.concatenate(kept)]
    return i0[rows], i1[rows], s[rows]


def _pair_matches(pair: _Pair) -> IndexMatches:
    ida, idb = pair.ids  # type: ignore[misc]
    ok = (ida >= 0) & (idb >= 0)
    ia, ib, s = _one_to_one(ida[ok].astype(np.int64), idb[ok].astype(np.int64), pair.scores[ok])  # type: ignore[index]
    names = (pair.a, pair.b)
    if pair.flipped:
        ia, ib, names = ib, ia, (pair.b, pair.a)
    o = np.argsort(ia)                                  # one-to-one: idx0 values are distinct
    return IndexMatches(names[0], names[1], np.stack([ia[o], ib[o]], 1), s[o])


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def consolidate(pair_matches: Iterable[PairMatches], conf: KeypointConfig = KeypointConfig(),
                fixed: Optional[Mapping[str, np.ndarray]] = None,
                unquantized: Collection[str] = ()) -> Tuple[Dict[str, ImageKeypoints], List[IndexMatches]]:
    """Turn raw per-pair matches into shared per-image keypoints and one-to-one index matches.

    Args:
        pair_matches: raw matches, consumed once; repeated or reversed pairs are merged.
        conf: cell size, keypoint cap, radius and score threshold.
        fixed: name -> (K, 2) existing keypoints that must not change; observations snap to them.
        unquantized: names whose every distinct raw position becomes a keypoint (e.g. a query).

    Returns:
        ``(keypoints, matches)``: one :class:`ImageKeypoints` per image named in a pair (sorted
        by name), and one :class:`IndexMatches` per distinct pair in first-seen order and
        orientation.
    """
    fixed_pts, unq = _check_inputs(fixed, unquantized)
    pairs = _collect(pair_matches, conf.min_score)
    sides: Dict[str, List[Tuple[_Pair, int]]] = {}
    for p in sorted(pairs, key=lambda p: (p.a, p.b)):   # canonical observation order per image
        sides.setdefault(p.a, []).append((p, 0))
        sides.setdefault(p.b, []).append((p, 1))

    done: Dict[int, int] = {}
    keypoints: Dict[str, ImageKeypoints] = {}
    for name in sorted(sides):
        refs = sides[name]
        keypoints[name], ids = _image(name, refs, conf, fixed_pts, unq)
        for (p, j), part in zip(refs, ids):
            p.ids[j] = part  # type: ignore[index]
            done[id(p)] = done.get(id(p), 0) + 1
            if done[id(p)] == 2:
                p.xy = None                              # coordinates no longer needed

    matches = [_pair_matches(p) for p in pairs]
    logger.info("consolidated %d pairs over %d images: %d keypoints, %d matches",
                len(matches), len(keypoints), sum(len(k) for k in keypoints.values()),
                sum(len(m) for m in matches))
    return keypoints, matches


# --------------------------------------------------------------------------------------------
# Out-of-core driver
# --------------------------------------------------------------------------------------------

Pair = Tuple[str, str]
#: ``read(positions)``: the raw matches of ``pairs[i]`` for each ``i`` of ``positions`` (any order, either orientation)
ReadPairs = Callable[[List[int]], Iterable[PairMatches]]


class _Scratch:
    """Append-only records in one file of the scratch folder, read back by offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "w+b")
        self.end = 0

    def reserve(self, nbytes: int) -> int:
        """Offset of ``nbytes`` new bytes at the end of the file (written later with :meth:`write`)."""
        offset, self.end = self.end, self.end + nbytes
        return offset

    def write(self, offset: int, array: np.ndarray) -> None:
        self._file.seek(offset)
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))

    def read(self, offset: int, dtype: type, count: int) -> np.ndarray:
        out = np.empty(count, dtype)
        self._file.seek(offset)
        if count and self._file.readinto(out.view(np.uint8)) != out.nbytes:
            raise RuntimeError(f"scratch file {self.path} is shorter than expected")
        return out

    def close(self) -> None:
        self._file.close()


class _DiskKeypoints(Mapping[str, ImageKeypoints]):
    """``{name: ImageKeypoints}`` read from the scratch file on access (names sorted)."""

    def __init__(self, file: _Scratch, index: Dict[str, Tuple[int, int]]) -> None:
        self._file, self._index = file, index

    def __getitem__(self, name: str) -> ImageKeypoints:
        offset, k = self._index[name]
        kps = self._file.read(offset, np.float64, 2 * k).reshape(k, 2)
        return ImageKeypoints(name, kps, self._file.read(offset + 16 * k, np.float32, k))

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def without(self, names: Collection[str]) -> "_DiskKeypoints":
        """The same keypoints less those of ``names``."""
        return _DiskKeypoints(self._file, {n: v for n, v in self._index.items() if n not in names})


class DiskConsolidation:
    """What :func:`consolidate_out_of_core` returns: its keypoints and matches, kept in files of a scratch
    folder and read back on demand, as often as needed, until :meth:`close` (or the end of a ``with`` block)
    deletes the folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._kps = _Scratch(folder / "keypoints.bin")
        self._matches = _Scratch(folder / "matches.bin")
        self._match_index: List[Tuple[str, str, int, int]] = []
        #: ``{name: ImageKeypoints}`` of every image named in a pair (sorted by name), read on access
        self.keypoints = _DiskKeypoints(self._kps, {})
        #: the images named in a pair that are fixed (their keypoints are the given ones)
        self.fixed: Set[str] = set()
        #: raw matches of each input pair as read (before filtering), in no particular order
        self.raw_counts: List[int] = []

    def _add_keypoints(self, kp: ImageKeypoints) -> None:
        k = len(kp)
        offset = self._kps.reserve(20 * k)
        self._kps.write(offset, kp.keypoints)
        self._kps.write(offset + 16 * k, kp.scores)
        self.keypoints._index[kp.name] = (offset, k)

    def _add_matches(self, m: IndexMatches) -> None:
        n = len(m)
        offset = self._matches.reserve(12 * n)
        self._matches.write(offset, m.matches.astype(np.int32))
        self._matches.write(offset + 8 * n, m.scores)
        self._match_index.append((m.name0, m.name1, offset, n))

    @property
    def match_counts(self) -> List[int]:
        """One-to-one matches per pair, in the order of :meth:`matches`."""
        return [n for *_, n in self._match_index]

    @property
    def num_keypoints(self) -> Dict[str, int]:
        return {name: k for name, (_, k) in self.keypoints._index.items()}

    def matches(self) -> Iterator[IndexMatches]:
        """One :class:`IndexMatches` per distinct pair, in first-seen order and orientation (read on demand)."""
        for name0, name1, offset, n in self._match_index:
            idx = self._matches.read(offset, np.int32, 2 * n).reshape(n, 2)
            yield IndexMatches(name0, name1, idx, self._matches.read(offset + 8 * n, np.float32, n))

    def close(self) -> None:
        """Delete the scratch folder."""
        self._kps.close()
        self._matches.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "DiskConsolidation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PairIndex:
    """The pair list as integer arrays: distinct unordered pairs (keys, sorted by names), their copies and the
    keys of each image, so that each image's pairs are found without a scan."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.names = sorted({n for p in pairs for n in p})
        number = {n: i for i, n in enumerate(self.names)}
        i0 = np.array([number[a] for a, _ in pairs], np.int64)
        i1 = np.array([number[b] for _, b in pairs], np.int64)
        self_pairs = np.flatnonzero(i0 == i1)
        if len(self_pairs):
            name = pairs[int(self_pairs[0])][0]
            raise ValueError(f"self-pair {name!r}/{name!r}")
        lo, hi = np.minimum(i0, i1), np.maximum(i0, i1)
        codes, first, inv = np.unique(lo * max(len(self.names), 1) + hi, return_index=True, return_inverse=True)
        self.a, self.b = lo[first], hi[first]           # key k: names (a, b), a < b; keys sorted by (a, b)
        self.flipped = i0[first] > i1[first]            # the orientation of the first copy
        self.first_seen = np.argsort(first)             # keys in the order they are first seen
        self.copies = np.argsort(inv, kind="stable")    # positions of the copies, grouped by key
        self.copy_start = np.searchsorted(inv[self.copies], np.arange(len(codes) + 1))
        sides = np.concatenate([self.a, self.b])
        keys = np.tile(np.arange(len(codes)), 2)
        order = np.lexsort((keys, sides))               # per image, its keys in (a, b) order
        self.image_keys, self.image_sides = keys[order], (order >= len(codes)).astype(np.int8)
        self.image_start = np.searchsorted(sides[order], np.arange(len(self.names) + 1))

    def __len__(self) -> int:
        return len(self.a)


def _read_pair(index: _PairIndex, key: int, read: ReadPairs, min_score: float, counts: Optional[List[int]]) -> _Pair:
    """The merged pair ``key`` from its copies, read anew."""
    a, b = index.names[index.a[key]], index.names[index.b[key]]
    positions = index.copies[index.copy_start[key]:index.copy_start[key + 1]].tolist()
    group: Dict[Tuple[str, str], _Pair] = {}
    for pm in read(positions):
        if {pm.name0, pm.name1} != {a, b}:
            raise ValueError(f"read {pm.name0!r}/{pm.name1!r} for the pair {a!r}/{b!r}")
        _add(group, pm, min_score)
        if counts is not None:
            counts.append(len(pm))
    pair = group.get((a, b))
    if pair is None or len(pair.parts) != len(positions):
        raise ValueError(f"pair {a!r}/{b!r}: {len(positions)} copies asked for, "
                         f"{0 if pair is None else len(pair.parts)} read")
    pair.flipped = bool(index.flipped[key])
    _merge_parts(pair)
    return pair


def consolidate_out_of_core(pairs: Sequence[Pair], read: ReadPairs, conf: KeypointConfig = KeypointConfig(),
                            fixed: Optional[Mapping[str, np.ndarray]] = None, unquantized: Collection[str] = (),
                            workdir: Optional[str | os.PathLike] = None, progress: bool = False) -> DiskConsolidation:
    """:func:`consolidate`, with memory bounded by the observations of one image (see the module docstring).

    Args:
        pairs: the pairs to consolidate (repeated or reversed pairs are merged, as by :func:`consolidate`).
        read: ``read(positions)`` yields the raw matches of ``pairs[i]`` for each ``i`` of ``positions``, in
            any order and either orientation (e.g. ``lambda ix: store.get_many([pairs[i] for i in ix])``);
            it is called twice for every pair, once for each of its images, and must give the same matches.
        conf, fixed, unquantized: as for :func:`consolidate`.
        workdir: the folder in which the scratch folder is made (default: the system's temporary folder).
        progress: show progress bars.

    Returns:
        A :class:`DiskConsolidation`: the same keypoints and matches as :func:`consolidate` of the pairs'
        matches in the order of ``pairs`` (bitwise), kept on disk until it is closed.
    """
    fixed_pts, unq = _check_inputs(fixed, unquantized)
    index = _PairIndex(pairs)
    result = DiskConsolidation(Path(tempfile.mkdtemp(prefix="consolidation-", dir=workdir)))
    try:
        ids_file = _Scratch(result.folder / "pairs.bin")    # per key: scores (f32), ids of a, ids of b (i32)
        try:
            base, rows = _images_pass(index, read, conf, fixed_pts, unq, result, ids_file, progress)
            _pairs_pass(index, ids_file, base, rows, result, progress)
        finally:
            ids_file.close()
            (result.folder / "pairs.bin").unlink()
    except BaseException:
        result.close()
        raise
    logger.info("consolidated %d pairs over %d images out of core: %d keypoints, %d matches", len(index),
                len(index.names), sum(result.num_keypoints.values()), sum(result.match_counts))
    return result


def _images_pass(index: _PairIndex, read: ReadPairs, conf: KeypointConfig, fixed_pts: Mapping[str, np.ndarray],
                 unq: Collection[str], result: DiskConsolidation, ids_file: _Scratch, progress: bool
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Pass 1, image by image (sorted by name): read its pairs, make its keypoints, store the ids of its side.
    Returns where the record of each key starts in ``ids_file`` and its number of rows."""
    base = np.zeros(len(index), np.int64)               # per key: where its record starts
    rows = np.full(len(index), -1, np.int64)             # per key: merged rows
    for i, name in enumerate(tqdm(index.names, desc="keypoints", unit="image", disable=not progress)):
        keys = index.image_keys[index.image_start[i]:index.image_start[i + 1]]
        sides = index.image_sides[index.image_start[i]:index.image_start[i + 1]]
        refs = []
        for key, side in zip(keys.tolist(), sides.tolist()):
            pair = _read_pair(index, key, read, conf.min_score, result.raw_counts if side == 0 else None)
            n = len(pair.scores)  # type: ignore[arg-type]
            if side == 0:                                # the first visit (a < b): the record of the pair
                base[key], rows[key] = ids_file.reserve(12 * n), n
                ids_file.write(int(base[key]), pair.scores)  # type: ignore[arg-type]
            elif rows[key] != n:
                raise RuntimeError(f"pair {pair.a!r}/{pair.b!r} read {rows[key]} then {n} matches")
            pair.xy[1 - side] = None                     # type: ignore[index]  # only this image's side is kept
            refs.append((pair, side))
        kp, ids = _image(name, refs, conf, fixed_pts, unq)
        result._add_keypoints(kp)
        if name in fixed_pts:
            result.fixed.add(name)
        for key, side, part in zip(keys.tolist(), sides.tolist(), ids):
            ids_file.write(int(base[key]) + 4 * int(rows[key]) * (1 + side), part)
    return base, rows


def _pairs_pass(index: _PairIndex, ids_file: _Scratch, base: np.ndarray, rows: np.ndarray, result: DiskConsolidation,
                progress: bool) -> None:
    """Pass 2, pair by pair (first-seen order): one-to-one matches from the stored scores and ids."""
    for key in tqdm(index.first_seen.tolist(), desc="matches", unit="pair", disable=not progress):
        at, n = int(base[key]), int(rows[key])
        pair = _Pair(index.names[index.a[key]], index.names[index.b[key]], bool(index.flipped[key]), [],
                     scores=ids_file.read(at, np.float32, n),
                     ids=[ids_file.read(at + 4 * n, np.int32, n), ids_file.read(at + 8 * n, np.int32, n)])
        result._add_matches(_pair_matches(pair))
