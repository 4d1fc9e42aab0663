"""Sampling grids: matches that know the lattice they were sampled on become keypoints exactly on it.

A single pass puts every match on a network pixel, so the keypoints of an image are its observed network
pixels at their full-resolution centres, shared by all its pairs; coarse-to-fine matches stay on whole
full-resolution pixels; mixed sources fall back to cells of the finest grid. The grids travel through the
match store, and the rows of a store written before grids were kept are matched again.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mast3r_colmap.images import load_image
from mast3r_colmap.keypoints import KeypointConfig, consolidate
from mast3r_colmap.matching.matcher import Matcher, get_config
from mast3r_colmap.store import MatchStore
from mast3r_colmap.structures import PairMatches, SamplingGrid
from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene

NO_CAP = KeypointConfig(max_kps=None)


def _save(arr: np.ndarray, path: Path, orientation: int = 1) -> None:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif)


def _network_pixels(li, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random integer network pixels (x, y) of a loaded image, with repeats."""
    W, H = li.network_size
    return np.stack([rng.integers(0, W, n), rng.integers(0, H, n)], 1).astype(np.float64)


def _sorted_yx(xy: np.ndarray) -> np.ndarray:
    return xy[np.lexsort((xy[:, 0], xy[:, 1]))]


# ------------------------------------------------------------------------------------------------
# The grid of a loaded image
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
def test_network_grid_holds_every_network_pixel(tmp_path: Path, orientation: int) -> None:
    """``SamplingGrid.from_map(to_original)`` is the lattice of the network pixels in the stored frame, for
    every EXIF orientation (swapped and flipped axes): positive steps, 0 <= origin < step, and its x and y
    values are exactly the distinct stored x and y of the network pixels."""
    upright = np.random.default_rng(0).integers(0, 256, (167, 251, 3), dtype=np.uint8)  # (H, W) upright
    stored = np.ascontiguousarray(np.rot90(upright) if orientation >= 5 else upright)   # any content will do
    _save(stored, tmp_path / "im.png", orientation)
    li = load_image(tmp_path / "im.png", size=64)
    g = SamplingGrid.from_map(li.to_original)
    W, H = li.network_size
    xy = li.to_original(np.stack(np.meshgrid(np.arange(W), np.arange(H)), -1).reshape(-1, 2).astype(float))
    xs, ys = np.unique(xy[:, 0]), np.unique(xy[:, 1])
    (ws, hs) = li.original_size
    assert (ws, hs) == ((167, 251) if orientation >= 5 else (251, 167))
    # the stored x axis is upright x (network width W) or, when swapped, upright y (network height H)
    assert len(xs) == (H if orientation >= 5 else W) and len(ys) == (W if orientation >= 5 else H)
    np.testing.assert_allclose([g.sx, g.sy], [np.diff(xs).mean(), np.diff(ys).mean()], rtol=1e-12)
    np.testing.assert_allclose(np.diff(xs), g.sx, rtol=1e-9)
    np.testing.assert_allclose(np.diff(ys), g.sy, rtol=1e-9)
    assert 0 <= g.ox < g.sx and 0 <= g.oy < g.sy
    np.testing.assert_allclose([(xs[0] - g.ox) / g.sx, (ys[0] - g.oy) / g.sy],
                               np.round([(xs[0] - g.ox) / g.sx, (ys[0] - g.oy) / g.sy]), atol=1e-9)
    assert g.sx != g.sy                                   # 251x167 at 64 px: the two axes differ


def test_sampling_grid_values() -> None:
    with pytest.raises(ValueError, match="positive"):
        SamplingGrid(0, 0, 0, 1)
    with pytest.raises(ValueError, match="finite"):
        SamplingGrid(np.nan, 0, 1, 1)
    with pytest.raises(ValueError, match="axis-aligned"):
        SamplingGrid.from_map(lambda xy: xy @ np.array([[1.0, 1.0], [-1.0, 1.0]]))
    # flipped and swapped axes: steps positive, origin reduced into [0, step)
    g = SamplingGrid.from_map(lambda xy: np.stack([99 - 2 * xy[:, 1], 10.5 + 3 * xy[:, 0]], 1))
    assert g == SamplingGrid(1.0, 1.5, 2.0, 3.0)
    assert g.same_lattice(SamplingGrid(5.0, 1.5 - 3e4, 2.0, 3.0)) and g.same_lattice(SamplingGrid(1 + 1e-12, 4.5, 2, 3))
    assert not g.same_lattice(SamplingGrid(1.5, 1.5, 2.0, 3.0)) and not g.same_lattice(SamplingGrid(1, 1.5, 2.0, 3.1))
    pm = PairMatches("a", "b", [[1, 1.5]], [[0, 0]], [1], g, None)
    assert pm.swapped().grid0 is None and pm.swapped().grid1 == g
    assert PairMatches("a", "b", [[1, 1]], [[0, 0]], [1]).grid0 is None       # positional callers unchanged
    with pytest.raises(ValueError, match="grid1"):
        PairMatches("a", "b", [[1, 1]], [[0, 0]], [1], None, (0, 0, 1, 1))


# ------------------------------------------------------------------------------------------------
# Consolidation on grids
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_single_pass_pairs_share_keypoints_at_network_pixel_centres(tmp_path: Path, orientation: int) -> None:
    """Two single-pass pairs of image A (EXIF-tagged or not): A's keypoints are exactly its distinct observed
    network pixels mapped to the stored frame, in (y, x) order, one per pixel however many pairs see it,
    and both pairs index the same keypoint for a shared pixel. Coordinates come back as float32 (as from
    the match store) and snap back onto the lattice."""
    rng = np.random.default_rng(orientation)
    for name, o in (("A.png", orientation), ("B.png", 1), ("C.png", 1)):
        _save(rng.integers(0, 256, (170, 230, 3), dtype=np.uint8), tmp_path / name, o)
    a, b, c = (load_image(tmp_path / n, size=64) for n in ("A.png", "B.png", "C.png"))
    ga, gb, gc = (SamplingGrid.from_map(li.to_original) for li in (a, b, c))
    na_b = _network_pixels(a, 300, rng)
    na_c = np.concatenate([na_b[:100], _network_pixels(a, 200, rng)])       # 100 pixels seen by both pairs
    nb, nc = _network_pixels(b, 300, rng), _network_pixels(c, 300, rng)

    def f32(xy):
        return xy.astype(np.float32).astype(np.float64)

    ab = PairMatches("A.png", "B.png", f32(a.to_original(na_b)), f32(b.to_original(nb)), np.full(300, 2.0), ga, gb)
    ca = PairMatches("C.png", "A.png", f32(c.to_original(nc)), f32(a.to_original(na_c)), np.full(300, 1.0), gc, ga)
    kps, matches = consolidate([ab, ca], NO_CAP)

    distinct = np.unique(np.concatenate([na_b, na_c]), axis=0)
    expected = _sorted_yx(a.to_original(distinct))
    assert len(kps["A.png"]) == len(distinct)                          # one keypoint per network pixel
    np.testing.assert_allclose(kps["A.png"].keypoints, expected, rtol=0, atol=1e-9)
    assert not np.array_equal(f32(expected), expected)                 # so the snap did something
    # the keypoint of each observation: votes 2 per observation from (A, B), 1 from (C, A)
    ids_b = np.searchsorted(_key(expected), _key(a.to_original(na_b)))
    ids_c = np.searchsorted(_key(expected), _key(a.to_original(na_c)))
    votes = np.bincount(ids_b, minlength=len(expected)) * 2.0 + np.bincount(ids_c, minlength=len(expected))
    np.testing.assert_array_equal(kps["A.png"].scores, votes.astype(np.float32))
    # every match joins the keypoints of one raw match: a pixel seen by both pairs has one id in both
    m_ab, m_ca = matches
    assert m_ab.pair == ("A.png", "B.png") and m_ca.pair == ("C.png", "A.png")
    kb, kc = (_sorted_yx(np.unique(li.to_original(n), axis=0)) for li, n in ((b, nb), (c, nc)))
    rows_ab = set(zip(ids_b.tolist(), np.searchsorted(_key(kb), _key(b.to_original(nb))).tolist()))
    rows_ca = set(zip(np.searchsorted(_key(kc), _key(c.to_original(nc))).tolist(), ids_c.tolist()))
    assert set(map(tuple, m_ab.matches.tolist())) <= rows_ab and set(map(tuple, m_ca.matches.tolist())) <= rows_ca
    assert len(np.intersect1d(m_ab.matches[:, 0], m_ca.matches[:, 1])) > 50


def _key(xy: np.ndarray) -> np.ndarray:
    """A sort key of points in (y, x) order, robust to 1e-6 px of rounding (coordinates < 1e4)."""
    r = np.round(xy * 1e3)
    return r[:, 1] * 1e8 + r[:, 0]


def test_equal_lattices_with_other_origins_are_one_grid() -> None:
    """Grids a whole number of steps apart (or 1e-12 off) are the same lattice: keypoints on its points."""
    g1, g2 = SamplingGrid(0.5, 0.25, 2.0, 1.5), SamplingGrid(4.5, -2.75 + 1e-12, 2.0, 1.5)
    p = PairMatches("A", "B", [[2.5, 1.75], [6.5, 4.75]], [[0, 0], [10, 10]], [1, 1], g1, None)
    q = PairMatches("A", "C", [[2.5 + 1e-5, 1.75], [8.5, 0.25]], [[0, 0], [10, 10]], [3, 1], g2, None)
    kps, matches = consolidate([p, q], NO_CAP)
    np.testing.assert_array_equal(kps["A"].keypoints, [[8.5, 0.25], [2.5, 1.75], [6.5, 4.75]])  # exact, not means
    np.testing.assert_array_equal(kps["A"].scores, np.float32([1, 4, 1]))
    np.testing.assert_array_equal(matches[0].matches[:, 0], [1, 2])
    np.testing.assert_array_equal(matches[1].matches[:, 0], [0, 1])


def test_mixed_grid_and_gridless_observations_share_keypoints() -> None:
    """A grid-less pair (or one on another grid) of the same image: cells of the finest grid, centred on its
    lattice points; each keypoint is the score-weighted mean of its cell, shared by both pairs."""
    g = SamplingGrid(1.0625, 0.5, 3.125, 2.5)
    p0 = np.array([1.0625 + 2 * 3.125, 0.5 + 3 * 2.5])                # lattice point (2, 3)
    p1 = np.array([1.0625 + 5 * 3.125, 0.5 + 1 * 2.5])                # lattice point (5, 1)
    gridded = PairMatches("A", "B", [p0, p1], [[0, 0], [9, 9]], [3, 1], g, None)
    loose = PairMatches("A", "C", [p0 + [1.0, -0.5], [40.2, 30.1]], [[0, 0], [9, 9]], [1, 2])
    kps, (m_ab, m_ac) = consolidate([gridded, loose], NO_CAP)
    # cells in (y, x) order: (5, 1) [alone], (2, 3) [3 * p0 and 1 * (p0 + (1, -0.5))], (12, 12) [40.2, 30.1]
    expected = [p1, p0 + np.array([1.0, -0.5]) / 4, [40.2, 30.1]]
    np.testing.assert_allclose(kps["A"].keypoints, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(kps["A"].scores, np.float32([1, 4, 2]))
    assert m_ab.matches[m_ab.matches[:, 1] == 0, 0].tolist() == m_ac.matches[m_ac.matches[:, 1] == 0, 0].tolist() == [1]
    # two different grids: the finer one (step 1: full-resolution pixels) sets the cells
    fine = PairMatches("A", "D", [np.round(p0) + [0.0, 1.0]], [[0, 0]], [1], SamplingGrid(0, 0, 1, 1), None)
    kps, _ = consolidate([gridded, fine], NO_CAP)
    assert len(kps["A"]) == 3                                           # p0 and (7, 9): cells of 1 px
    np.testing.assert_allclose(kps["A"].keypoints[:2], [p1, p0], atol=1e-12)  # a cell of one observation: itself


def test_observations_off_their_grid_are_snapped_with_a_warning(caplog) -> None:
    g = SamplingGrid(0, 0, 2, 2)
    p = PairMatches("A", "B", [[4.0, 2.0], [4.9, 2.1]], [[0, 0], [10, 10]], [1, 1], g, None)
    with caplog.at_level(logging.WARNING, logger="mast3r_colmap.keypoints"):
        kps, _ = consolidate([p], NO_CAP)
    np.testing.assert_array_equal(kps["A"].keypoints, [[4.0, 2.0]])
    assert "A: 1 of 2 observations lie more than 0.1 step from their sampling grid" in caplog.text


def test_cap_on_a_grid_moves_a_dropped_point_whole() -> None:
    """With ``max_kps``, all observations of a dropped lattice point go to one kept neighbour; of two kept
    neighbours at equal distance (one step left and right) the lower id wins."""
    g = SamplingGrid(0.5, 0.5, 3.0, 3.0)
    xy0 = [[3.5, 3.5], [9.5, 3.5], [6.5, 3.5], [6.5 + 1e-4, 3.5 - 1e-4], [6.5 - 1e-4, 3.5]]
    p = PairMatches("A", "B", xy0, [[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]], [5, 6, 1, 1, 1], g, None)
    kps, (m,) = consolidate([p], KeypointConfig(max_kps=2, max_error=3.0), unquantized={"B"})
    np.testing.assert_array_equal(kps["A"].keypoints, [[3.5, 3.5], [9.5, 3.5]])
    np.testing.assert_array_equal(kps["A"].scores, np.float32([5, 6]))   # re-assigned ones do not vote
    np.testing.assert_array_equal(m.matches, [[0, 0], [1, 1]])           # (6.5, 3.5) x3 -> id 0, then one-to-one
    np.testing.assert_array_equal(m.scores, np.float32([5, 6]))


# ------------------------------------------------------------------------------------------------
# The matcher's grids: single pass and coarse-to-fine, with an EXIF-rotated image
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tagged_scene(tmp_path_factory):
    """Three 250x190 pictures of a synthetic scene; the second stored rotated, with EXIF orientation 6."""
    scene = SyntheticScene.make(num_cameras=3, image_size=(250, 190), seed=0, kind="planes", arc_deg=30)
    scene = dataclasses.replace(scene, orientations={scene.names[1]: 6})
    folder = tmp_path_factory.mktemp("grid_scene")
    scene.write_images(folder)
    return scene, folder


def test_single_pass_matches_lie_on_the_network_grid(tagged_scene) -> None:
    scene, folder = tagged_scene
    a, b, c = scene.names
    matcher = Matcher(SyntheticNetwork(scene), get_config("default", image_size=128), image_dir=folder)
    pms = list(matcher.match_pairs([(a, b), (b, c)]))
    lb = load_image(folder / b, size=128)
    assert lb.orientation == 6 and lb.original_size == (190, 250)
    gb = SamplingGrid.from_map(lb.to_original)
    assert pms[0].grid1 == gb == pms[1].grid0 and gb.sx != gb.sy
    # b's observations: network pixels of b, so exactly on its lattice
    obs = np.concatenate([pms[0].xy1, pms[1].xy0])
    net = lb.to_network(obs)
    np.testing.assert_allclose(net, np.round(net), atol=1e-9)
    kps, _ = consolidate(pms, NO_CAP)
    distinct = np.unique(np.round(net), axis=0)
    assert len(kps[b]) == len(distinct) > 300                             # one keypoint per network pixel
    np.testing.assert_allclose(kps[b].keypoints, _sorted_yx(lb.to_original(distinct)), rtol=0, atol=1e-9)


def test_coarse_to_fine_matches_stay_on_whole_pixels(tagged_scene) -> None:
    """Crops are cut at native resolution with integer corners: the fine matches of every crop lie on the
    full-resolution pixels (grid (0, 0, 1, 1), also for the EXIF-rotated image), and their keypoints are
    exactly the distinct observed pixels, not averages."""
    scene, folder = tagged_scene
    a, b, c = scene.names
    network = SyntheticNetwork(scene)
    matcher = Matcher(network, get_config("hires", image_size=128), image_dir=folder)
    pms = list(matcher.match_pairs([(a, b), (b, c)]))
    assert sum(key[1] is not None for key in network.encoded) > 4        # crops were matched
    for pm in pms:
        assert pm.grid0 == pm.grid1 == SamplingGrid(0, 0, 1, 1)
        np.testing.assert_array_equal(pm.xy0, np.round(pm.xy0))
        np.testing.assert_array_equal(pm.xy1, np.round(pm.xy1))
    kps, _ = consolidate(pms, NO_CAP)
    obs = np.concatenate([pms[0].xy1, pms[1].xy0])
    np.testing.assert_array_equal(kps[b].keypoints, _sorted_yx(np.unique(obs, axis=0)))
    assert len(kps[b]) > len(np.unique(pms[0].xy1, axis=0)) and len(pms[0]) > 500


# ------------------------------------------------------------------------------------------------
# The match store keeps the grids
# ------------------------------------------------------------------------------------------------

def test_store_keeps_grids_and_ignores_rows_of_the_previous_format(tmp_path: Path) -> None:
    g = SamplingGrid(1.0625, 0.3, 3.125, 3.0)
    pm = PairMatches("b", "a", [[1.0625, 0.3]], [[5, 6]], [2.0], g, None)
    with MatchStore(tmp_path / "m.sqlite", "cfg") as store:
        store.put(pm)
        back = store.get("b", "a")
        assert back.grid0 == g and back.grid1 is None
        assert store.get("a", "b").grid1 == g
        np.testing.assert_allclose(back.xy0, pm.xy0, rtol=1e-7)           # float32 in the store
    # a store of the previous version (its schema): no grid columns; its rows are matched again
    old = tmp_path / "old.sqlite"
    con = sqlite3.connect(old)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE file_hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, "
                "sha256 TEXT NOT NULL)")
    con.execute("CREATE TABLE pair_matches (config TEXT NOT NULL, name0 TEXT NOT NULL, name1 TEXT NOT NULL, "
                "num INTEGER NOT NULL, xy0 BLOB NOT NULL, xy1 BLOB NOT NULL, scores BLOB NOT NULL, "
                "hash0 TEXT NOT NULL, hash1 TEXT NOT NULL, PRIMARY KEY (config, name0, name1))")
    xy = np.zeros((1, 2), "<f4").tobytes()
    con.execute("INSERT INTO pair_matches VALUES ('cfg', 'a', 'b', 1, ?, ?, ?, '', '')",
                (xy, xy, np.ones(1, "<f4").tobytes()))
    con.commit()
    con.close()
    with MatchStore(old, "cfg", read_only=True) as store:                 # read-only: left as it is, no row
        assert ("a", "b") not in store and store.done_pairs() == set()
    with sqlite3.connect(old) as con:
        assert "format" not in {row[1] for row in con.execute("PRAGMA table_info(pair_matches)")}
    with MatchStore(old, "cfg") as store:
        assert ("a", "b") not in store and store.done_pairs() == set()
        with pytest.raises(KeyError):
            store.get("a", "b")
        store.put(pm)                                                     # the re-matched row replaces it
        assert store.done_pairs() == {frozenset("ab")} and store.get("b", "a").grid0 == g
    with sqlite3.connect(old) as con:
        assert con.execute("SELECT COUNT(*), MIN(format) FROM pair_matches").fetchone() == (1, 2)
