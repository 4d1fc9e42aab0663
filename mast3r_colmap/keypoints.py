"""Per-pair raw matches -> per-image shared keypoints and one-to-one index matches.

Dense matchers return, for every pair, float correspondences in original-image pixels
(:class:`~mast3r_colmap.structures.PairMatches`). COLMAP and hloc instead want, per image, one
list of keypoints that every pair of that image indexes into. :func:`consolidate` builds those
lists. It works on full-resolution float coordinates only, so it makes no assumption about the
resolution or crop at which a pair was matched: pairs matched at different scales or by
coarse-to-fine tiles share keypoints all the same.

Each image is handled in one of three modes.

**Quantised** (the default). Every raw observation of the image, from any pair and on either
side, falls into a square cell of ``cell_size`` full-resolution pixels. Cell ``(i, j)`` covers
``x in [j*c - 0.5, (j+1)*c - 0.5)`` and ``y in [i*c - 0.5, (i+1)*c - 0.5)``, so with the hloc
convention (pixel centres at integers) cells are aligned with pixel blocks. One cell becomes one
keypoint:

* Its **position** is the score-weighted mean of the observations in the cell. Weights are the
  match scores clipped at 0; a cell whose weights sum to 0 uses the plain mean. The mean gives
  sub-cell accuracy. hloc's most-voted sub-position instead snaps keypoints to a
  ``max_error`` grid. The mean always lies inside its cell.
* Its **score** is the vote: the sum of the clipped scores of its observations.
* With ``max_kps``, only the ``max_kps`` cells with the highest votes are kept. Ties go to the
  cell with more observations, then to the one first in (y, x) order. Observations in a
  dropped cell are re-assigned to the nearest kept keypoint within ``max_error`` (inclusive;
  ties go to the lower id). If none is that close, they are dropped. Kept keypoints keep their
  position and score: the re-assigned observations do not move them.
* Limitation (shared with hloc): the observations of one scene point that straddle a cell
  border become two keypoints a few pixels apart, and different pairs may use either one.

**Fixed** (``fixed[name]``: existing keypoints, e.g. from a database or a reference map). The
keypoints are returned unchanged, in the same order. Each observation snaps to the nearest
existing keypoint within ``max_error`` (a ``cKDTree`` query; the bound is inclusive). If none is
that close, the observation is dropped. Scores are the votes of the snapped observations (0
for keypoints that got none).

**Unquantised** (``unquantized``, e.g. a localisation query). Every distinct raw position
becomes its own keypoint, with its coordinates exactly as given. Identical coordinates share
one id. ``max_kps`` does not apply. This is hloc's localisation special case; to reproduce it,
use ``KeypointConfig(max_kps=None)``, ``fixed=<db keypoints>`` and ``unquantized={query}``.

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
merged: the raw matches of all its copies are pooled (so they vote once each) and one
:class:`IndexMatches` is returned, oriented like the copy seen first. The output list follows
the order in which pairs are first seen. Self-pairs (``name0 == name1``) raise ``ValueError``.

**Filtering.** Raw matches with a non-finite coordinate or score, or with a score below
``min_score``, are dropped before voting. Images that appear only in empty pairs still get an
(empty) entry. The output dict has one entry per image named in a pair (sorted by name).
Fixed images named in no pair are not returned.

**Cost.** Everything is vectorised numpy/scipy work per image and per pair; there is no Python
loop over matches. Cells are grouped with a ``bincount`` over a dense cell table of the image.
The same table serves the re-assignment as a neighbour gather (3x3 cells when
``max_error <= cell_size``). A sort and a ``cKDTree`` are the fallbacks for far-flung
coordinates or large radii. All pairs must be seen before any image is final, so the filtered
raw matches are held once; arrays are shared, not copied, when nothing is filtered. Each image
then concatenates its observations, which is transient. Each pair also keeps one int32 id per
side and match. A pair's coordinates are released as soon as both of its images are done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Collection, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
from scipy.spatial import cKDTree

from .structures import ImageKeypoints, IndexMatches, PairMatches

__all__ = ["KeypointConfig", "consolidate"]

logger = logging.getLogger(__name__)

_MAX_ROUNDS = 32          # vectorised mutual-best rounds before the sequential finish
_CELL_LIMIT = float(2 ** 52)  # cell coordinates are clipped here before the int64 cast
_DENSE_MIN = 1 << 16      # a dense cell table up to this size (or 8 entries per observation) is fine
_MAX_REACH = 2            # re-assignment scans (2 * reach + 1)**2 cells at most, else uses a cKDTree


@dataclass(frozen=True)
class KeypointConfig:
    """How raw matches become keypoints (see the module docstring)."""

    cell_size: float = 4.0          # px at full resolution; the observations in one cell become one keypoint
    max_kps: Optional[int] = 8192   # cap per quantised image (top cells by vote), then re-assign
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


@dataclass
class _Pair:
    """One unordered pair; the arrays are in name-sorted orientation (a < b)."""

    a: str
    b: str
    flipped: bool                      # first-seen orientation was (b, a)
    parts: List[Tuple[np.ndarray, np.ndarray, np.ndarray]]
    xy: Optional[List[np.ndarray]] = None   # [xy_a, xy_b] after merging; freed when both images are done
    scores: Optional[np.ndarray] = None
    ids: Optional[List[Optional[np.ndarray]]] = None


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
    parts = [p for p in pair.parts if len(p[2])] or pair.parts[:1]
    if len(parts) == 1:
        xa, xb, s = parts[0]
    else:
        xa = np.concatenate([p[0] for p in parts])
        xb = np.concatenate([p[1] for p in parts])
        s = np.concatenate([p[2] for p in parts])
        order = np.lexsort((s, xb[:, 1], xb[:, 0], xa[:, 1], xa[:, 0]))
        xa, xb, s = xa[order], xb[order], s[order]
    pair.xy, pair.scores, pair.parts = [xa, xb], s, []
    pair.ids = [None, None]


def _collect(pair_matches: Iterable[PairMatches], min_score: float) -> List[_Pair]:
    """Group the input by unordered pair, in first-seen order."""
    pairs: Dict[Tuple[str, str], _Pair] = {}
    for pm in pair_matches:
        if pm.name0 == pm.name1:
            raise ValueError(f"self-pair {pm.name0!r}/{pm.name1!r}")
        xy0, xy1, s = _filtered(pm, min_score)
        flip = pm.name0 > pm.name1
        key = (pm.name1, pm.name0) if flip else (pm.name0, pm.name1)
        if key not in pairs:
            pairs[key] = _Pair(key[0], key[1], flip, [])
        pairs[key].parts.append((xy1, xy0, s) if flip else (xy0, xy1, s))
    out = list(pairs.values())
    for p in out:
        _merge_parts(p)
    return out


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
            self.occupied = np.flatnonzero(np.bincount(self.flat, minlength=self.nx * self.ny))
            rank = np.full(self.nx * self.ny, -1, np.int64)
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


def _top_cells(vote: np.ndarray, count: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of the ``n`` cells with the highest vote (ties: more observations, then lower index)."""
    thr = np.partition(vote, len(vote) - n)[len(vote) - n]   # the n-th highest vote
    keep = vote > thr
    tie = np.flatnonzero(vote == thr)
    keep[tie[np.lexsort((tie, -count[tie]))][: n - int(keep.sum())]] = True
    return np.flatnonzero(keep)


def _cell_index(v: np.ndarray, c: float) -> np.ndarray:
    """Cell of each coordinate: cell k covers [k*c - 0.5, (k+1)*c - 0.5)."""
    return np.clip(np.floor((v + 0.5) / c), -_CELL_LIMIT, _CELL_LIMIT).astype(np.int64)


def _quantised(xy: np.ndarray, w: np.ndarray, conf: KeypointConfig
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = float(conf.cell_size)
    if len(xy) == 0:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0, np.int32)
    x, y = np.ascontiguousarray(xy[:, 0]), np.ascontiguousarray(xy[:, 1])
    cells = _Cells(_cell_index(x, c), _cell_index(y, c))
    inv, k = cells.inv, len(cells)
    vote = np.bincount(inv, w, minlength=k)
    count = np.bincount(inv, minlength=k)
    heavy = vote > 0
    kp = []
    for v, cv in ((x, cells.cx), (y, cells.cy)):
        corner = cv * c - 0.5                           # cell start; sums of v - corner are better conditioned
        local = v - corner[inv]
        pos = np.bincount(inv, w * local, minlength=k) / np.where(heavy, vote, 1.0)
        if not heavy.all():                             # all-zero weights: plain mean
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
        lost = np.flatnonzero(ids < 0)
        r = conf.radius
        reach = int(np.ceil(r / c))                     # a keypoint within r lies at most this many cells away
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
    a, b, m = i0[order], i1[order], len(order)
    n0 = int(a.max()) + 1
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

    pairs = _collect(pair_matches, conf.min_score)
    sides: Dict[str, List[Tuple[_Pair, int]]] = {}
    for p in sorted(pairs, key=lambda p: (p.a, p.b)):   # canonical observation order per image
        sides.setdefault(p.a, []).append((p, 0))
        sides.setdefault(p.b, []).append((p, 1))

    done: Dict[int, int] = {}
    keypoints: Dict[str, ImageKeypoints] = {}
    for name in sorted(sides):
        refs = sides[name]
        xy = np.concatenate([p.xy[j] for p, j in refs]) if refs else np.zeros((0, 2))  # type: ignore[index]
        w = np.maximum(np.concatenate([p.scores for p, _ in refs]).astype(np.float64), 0.0)  # type: ignore[misc]
        if name in fixed_pts:
            kps, votes, ids = _fixed(fixed_pts[name], xy, w, conf.radius)
        elif name in unq:
            kps, votes, ids = _unquantised(xy, w)
        else:
            kps, votes, ids = _quantised(xy, w, conf)
        keypoints[name] = ImageKeypoints(name, kps, votes.astype(np.float32))
        start = 0
        for p, j in refs:
            n = len(p.scores)  # type: ignore[arg-type]
            p.ids[j] = ids[start:start + n]  # type: ignore[index]
            start += n
            done[id(p)] = done.get(id(p), 0) + 1
            if done[id(p)] == 2:
                p.xy = None                              # coordinates no longer needed
        logger.debug("%s: %d observations -> %d keypoints (%d unassigned)",
                     name, len(xy), len(kps), int((ids < 0).sum()))

    matches = [_pair_matches(p) for p in pairs]
    logger.info("consolidated %d pairs over %d images: %d keypoints, %d matches",
                len(matches), len(keypoints), sum(len(k) for k in keypoints.values()),
                sum(len(m) for m in matches))
    return keypoints, matches
