"""Tests of the coarse-to-fine crop selection against the golden vectors (crops.npz) and properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mast3r_colmap.matching.coarse_to_fine import (
    candidate_crop_pairs,
    greedy_selection,
    needs_coarse_to_fine,
    normalize_windows,
    overlapping_grid,
    score_cells,
    select_crop_pairs,
    training_resolution,
)

DATA = Path(__file__).parent / "data" / "crops.npz"
CASES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def vec():
    with np.load(DATA) as d:
        return {k: d[k] for k in d.files}


def _case(vec, c):
    mh = tuple(int(v) for v in vec[f"{c}_map_hw"])
    qh = tuple(int(v) for v in vec[f"{c}_query_hw"])
    res = [tuple(int(v) for v in vec[f"{c}_res_map"]), tuple(int(v) for v in vec[f"{c}_res_query"])]
    return mh, qh, vec[f"{c}_pos_map"], vec[f"{c}_pos_query"], res


# ----------------------------------------------------------------------------- golden vectors


@pytest.mark.parametrize("c", CASES)
def test_training_resolution_vectors(vec, c):
    mh, qh, _, _, res = _case(vec, c)
    assert training_resolution(*mh) == res[0]
    assert training_resolution(*qh) == res[1]


@pytest.mark.parametrize("c", CASES)
def test_grid_raw_vectors(vec, c):
    mh, qh, *_ = _case(vec, c)
    gm, gq = overlapping_grid(*mh, 512, 0.5), overlapping_grid(*qh, 512, 0.5)
    assert gm.dtype == np.int64 and gq.dtype == np.int64
    np.testing.assert_array_equal(gm, vec[f"{c}_grid_map_raw"])
    np.testing.assert_array_equal(gq, vec[f"{c}_grid_query_raw"])


@pytest.mark.parametrize("c", CASES)
def test_normalize_windows_vectors(vec, c):
    mh, qh, _, _, res = _case(vec, c)
    np.testing.assert_array_equal(
        normalize_windows(vec[f"{c}_grid_map_raw"], *mh, res[0]), vec[f"{c}_grid_map"]
    )
    np.testing.assert_array_equal(
        normalize_windows(vec[f"{c}_grid_query_raw"], *qh, res[1]), vec[f"{c}_grid_query"]
    )


@pytest.mark.parametrize("c", CASES)
def test_candidates_vectors(vec, c):
    mh, qh, pm, pq, res = _case(vec, c)
    cand1, cand2, w, n1 = candidate_crop_pairs(mh, qh, pm, pq, 512, 0.5, res)
    np.testing.assert_array_equal(cand1, vec[f"{c}_cand_map"])
    np.testing.assert_array_equal(cand2, vec[f"{c}_cand_query"])
    assert n1 == int(vec[f"{c}_cand_n_from_map_grid"])
    assert w.shape == (len(cand1), len(pm))
    np.testing.assert_allclose(w.sum(axis=1), vec[f"{c}_cand_weight_sum"], rtol=1e-9, atol=0)
    np.testing.assert_allclose(w.max(axis=1), vec[f"{c}_cand_weight_max"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("c", CASES)
def test_greedy_order_vectors(vec, c):
    mh, qh, pm, pq, res = _case(vec, c)
    _, _, w, _ = candidate_crop_pairs(mh, qh, pm, pq, 512, 0.5, res)
    assert greedy_selection(w, target=0.9) == [int(i) for i in vec[f"{c}_order"]]


@pytest.mark.parametrize("c", CASES)
def test_select_crop_pairs_vectors(vec, c):
    mh, qh, pm, pq, res = _case(vec, c)
    pairs = select_crop_pairs(mh, qh, pm, pq, maxdim=512, overlap=0.5, forced_resolution=res)
    assert len(pairs) == len(vec[f"{c}_sel_map"])
    np.testing.assert_array_equal(np.array([p[0] for p in pairs]), vec[f"{c}_sel_map"])
    np.testing.assert_array_equal(np.array([p[1] for p in pairs]), vec[f"{c}_sel_query"])
    for w1, w2 in pairs:
        assert isinstance(w1, tuple) and isinstance(w2, tuple)
        assert all(type(v) is int for v in w1 + w2)


@pytest.mark.parametrize("c", CASES)
def test_default_forced_resolution_equals_training_resolution(vec, c):
    # the vector forced resolutions are the training resolutions, so None must give the same result
    mh, qh, pm, pq, res = _case(vec, c)
    assert select_crop_pairs(mh, qh, pm, pq) == select_crop_pairs(mh, qh, pm, pq, forced_resolution=res)


@pytest.mark.parametrize("c", CASES)
def test_swap_images_vectors(vec, c):
    # Scoring is done both ways and the per-match weight is a product, so swapping the images
    # gives the same candidate rows (bitwise), just block-reordered; the greedy picks the same
    # candidates barring exact float ties between different candidates.
    mh, qh, pm, pq, res = _case(vec, c)
    fwd = select_crop_pairs(mh, qh, pm, pq, forced_resolution=res)
    bwd = select_crop_pairs(qh, mh, pq, pm, forced_resolution=res[::-1])
    assert bwd == [(b, a) for a, b in fwd]


# ----------------------------------------------------------------------------- unit behaviour


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((1536, 2048), (384, 512)),  # 4/3
        ((2048, 1536), (512, 384)),  # portrait
        ((1000, 1000), (384, 512)),  # square counts as landscape
        ((1050, 1600), (336, 512)),  # 1.524 = 32/21
        ((1000, 1427), (384, 512)),  # 1.427: closer to 4/3 in plain difference (spec), not in log ratio
        ((1080, 1920), (288, 512)),  # 16/9
        ((1920, 1080), (512, 288)),
        ((500, 1000), (256, 512)),  # 2/1
        ((1000, 3000), (160, 512)),  # 3 -> 16/5
        ((100, 5000), (160, 512)),  # very elongated -> 16/5
        ((300, 400), (384, 512)),  # small images still get the 512-class resolution
    ],
)
def test_training_resolution_table(hw, expected):
    assert training_resolution(*hw) == expected


def test_needs_coarse_to_fine():
    assert needs_coarse_to_fine(384, 512) is False
    assert needs_coarse_to_fine(513, 100) is True
    assert needs_coarse_to_fine(100, 513) is True
    assert needs_coarse_to_fine(1000, 1000, maxdim=1000) is False


def test_grid_small_image_is_single_whole_window():
    np.testing.assert_array_equal(overlapping_grid(300, 400), [[0, 0, 400, 300]])
    np.testing.assert_array_equal(overlapping_grid(384, 512), [[0, 0, 512, 384]])
    np.testing.assert_array_equal(overlapping_grid(512, 100), [[0, 0, 96, 512], [4, 0, 100, 512]])


def test_grid_covers_image_with_overlap():
    for H, W in [(1536, 2048), (2000, 1100), (777, 3001), (513, 513)]:
        g = overlapping_grid(H, W)
        assert g[:, 0].min() == 0 and g[:, 1].min() == 0
        assert g[:, 2].max() == W and g[:, 3].max() == H
        ww, hh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
        assert (ww == ww[0]).all() and (hh == hh[0]).all() and ww[0] % 16 == 0 and hh[0] % 16 == 0
        lefts, tops = np.unique(g[:, 0]), np.unique(g[:, 1])
        assert len(g) == len(lefts) * len(tops)
        assert (np.diff(lefts) <= ww[0] / 2).all() and (np.diff(tops) <= hh[0] / 2).all()
        # row-major over (top, left)
        np.testing.assert_array_equal(g[:, 1], np.repeat(tops, len(lefts)))
        np.testing.assert_array_equal(g[:, 0], np.tile(lefts, len(tops)))


def test_normalize_windows_grow_shrink_floor_shift():
    out = normalize_windows(
        [[-10, -10, 90, 90], [250, 150, 310, 210], [0, 0, 201, 101], [100, 50, 228, 114]],
        200,
        300,
        (50, 100),
    )
    np.testing.assert_array_equal(
        out,
        [
            [0, 15, 100, 65],  # centre (40, 40): left shifted from -10 to 0
            [200, 150, 300, 200],  # centre (280, 180): shifted back inside
            [50, 25, 150, 75],  # centre (100.5, 50.5): floored
            [114, 57, 214, 107],  # plain shrink about the centre (164, 82)
        ],
    )


def test_normalize_windows_too_big_raises():
    with pytest.raises(ValueError, match="does not fit"):
        normalize_windows([[0, 0, 10, 10]], 300, 400, (384, 512))
    with pytest.raises(ValueError, match="does not fit"):
        normalize_windows([[0, 0, 10, 10]], 400, 300, (401, 200))


def test_score_cells_half_open_and_float32_mean():
    cells1 = np.array([[0, 0, 512, 384], [512, 0, 1024, 384]])
    p1 = np.column_stack([np.linspace(100, 400, 10), np.full(10, 200.0)])
    # mean 299.99999999 in float64 (floor(x - 256) = 43) but exactly 300 in float32 (-> 44)
    p2 = np.full((10, 2), 299.99999999)
    kept1, cells2, w = score_cells(cells1, 1200, 1600, p1, p2, (384, 512))
    np.testing.assert_array_equal(kept1, [[0, 0, 512, 384]])
    np.testing.assert_array_equal(cells2, [[44, 108, 556, 492]])
    assert w.shape == (1, 10) and (w > 0).all()
    # points on the right/bottom border are outside (half-open windows): no candidate
    p1_edge = np.column_stack([np.full(10, 512.0), np.linspace(0, 383, 10)])
    kept1, cells2, w = score_cells(cells1[:1], 1200, 1600, p1_edge, p2, (384, 512))
    assert kept1.shape == (0, 4) and cells2.shape == (0, 4) and w.shape == (0, 10)
    # 9 matches are not enough, 10 are
    assert len(score_cells(cells1, 1200, 1600, p1[:9], p2[:9], (384, 512))[0]) == 0


def test_score_cells_weights_zero_outside_and_gaussian():
    cells1 = np.array([[0, 0, 100, 100]])
    p1 = np.array([[50.0, 50.0]] * 10 + [[150.0, 50.0]])
    p2 = np.array([[60.0, 40.0]] * 10 + [[60.0, 40.0]])
    _, cells2, w = score_cells(cells1, 200, 200, p1, p2, (100, 100))
    np.testing.assert_array_equal(cells2, [[10, 0, 110, 100]])
    # match in the centre of cell 1: weight 1; in cell 2 (centre (60, 50)): exp(-2 * 0.1^2)
    np.testing.assert_allclose(w[0, :10], np.exp(-2 * 0.01), rtol=1e-12)
    assert w[0, 10] == 0.0


def test_greedy_selection_hand_example():
    # values exact in binary, so the stopping rule is exercised without rounding noise
    w = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.75, 0.75, 0.75, 0.75]])
    assert greedy_selection(w, 0.75) == [2]  # 3 >= 0.75 * 4
    assert greedy_selection(w, 0.8) == [2, 0]  # then a tie (0.5 each) goes to the lowest index
    assert greedy_selection(w, 0.9) == [2, 0, 1]
    assert greedy_selection(w, 1.0) == [2, 0, 1]
    assert greedy_selection(w[:2], 0.5) == [0]
    assert greedy_selection(w[:2], 0.51) == [0, 1]
    assert greedy_selection(w[::-1], 0.8) == [0, 1]  # reversed rows: tie -> old row 1 first
    assert greedy_selection(np.zeros((3, 5))) == []
    assert greedy_selection(np.zeros((0, 5))) == []
    assert greedy_selection(np.zeros((0, 0))) == []


# ----------------------------------------------------------------------------- edge cases


def test_empty_matches():
    e = np.zeros((0, 2))
    assert select_crop_pairs((1536, 2048), (1200, 1600), e, e) == []
    c1, c2, w, n = candidate_crop_pairs((1536, 2048), (1200, 1600), e, e)
    assert c1.shape == (0, 4) and c2.shape == (0, 4) and w.shape == (0, 0) and n == 0


def test_too_few_matches():
    xy = np.array([[100.0 + i, 100.0] for i in range(9)])
    assert select_crop_pairs((1536, 2048), (1200, 1600), xy, xy) == []


def test_mismatched_matches_raise():
    with pytest.raises(ValueError, match="same length"):
        select_crop_pairs((1536, 2048), (1200, 1600), np.zeros((5, 2)), np.zeros((4, 2)))


def test_forced_bigger_than_image_raises():
    xy = np.random.default_rng(0).uniform(0, 300, (50, 2))
    with pytest.raises(ValueError, match="does not fit"):
        select_crop_pairs((300, 400), (1200, 1600), xy, xy, forced_resolution=[(384, 512), (384, 512)])
    with pytest.raises(ValueError, match="does not fit"):
        select_crop_pairs((1200, 1600), (500, 1600), xy, xy, forced_resolution=[(384, 512), (512, 384)])


def _mirrored(rng, centre, half_range, n=20):
    q = rng.uniform(-1, 1, (n, 2)) * half_range
    return np.asarray(centre) + np.concatenate([q, -q])


def test_tiny_images_single_whole_window():
    rng = np.random.default_rng(1)
    # all matches inside the centred crops below, and with means (200.3, 150.3) / (100.3, 175.3)
    xy1 = _mirrored(rng, (200.3, 150.3), (180, 130))
    xy2 = _mirrored(rng, (100.3, 175.3), (90, 150))
    # default forced resolution is clipped to the image: one whole-image window each
    assert select_crop_pairs((300, 400), (350, 200), xy1, xy2) == [((0, 0, 400, 300), (0, 0, 200, 350))]
    # an explicit forced size that fits: the single grid window becomes a centred crop
    out = select_crop_pairs((300, 400), (350, 200), xy1, xy2, forced_resolution=[(288, 384), (320, 192)])
    assert out == [((8, 6, 392, 294), (4, 15, 196, 335))]


def test_small_and_large_mix():
    rng = np.random.default_rng(2)
    xy1 = rng.uniform(0, 1, (300, 2)) * [1600, 1200]
    xy2 = xy1 * 0.25  # into a 400 x 300 image
    pairs = select_crop_pairs((1200, 1600), (300, 400), xy1, xy2)
    assert pairs
    for w1, w2 in pairs:
        assert w2 == (0, 0, 400, 300)
        assert w1[2] - w1[0] == 512 and w1[3] - w1[1] == 384


# ----------------------------------------------------------------------------- properties on random cases


def _synthetic(seed, hw1, hw2, n=800, outliers=0.1):
    rng = np.random.default_rng(seed)
    H1, W1 = hw1
    H2, W2 = hw2
    p1 = rng.uniform(0, 1, (n, 2)) * [W1, H1]
    s = rng.uniform(0.6, 1.2) * min(W2 / W1, H2 / H1) ** 0.5
    th = np.deg2rad(rng.uniform(-10, 10))
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    p2 = s * (p1 - [W1 / 2, H1 / 2]) @ R.T + [W2 / 2, H2 / 2] + rng.normal(0, 2, (n, 2))
    k = int(outliers * n)
    p2[:k] = rng.uniform(0, 1, (k, 2)) * [W2, H2]
    ok = (p2[:, 0] >= 0) & (p2[:, 0] < W2) & (p2[:, 1] >= 0) & (p2[:, 1] < H2)
    return p1[ok], p2[ok]


SHAPES = [
    ((1536, 2048), (1200, 1600)),  # landscape / landscape
    ((1600, 1200), (1000, 1400)),  # portrait / landscape
    ((1080, 1920), (1920, 1080)),  # 16:9 / portrait 16:9
    ((900, 2400), (1300, 900)),  # elongated / portrait
    ((700, 700), (2000, 1500)),  # square / portrait
]


@pytest.mark.parametrize("seed, shapes", list(enumerate(SHAPES)))
def test_properties_random(seed, shapes):
    hw1, hw2 = shapes
    p1, p2 = _synthetic(seed, hw1, hw2)
    pairs = select_crop_pairs(hw1, hw2, p1, p2)
    assert pairs
    forced = [tuple(min(a, b) for a, b in zip(training_resolution(*hw), hw)) for hw in (hw1, hw2)]
    for pair in pairs:
        for (l, t, r, b), (H, W), (fh, fw) in zip(pair, (hw1, hw2), forced):
            assert 0 <= l and r <= W and 0 <= t and b <= H
            assert (r - l, b - t) == (fw, fh)
    # coverage: the selected candidates hold >= 90 % of the total weight
    c1, c2, w, _ = candidate_crop_pairs(hw1, hw2, p1, p2)
    order = greedy_selection(w)
    assert [(tuple(c1[i]), tuple(c2[i])) for i in order] == pairs
    total = w.max(axis=0).sum()
    covered = w[order].max(axis=0).sum()
    assert covered >= 0.9 * total * (1 - 1e-12)
    # without the last pick the target is not reached (greedy stops as soon as it can)
    assert w[order[:-1]].max(axis=0).sum() < 0.9 * total if len(order) > 1 else True
    # deterministic, and symmetric under swapping the images
    assert select_crop_pairs(hw1, hw2, p1.copy(), p2.copy()) == pairs
    assert select_crop_pairs(hw2, hw1, p2, p1) == [(b, a) for a, b in pairs]
