"""Tests of mast3r_colmap.keypoints: raw pair matches -> shared keypoints + one-to-one matches."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Dict, List, Tuple

import numpy as np
import pytest
from scipy.spatial import cKDTree

from mast3r_colmap.keypoints import KeypointConfig, consolidate
from mast3r_colmap.structures import ImageKeypoints, IndexMatches, PairMatches, SamplingGrid

log = logging.getLogger(__name__)


def pm(n0: str, n1: str, xy0, xy1, s) -> PairMatches:
    return PairMatches(n0, n1, np.reshape(np.asarray(xy0, float), (-1, 2)),
                       np.reshape(np.asarray(xy1, float), (-1, 2)), np.asarray(s, np.float32))


def by_pair(matches: List[IndexMatches]) -> Dict[Tuple[str, str], IndexMatches]:
    """Matches keyed by the name-sorted pair, columns oriented accordingly."""
    out = {}
    for m in matches:
        if m.name0 < m.name1:
            out[(m.name0, m.name1)] = (m.matches, m.scores)
        else:
            mm = m.matches[:, ::-1]
            o = np.lexsort((mm[:, 1], mm[:, 0]))
            out[(m.name1, m.name0)] = (mm[o], m.scores[o])
    return out


def assert_valid(kps: Dict[str, ImageKeypoints], matches: List[IndexMatches]) -> None:
    """dtype, shape, index range and one-to-one property of every output."""
    for name, k in kps.items():
        assert k.name == name
        assert k.keypoints.dtype == np.float64 and k.keypoints.ndim == 2 and k.keypoints.shape[1] == 2
        assert k.scores.dtype == np.float32 and k.scores.shape == (len(k.keypoints),)
    for m in matches:
        assert m.matches.dtype == np.int64 and m.matches.ndim == 2 and m.matches.shape[1] == 2
        assert m.scores.dtype == np.float32 and m.scores.shape == (len(m.matches),)
        if len(m):
            assert m.matches.min() >= 0
            assert m.matches[:, 0].max() < len(kps[m.name0]) and m.matches[:, 1].max() < len(kps[m.name1])
        assert len(np.unique(m.matches[:, 0])) == len(m), "idx0 repeated"
        assert len(np.unique(m.matches[:, 1])) == len(m), "idx1 repeated"


# ---------------------------------------------------------------------------------------------
# Hand-computed examples
# ---------------------------------------------------------------------------------------------

def test_hand_computed_example():
    pairs = [
        pm("A", "B",
           [[1, 1], [2, 1], [9, 5], [9.4, 5.2]],
           [[10, 10], [10.5, 10], [2, 2], [20, 2]],
           [1, 3, 2, 0.5]),
        pm("A", "C", [[1.5, 0.0]], [[7, 7]], [2]),
    ]
    kps, matches = consolidate(pairs, KeypointConfig(cell_size=4))
    assert_valid(kps, matches)
    assert list(kps) == ["A", "B", "C"]
    # A: cell (y0, x0) holds (1,1)w1, (2,1)w3, (1.5,0)w2; cell (y1, x2) holds (9,5)w2, (9.4,5.2)w0.5
    np.testing.assert_allclose(kps["A"].keypoints, [[10 / 6, 4 / 6], [9.08, 5.04]], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(kps["A"].scores, np.float32([6, 2.5]))
    # B: cells in (y, x) order: (0, 0) <- (2,2); (0, 5) <- (20,2); (2, 2) <- (10,10)w1, (10.5,10)w3
    np.testing.assert_allclose(kps["B"].keypoints, [[2, 2], [20, 2], [10.375, 10]], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(kps["B"].scores, np.float32([2, 0.5, 4]))
    np.testing.assert_array_equal(kps["C"].keypoints, [[7, 7]])
    assert [m.pair for m in matches] == [("A", "B"), ("A", "C")]
    # (A0,B2) twice (1, 3) -> best 3; (A1,B0) 2 beats (A1,B1) 0.5 for A1
    np.testing.assert_array_equal(matches[0].matches, [[0, 2], [1, 0]])
    np.testing.assert_array_equal(matches[0].scores, np.float32([3, 2]))
    np.testing.assert_array_equal(matches[1].matches, [[0, 0]])
    np.testing.assert_array_equal(matches[1].scores, np.float32([2]))


def test_cell_boundaries_follow_hloc_pixel_convention():
    # cell_size 4: cell 0 covers [-0.5, 3.5), cell 1 covers [3.5, 7.5)
    xs = np.array([-0.5, 3.4999, 3.5, 7.4999])
    p = pm("a", "b", np.stack([xs, np.zeros(4)], 1), np.arange(8.0).reshape(4, 2) * 10, np.ones(4))
    kps, _ = consolidate([p], KeypointConfig(cell_size=4, max_kps=None), unquantized={"b"})
    np.testing.assert_allclose(kps["a"].keypoints, [[1.49995, 0], [5.49995, 0]], atol=1e-12)


def test_zero_scores_give_plain_mean():
    p = pm("a", "b", [[0, 0], [2, 2]], [[0, 0], [40, 40]], [0, 0])
    kps, matches = consolidate([p], KeypointConfig(cell_size=4))
    np.testing.assert_array_equal(kps["a"].keypoints, [[1, 1]])
    np.testing.assert_array_equal(kps["a"].scores, [0])
    assert len(matches[0]) == 1


def test_greedy_one_to_one_keeps_second_choice():
    # a2-b1 (6) beats a1-b1 (5); a1 then takes its second choice b2 (3). hloc's two-step rule
    # (best per idx0, then best per idx1) would lose a1-b2.
    a = {"a1": [0, 0], "a2": [0, 10]}
    b = {"b1": [0, 0], "b2": [0, 10]}
    p = pm("A", "B", [a["a2"], a["a1"], a["a1"]], [b["b1"], b["b1"], b["b2"]], [6, 5, 3])
    kps, matches = consolidate([p], unquantized={"A", "B"})
    assert_valid(kps, matches)
    np.testing.assert_array_equal(kps["A"].keypoints, [a["a1"], a["a2"]])
    np.testing.assert_array_equal(matches[0].matches, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(matches[0].scores, np.float32([3, 6]))


def test_one_to_one_ties_are_deterministic():
    # four equal-score rows over 2x2 keypoints: (0,0) then (1,1) by the (idx0, idx1) tie-break
    p = pm("A", "B", [[0, 0], [0, 0], [0, 9], [0, 9]], [[0, 0], [0, 9], [0, 0], [0, 9]], [1, 1, 1, 1])
    _, matches = consolidate([p], unquantized={"A", "B"})
    np.testing.assert_array_equal(matches[0].matches, [[0, 0], [1, 1]])
    # the same in the reversed orientation
    _, matches = consolidate([p.swapped()], unquantized={"A", "B"})
    np.testing.assert_array_equal(matches[0].matches, [[0, 0], [1, 1]])


def greedy_reference(i0, i1, s):
    """Plain sequential greedy matching by (-score, i0, i1)."""
    used0, used1, out = set(), set(), []
    for r in sorted(range(len(s)), key=lambda r: (-float(s[r]), i0[r], i1[r])):
        if i0[r] not in used0 and i1[r] not in used1:
            used0.add(i0[r])
            used1.add(i1[r])
            out.append((i0[r], i1[r], np.float32(s[r])))
    return sorted(out)


@pytest.mark.parametrize("seed", range(5))
def test_one_to_one_equals_sequential_greedy(seed):
    rng = np.random.default_rng(seed)
    n = 400
    i0, i1 = rng.integers(0, 25, n), rng.integers(0, 30, n)
    s = rng.integers(1, 20, n).astype(np.float32)         # many ties and duplicates
    p = pm("A", "B", np.stack([0 * i0, i0], 1), np.stack([0 * i1, i1], 1), s)
    _, matches = consolidate([p], unquantized={"A", "B"})
    got = [(int(a), int(b), c) for (a, b), c in zip(matches[0].matches, matches[0].scores)]
    assert got == greedy_reference(i0.tolist(), i1.tolist(), s)


def test_long_conflict_chain_stays_one_to_one():
    # chain a_i-b_i (score high), a_{i+1}-b_i (slightly lower): needs many greedy rounds
    n = 200
    i = np.arange(n, dtype=float)
    xa = np.concatenate([i, i[1:]])
    xb = np.concatenate([i, i[:-1]])
    s = np.concatenate([1000 - 2 * i, 999 - 2 * i[:-1]])
    p = pm("A", "B", np.stack([xa, 0 * xa], 1), np.stack([xb, 0 * xb], 1), s)
    kps, matches = consolidate([p], unquantized={"A", "B"})
    assert_valid(kps, matches)
    np.testing.assert_array_equal(matches[0].matches, np.stack([np.arange(n)] * 2, 1))


# ---------------------------------------------------------------------------------------------
# Synthetic tracks
# ---------------------------------------------------------------------------------------------

CELL = 4.0


def make_scene(seed: int, n_images: int = 6, n_tracks: int = 300, n_outliers: int = 10,
               outlier_score: float = 0.2):
    """Tracks with a true position per image, away from cell borders; noisy per-pair observations.

    Pairs differ in "matching resolution": observations are rounded to a pair-specific grid
    (0.5, 1 or 1.5 px) plus noise, so raw coordinates of one track never coincide across pairs,
    but always stay within 1 px (< cell/4) of the truth.
    """
    rng = np.random.default_rng(seed)
    names = [f"img{i:02d}.jpg" for i in range(n_images)]
    grid = (150, 100)                                   # cells in x, y (a 600x400 image)
    true = {}
    for n in names:
        cells = rng.choice(grid[0] * grid[1], n_tracks, replace=False)
        cx, cy = cells % grid[0], cells // grid[0]
        centre = np.stack([cx, cy], 1) * CELL - 0.5 + CELL / 2
        true[n] = centre + rng.uniform(-0.5, 0.5, (n_tracks, 2))
    visible = rng.random((n_images, n_tracks)) < 0.7
    pairs = []
    for i, j in itertools.combinations(range(n_images), 2):
        t = np.flatnonzero(visible[i] & visible[j])
        step = [0.5, 1.0, 1.5][(i + j) % 3]
        obs = []
        for n in (names[i], names[j]):
            p = np.round(true[n][t] / step) * step + rng.uniform(-0.2, 0.2, (len(t), 2))
            obs.append(p)
        s = rng.uniform(1.0, 2.0, len(t))
        out = [rng.uniform(0, 400, (n_outliers, 2)) for _ in range(2)]
        xy0 = np.concatenate([obs[0], out[0]])
        xy1 = np.concatenate([obs[1], out[1]])
        s = np.concatenate([s, np.full(n_outliers, outlier_score)])
        o = rng.permutation(len(s))
        pairs.append(pm(names[i], names[j], xy0[o], xy1[o], s[o]))
    return names, true, visible, pairs


def track_ids(kps: ImageKeypoints, true_xy: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest keypoint of each true track position and its distance."""
    d, i = cKDTree(kps.keypoints).query(true_xy)
    return i, d


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_tracks_one_keypoint_per_track(seed):
    names, true, visible, pairs = make_scene(seed)
    # outliers (score 0.2) filtered out by min_score: exactly one keypoint per visible track
    kps, matches = consolidate(pairs, KeypointConfig(cell_size=CELL, min_score=0.5))
    assert_valid(kps, matches)
    assert sorted(kps) == names
    for k, n in enumerate(names):
        seen = visible[k] & visible[np.arange(len(names)) != k].any(0)   # in at least one pair
        assert len(kps[n]) == seen.sum()
        ids, _ = track_ids(kps[n], true[n][seen])
        assert len(np.unique(ids)) == seen.sum()
        # a weighted mean of observations that are all within 0.95 px per axis of the truth
        assert np.abs(kps[n].keypoints[ids] - true[n][seen]).max() <= 0.95 + 1e-9
    for m in matches:
        i, j = names.index(m.name0), names.index(m.name1)
        t = np.flatnonzero(visible[i] & visible[j])
        ids0, _ = track_ids(kps[m.name0], true[m.name0][t])
        ids1, _ = track_ids(kps[m.name1], true[m.name1][t])
        assert {tuple(r) for r in m.matches.tolist()} == set(zip(ids0.tolist(), ids1.tolist()))


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_tracks_with_outliers_consistent_ids(seed):
    names, true, visible, pairs = make_scene(seed, n_outliers=30)
    kps, matches = consolidate(pairs, KeypointConfig(cell_size=CELL))
    assert_valid(kps, matches)
    tid = {n: track_ids(kps[n], true[n])[0] for n in names}   # keypoint of each track per image
    for k, n in enumerate(names):
        seen = visible[k] & visible[np.arange(len(names)) != k].any(0)
        d = track_ids(kps[n], true[n][seen])[1]
        assert d.max() < CELL / 2                         # outliers may pull a mean, never out of its cell
    # for every pair, track t is matched to the keypoint of t in both images: the id of t in A
    # is therefore the same in (A, B) and (A, C)
    for m in matches:
        i, j = names.index(m.name0), names.index(m.name1)
        t = np.flatnonzero(visible[i] & visible[j])
        row_of = dict(zip(m.matches[:, 0].tolist(), m.matches[:, 1].tolist()))
        for tt in t:
            assert row_of.get(int(tid[m.name0][tt])) == int(tid[m.name1][tt]), (m.pair, tt)
        assert len(m) <= len(t) + 30                      # outliers add at most one match each


def test_order_orientation_and_duplicates_do_not_matter():
    names, true, visible, pairs = make_scene(3, n_outliers=40, outlier_score=1.5)
    conf = KeypointConfig(cell_size=CELL, max_kps=150)
    ref_k, ref_m = consolidate(pairs, conf)
    rng = np.random.default_rng(0)
    shuffled = [pairs[i] if rng.random() < 0.5 else pairs[i].swapped() for i in rng.permutation(len(pairs))]
    k2, m2 = consolidate(iter(shuffled), conf)          # also: a one-shot iterator is enough
    assert list(k2) == list(ref_k)
    for n in ref_k:
        np.testing.assert_array_equal(k2[n].keypoints, ref_k[n].keypoints)
        np.testing.assert_array_equal(k2[n].scores, ref_k[n].scores)
    assert [m.pair for m in m2] == [p.pair for p in shuffled]      # first-seen order and orientation
    a, b = by_pair(ref_m), by_pair(m2)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])
        np.testing.assert_array_equal(a[key][1], b[key][1])


def _snap_to(xy: np.ndarray, g: SamplingGrid) -> np.ndarray:
    o, st = np.array([g.ox, g.oy]), np.array([g.sx, g.sy])
    return np.round((xy - o) / st) * st + o


def _assert_same_output(a, b) -> None:
    (ka, ma), (kb, mb) = a, b
    assert list(ka) == list(kb)
    for n in ka:
        np.testing.assert_array_equal(ka[n].keypoints, kb[n].keypoints)
        np.testing.assert_array_equal(ka[n].scores, kb[n].scores)
    pa, pb = by_pair(ma), by_pair(mb)
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key][0], pb[key][0])
        np.testing.assert_array_equal(pa[key][1], pb[key][1])


@pytest.mark.parametrize("kind", ["grid", "mixed"])
@pytest.mark.parametrize("max_kps", [None, 150])
def test_order_orientation_and_duplicates_do_not_matter_on_grids(kind, max_kps):
    """The same with sampling grids (one lattice per image, steps that differ per axis and image; float32
    coordinates as from the match store), alone or mixed with grid-less pairs and with a second grid:
    permuted, reversed and repeated pairs give bitwise the same keypoints and matches."""
    names, true, visible, pairs = make_scene(4, n_outliers=40, outlier_score=1.5)
    grids = {n: SamplingGrid(0.3 + 0.1 * i, 0.2, 3.125, 2.5 + 0.25 * (i % 2)) for i, n in enumerate(names)}
    gp = []
    for k, p in enumerate(pairs):
        if kind == "mixed" and k % 3 == 0:
            gp.append(p)                                       # no grid
        elif kind == "mixed" and k % 3 == 1:                   # whole pixels (coarse-to-fine)
            gp.append(PairMatches(p.name0, p.name1, np.round(p.xy0), np.round(p.xy1), p.scores,
                                  SamplingGrid(0, 0, 1, 1), SamplingGrid(0, 0, 1, 1)))
        else:
            g0, g1 = grids[p.name0], grids[p.name1]
            gp.append(PairMatches(p.name0, p.name1, _snap_to(p.xy0, g0).astype(np.float32),
                                  _snap_to(p.xy1, g1).astype(np.float32), p.scores, g0, g1))
    conf = KeypointConfig(max_kps=max_kps)
    ref = consolidate(gp, conf)
    assert_valid(*ref)
    if kind == "grid":                                         # keypoints on the lattice points, exactly
        for n, k in ref[0].items():
            g = grids[n]
            np.testing.assert_array_equal(k.keypoints, np.round((k.keypoints - [g.ox, g.oy]) / [g.sx, g.sy])
                                          * [g.sx, g.sy] + [g.ox, g.oy])
            if max_kps is None:                                # one per distinct lattice point observed
                obs = np.concatenate([_snap_to(p.xy0 if p.name0 == n else p.xy1, g) for p in gp if n in p.pair])
                assert len(k) == len(np.unique(np.round(obs, 6), axis=0))
    rng = np.random.default_rng(0)
    shuffled = [gp[i] if rng.random() < 0.5 else gp[i].swapped() for i in rng.permutation(len(gp))]
    _assert_same_output(ref, consolidate(iter(shuffled), conf))
    twice = gp + [p.swapped() for p in gp[::2]]
    mixed_twice = [twice[i] if rng.random() < 0.5 else twice[i].swapped() for i in rng.permutation(len(twice))]
    a, b = consolidate(twice, conf), consolidate(mixed_twice, conf)
    _assert_same_output(a, b)


def test_repeated_pairs_are_merged():
    p = pm("A", "B", [[0, 0], [8, 0]], [[0, 0], [8, 0]], [1, 2])
    q = pm("B", "A", [[0.5, 0.5], [20, 20]], [[0.5, 0.5], [40, 40]], [3, 1])
    pooled = pm("A", "B", [[0, 0], [8, 0], [0.5, 0.5], [40, 40]], [[0, 0], [8, 0], [0.5, 0.5], [20, 20]],
                [1, 2, 3, 1])
    k1, m1 = consolidate([p, q])
    k2, m2 = consolidate([pooled])
    assert len(m1) == 1 and m1[0].pair == ("A", "B")
    for n in "AB":
        np.testing.assert_array_equal(k1[n].keypoints, k2[n].keypoints)
        np.testing.assert_array_equal(k1[n].scores, k2[n].scores)
    np.testing.assert_array_equal(m1[0].matches, m2[0].matches)
    np.testing.assert_array_equal(m1[0].scores, m2[0].scores)
    np.testing.assert_array_equal(m1[0].scores, np.float32([3, 2, 1]))
    _, m3 = consolidate([q, p])
    assert m3[0].pair == ("B", "A")
    a, b = by_pair(m1)[("A", "B")], by_pair(m3)[("A", "B")]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------
# max_kps
# ---------------------------------------------------------------------------------------------

def test_max_kps_hand_example():
    # A's cells: X (1,1) vote 5 [from (A,C)], Z (5,1) vote 1, Y (20,20) vote 3, W (40,40) vote 2.
    pairs = [pm("A", "B", [[5, 1], [20, 20], [40, 40]], [[100, 100], [200, 200], [300, 300]], [1, 3, 2]),
             pm("A", "C", [[1, 1]], [[50, 50]], [5])]
    kps, matches = consolidate(pairs, KeypointConfig(cell_size=4, max_kps=2), unquantized={"B", "C"})
    assert_valid(kps, matches)
    np.testing.assert_array_equal(kps["A"].keypoints, [[1, 1], [20, 20]])   # X, Y kept, in (y, x) order
    np.testing.assert_array_equal(kps["A"].scores, np.float32([5, 3]))      # votes not moved by re-assignment
    # Z's match is re-assigned to X (distance 4 <= max_error 4); W's is dropped (nothing within 4)
    np.testing.assert_array_equal(matches[0].matches, [[0, 0], [1, 1]])
    np.testing.assert_array_equal(matches[0].scores, np.float32([1, 3]))
    np.testing.assert_array_equal(matches[1].matches, [[0, 0]])
    # a smaller radius drops Z's match too
    _, m = consolidate(pairs, KeypointConfig(cell_size=4, max_kps=2, max_error=3.9), unquantized={"B", "C"})
    np.testing.assert_array_equal(m[0].matches, [[1, 1]])


def test_max_kps_ties_go_to_more_observations_then_to_the_top_left():
    # votes: (0,0) 2 from 2 obs, (0,8) 2 from 1 obs, (8,0) 2 from 1 obs -> keep (0,0), then (8,0) [row 0 first]
    p = pm("A", "B", [[0, 0], [1, 0], [0, 8], [8, 0]], [[0, 0], [0, 10], [0, 20], [0, 30]], [1, 1, 2, 2])
    kps, _ = consolidate([p], KeypointConfig(cell_size=4, max_kps=2, max_error=0), unquantized={"B"})
    np.testing.assert_array_equal(kps["A"].keypoints, [[0.5, 0], [8, 0]])


def test_max_kps_keeps_top_cells_and_reassigns():
    names, true, visible, pairs = make_scene(5, n_tracks=400, n_outliers=0)
    full_k, _ = consolidate(pairs, KeypointConfig(cell_size=CELL, max_kps=None))
    cap = 100
    k, matches = consolidate(pairs, KeypointConfig(cell_size=CELL, max_kps=cap))
    assert_valid(k, matches)
    for n in names:
        assert len(full_k[n]) > cap and len(k[n]) == cap
        order = np.argsort(-full_k[n].scores.astype(np.float64), kind="stable")
        # the kept keypoints are exactly the uncapped ones with the highest votes
        thr = full_k[n].scores[order[cap - 1]]
        top = full_k[n].scores > thr
        kept = {tuple(r) for r in k[n].keypoints.tolist()}
        assert {tuple(r) for r in full_k[n].keypoints[top].tolist()} <= kept
        assert kept <= {tuple(r) for r in full_k[n].keypoints[full_k[n].scores >= thr].tolist()}
        sel = np.array([tuple(r) in kept for r in full_k[n].keypoints.tolist()])
        np.testing.assert_array_equal(k[n].keypoints, full_k[n].keypoints[sel])   # same (y, x) order
        np.testing.assert_array_equal(k[n].scores, full_k[n].scores[sel])


def test_max_kps_reassigns_to_nearest_kept_keypoint():
    # A: a heavy cell at (1, 1), a light cell at (5, 1) [4 px away] and one at (13, 1) [12 px away]
    # partner keypoints are distinct (unquantised), so re-assigned matches only conflict on A's side
    p1 = pm("A", "B", [[1, 1]] * 3, [[0, 0], [0, 1], [0, 2]], [5, 5, 5])
    p2 = pm("A", "C", [[5, 1], [13, 1]], [[0, 0], [0, 1]], [1, 1])
    kps, m = consolidate([p1, p2], KeypointConfig(cell_size=4, max_kps=1), unquantized={"B", "C"})
    np.testing.assert_array_equal(kps["A"].keypoints, [[1, 1]])
    np.testing.assert_array_equal(m[1].matches, [[0, 0]])     # (5,1) -> kept keypoint; (13,1) dropped


@pytest.mark.parametrize("grid", [None, SamplingGrid(0.3, 0.7, 3.125, 2.5)])
@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("radius", [0.0, 2.0, 4.0, 6.0, 10.0])
def test_reassignment_equals_brute_force(radius, far, grid):
    """Every observation: its own cell's keypoint if kept, else the nearest kept keypoint within
    the radius (brute force). Covers the cell-table gather (reach 0..2), the cKDTree fallback
    (reach 3) and, with a far-flung observation, the sorted (non-table) cell grouping; in 4-px cells
    (weighted means) and on a sampling grid (lattice points, 2.5 px apart in y: reach up to 4)."""
    from mast3r_colmap.keypoints import _lattice, _quantised

    rng = np.random.default_rng(11)
    xy = rng.uniform(0, 60, (3000, 2))
    if far:
        xy = np.vstack([xy, [[1e9, -1e9]]])
    if grid is not None:                                # observations on lattice points
        xy = np.round((xy - [grid.ox, grid.oy]) / [grid.sx, grid.sy]) * [grid.sx, grid.sy] + [grid.ox, grid.oy]
    w = rng.uniform(0.1, 1.0, len(xy))
    lattice = _lattice({grid}, 4.0)
    full_kps, full_votes, full_ids = _quantised(xy, w, lattice, KeypointConfig(cell_size=4, max_kps=None), "A")
    kps, votes, ids = _quantised(xy, w, lattice, KeypointConfig(cell_size=4, max_kps=40, max_error=radius), "A")
    assert len(kps) == 40
    kept = np.flatnonzero([any(np.array_equal(k, f) for k in kps) for f in full_kps])
    np.testing.assert_array_equal(full_kps[kept], kps)
    np.testing.assert_array_equal(full_votes[kept], votes)
    assert np.sort(full_votes)[-40] <= votes.min()
    own = np.full(len(full_kps), -1)
    own[kept] = np.arange(40)
    if grid is None:
        d = np.linalg.norm(xy[:, None] - kps[None], axis=2)
    else:                     # between lattice points, from whole offsets: symmetric neighbours tie exactly
        step, origin = np.array([grid.sx, grid.sy]), np.array([grid.ox, grid.oy])
        cells = np.round((xy - origin) / step).astype(np.int64)
        kcells = np.round((kps - origin) / step).astype(np.int64)
        d = np.sqrt(((((kcells[None] - cells[:, None]) * step) ** 2).sum(2)))
    nearest = np.where(d.min(1) <= radius, d.argmin(1), -1)   # argmin: the lowest id of equal distances
    expected = np.where(own[full_ids] >= 0, own[full_ids], nearest)
    if grid is not None and far:                        # the cKDTree fallback: any of the nearest
        lost = own[full_ids] < 0
        np.testing.assert_array_equal(ids >= 0, expected >= 0)
        np.testing.assert_array_equal(ids[~lost], expected[~lost])
        rows = np.flatnonzero(lost & (ids >= 0))
        np.testing.assert_allclose(d[rows, ids[rows]], d[rows].min(1), rtol=1e-12)
    else:
        np.testing.assert_array_equal(ids, expected)
    nearest_other = 2.5 if grid is not None else 0.0    # no re-assignment below the lattice step
    assert (ids >= 0).sum() > (own[full_ids] >= 0).sum() or radius < nearest_other or radius == 0


# ---------------------------------------------------------------------------------------------
# fixed and unquantised images
# ---------------------------------------------------------------------------------------------

def test_fixed_keypoints_unchanged_and_radius_respected():
    ref = np.array([[10, 10], [50.25, 50], [30, 30]], np.float32)
    ref_copy = ref.copy()
    p = pm("q", "db", [[0, 0], [8, 8], [16, 16], [24, 24]],
           [[11, 10], [30, 33], [50.25, 54.5], [30, 33.0001]], [1, 2, 3, 4])
    kps, m = consolidate([p], KeypointConfig(cell_size=4, max_error=3), fixed={"db": ref})
    assert_valid(kps, m)
    assert np.array_equal(kps["db"].keypoints, ref) and np.array_equal(ref, ref_copy)
    assert kps["db"].keypoints is not ref
    np.testing.assert_array_equal(kps["db"].scores, np.float32([1, 0, 2]))  # the 3.0001 one is dropped
    # (11,10) -> 0 at distance 1; (30,33) -> 2 at exactly max_error (inclusive); (50.25,54.5) too far
    np.testing.assert_array_equal(m[0].matches, [[0, 0], [1, 2]])
    np.testing.assert_array_equal(m[0].scores, np.float32([1, 2]))
    # a fixed image named in no pair is not returned; max_error 0 needs exact positions
    kps, m = consolidate([p], KeypointConfig(max_error=0), fixed={"db": ref, "other": ref})
    assert "other" not in kps
    assert len(m[0]) == 0
    kps, m = consolidate([pm("q", "db", [[0, 0]], [[50.25, 50]], [1])], KeypointConfig(max_error=0),
                         fixed={"db": ref})
    np.testing.assert_array_equal(m[0].matches, [[0, 1]])


def test_fixed_with_no_keypoints_and_localisation_setup():
    rng = np.random.default_rng(4)
    db = rng.uniform(0, 500, (50, 2))
    q_xy = rng.uniform(0, 500, (50, 2)) + rng.random((50, 2)) * 1e-3
    pairs = [pm("query", "db1", q_xy[:30], db[:30] + 0.3, rng.uniform(1, 2, 30)),
             pm("query", "db2", q_xy[20:], db[20:] - 0.3, rng.uniform(1, 2, 30))]
    kps, m = consolidate(pairs, KeypointConfig(max_kps=None, max_error=1.0),
                         fixed={"db1": db, "db2": db, "db3": np.zeros((0, 2))}, unquantized={"query"})
    assert_valid(kps, m)
    assert len(kps["query"]) == 50                       # overlap rows 20..29 share keypoints
    assert np.array_equal(kps["db1"].keypoints, db) and np.array_equal(kps["db2"].keypoints, db)
    q_ids = {tuple(r): i for i, r in enumerate(kps["query"].keypoints.tolist())}
    for mm, sl in zip(m, [slice(0, 30), slice(20, 50)]):
        exp = sorted((q_ids[tuple(r)], i) for r, i in zip(q_xy[sl].tolist(), range(50)[sl]))
        assert mm.matches.tolist() == [list(e) for e in exp]
    kps, m = consolidate([pm("q", "db3", [[0, 0]], [[0, 0]], [1])], fixed={"db3": np.zeros((0, 2))})
    assert len(kps["db3"]) == 0 and len(m[0]) == 0


def test_unquantized_coordinates_preserved_exactly():
    rng = np.random.default_rng(7)
    xy = rng.uniform(-0.5, 1000, (500, 2)) + np.pi * 1e-7
    pairs = [pm("q", "a", xy[:300], rng.uniform(0, 100, (300, 2)), np.ones(300)),
             pm("b", "q", rng.uniform(0, 100, (300, 2)), xy[200:], np.full(300, 2.0))]
    kps, m = consolidate(pairs, KeypointConfig(max_kps=10), unquantized={"q"})
    assert_valid(kps, m)
    q = kps["q"].keypoints
    assert len(q) == 500                                   # no cap for unquantised images
    assert {tuple(r) for r in q.tolist()} == {tuple(r) for r in xy.tolist()}   # bit-exact floats
    assert np.all(np.diff(q[:, 1]) >= 0)                   # (y, x) order
    ids = {tuple(r): i for i, r in enumerate(q.tolist())}
    shared = [ids[tuple(r)] for r in xy[200:300].tolist()]
    np.testing.assert_array_equal(kps["q"].scores[shared], np.float32(3))     # 1 + 2: one id, two pairs
    assert len(kps["a"]) <= 10 and len(kps["b"]) <= 10


# ---------------------------------------------------------------------------------------------
# Edge cases and validation
# ---------------------------------------------------------------------------------------------

def test_empty_inputs():
    assert consolidate([]) == ({}, [])
    empty = pm("a", "b", np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0))
    kps, m = consolidate([empty, pm("b", "c", [[1, 1]], [[2, 2]], [1])])
    assert_valid(kps, m)
    assert sorted(kps) == ["a", "b", "c"] and len(kps["a"]) == 0 and len(kps["b"]) == 1
    assert kps["a"].keypoints.shape == (0, 2) and kps["a"].scores.shape == (0,)
    assert m[0].matches.shape == (0, 2) and m[0].scores.shape == (0,)
    np.testing.assert_array_equal(m[1].matches, [[0, 0]])
    kps, m = consolidate([empty], unquantized={"a"}, fixed={"b": np.zeros((3, 2))})
    assert len(kps["a"]) == 0 and len(kps["b"]) == 3 and len(m[0]) == 0


def test_filtering_min_score_and_non_finite():
    p = pm("a", "b", [[0, 0], [10, 10], [20, 20], [np.nan, 5]], [[0, 0], [10, 10], [20, 20], [5, 5]],
           [0.5, np.nan, 2, 3])
    kps, m = consolidate([p], KeypointConfig(min_score=1.0))
    np.testing.assert_array_equal(kps["a"].keypoints, [[20, 20]])
    np.testing.assert_array_equal(m[0].scores, np.float32([2]))
    kps, _ = consolidate([p])
    assert len(kps["a"]) == 2


def test_validation_errors():
    with pytest.raises(ValueError):
        KeypointConfig(cell_size=0)
    with pytest.raises(ValueError):
        KeypointConfig(max_kps=0)
    with pytest.raises(ValueError):
        KeypointConfig(max_error=-1)
    with pytest.raises(ValueError):
        consolidate([pm("a", "a", [[0, 0]], [[0, 0]], [1])])
    with pytest.raises(ValueError):
        consolidate([], fixed={"a": np.zeros((2, 2))}, unquantized=["a"])
    with pytest.raises(ValueError):
        consolidate([], fixed={"a": np.zeros((2, 3))})
    assert KeypointConfig().radius == 4.0 and KeypointConfig(max_error=2).radius == 2.0


# ---------------------------------------------------------------------------------------------
# Scale
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_scale_200_images_5_pairs_20k_matches():
    rng = np.random.default_rng(0)
    n_img, n = 200, 20_000
    names = [f"{i:04d}.jpg" for i in range(n_img)]
    links = [(i, (i + k) % n_img) for i in range(n_img) for k in (1, 2)] + [(i, i + 100) for i in range(100)]
    pairs = [pm(names[i], names[j], rng.uniform(0, [1600, 1200], (n, 2)), rng.uniform(0, [1600, 1200], (n, 2)),
                rng.uniform(1, 10, n)) for i, j in links]
    t = time.perf_counter()
    kps, matches = consolidate(pairs, KeypointConfig(cell_size=4, max_kps=8192))
    dt = time.perf_counter() - t
    n_kp = sum(len(k) for k in kps.values())
    n_m = sum(len(m) for m in matches)
    print(f"\nconsolidate: {len(pairs)} pairs x {n} matches, {n_img} images: {dt:.2f} s, "
          f"{n_kp} keypoints, {n_m} matches")
    log.info("scale test: %.2f s", dt)
    assert len(kps) == n_img and len(matches) == len(links)
    assert all(len(k) == 8192 for k in kps.values())
    assert_valid(kps, matches[:20])
