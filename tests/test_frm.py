"""Tests for fast reciprocal matching (mast3r_colmap.matching.frm)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mast3r_colmap.matching.frm import (
    _exact_fp32_matmul,
    fast_reciprocal_nns,
    grid_seeds,
    merge_corres,
    mutual_nearest_neighbours,
    nearest_neighbours,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def frm_ref() -> dict[str, np.ndarray]:
    with np.load(DATA / "frm.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def model_desc() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / "model_small.npz") as f:
        return f["same_pred1_desc"], f["same_pred2_desc"]


@pytest.fixture(scope="module")
def b_desc() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / "frm_inputs.npz") as f:
        return f["b_desc1_q11"].astype(np.float32) / 2048, f["b_desc2_q11"].astype(np.float32) / 2048


def c_seeds() -> tuple[np.ndarray, np.ndarray]:
    """x = 3 + 7i (i < 37), y = 2 + 9j (j < 22), y outer / x inner, plus a copy of (3, 2)."""
    ys, xs = np.meshgrid(2 + 9 * np.arange(22), 3 + 7 * np.arange(37), indexing="ij")
    return np.append(xs.ravel(), 3), np.append(ys.ravel(), 2)


def flat(xy: np.ndarray, width: int) -> np.ndarray:
    return xy[:, 0] + width * xy[:, 1]


def pair_set(xy1: np.ndarray, xy2: np.ndarray, w1: int, w2: int) -> set[tuple[int, int]]:
    return set(zip(flat(xy1, w1).tolist(), flat(xy2, w2).tolist()))


def random_unit(h: int, w: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((h, w, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_sorted_unique(xy1: np.ndarray, xy2: np.ndarray, w1: int, w2: int) -> None:
    key = flat(xy1, w1).astype(np.int64) * (2**32) + flat(xy2, w2)
    assert np.all(np.diff(key) > 0)


# --------------------------------------------------------------------------------------
# golden vectors (official outputs)
# --------------------------------------------------------------------------------------
def test_case_a(frm_ref, model_desc):
    xy1, xy2 = fast_reciprocal_nns(*model_desc, subsample=8)
    assert np.array_equal(xy1, frm_ref["a_xy1"]) and np.array_equal(xy2, frm_ref["a_xy2"])
    assert xy1.dtype == np.int64 and xy2.dtype == np.int64


@pytest.mark.parametrize("s", [8, 4])
def test_case_b(frm_ref, b_desc, s):
    xy1, xy2 = fast_reciprocal_nns(*b_desc, subsample=s)
    assert np.array_equal(xy1, frm_ref[f"b_s{s}_xy1"])
    assert np.array_equal(xy2, frm_ref[f"b_s{s}_xy2"])


@pytest.mark.parametrize("tol", [5, 0])
def test_case_c(frm_ref, b_desc, tol):
    sx, sy = c_seeds()
    assert np.array_equal(sx, frm_ref["c_seeds_x"]) and np.array_equal(sy, frm_ref["c_seeds_y"])
    xy1, xy2 = fast_reciprocal_nns(*b_desc, seeds=(sx, sy), pixel_tol=tol)
    assert np.array_equal(xy1, frm_ref[f"c_tol{tol}_xy1"])
    assert np.array_equal(xy2, frm_ref[f"c_tol{tol}_xy2"])


def test_case_c_torch_seeds(frm_ref, b_desc):
    sx, sy = c_seeds()
    xy1, xy2 = fast_reciprocal_nns(*b_desc, seeds=(torch.from_numpy(sx), torch.from_numpy(sy)), pixel_tol=5)
    assert np.array_equal(xy1, frm_ref["c_tol5_xy1"]) and np.array_equal(xy2, frm_ref["c_tol5_xy2"])


def test_torch_and_numpy_inputs_agree(frm_ref, b_desc):
    t1, t2 = (torch.from_numpy(d) for d in b_desc)
    xy1, xy2 = fast_reciprocal_nns(t1, t2, subsample=8)
    assert np.array_equal(xy1, frm_ref["b_s8_xy1"]) and np.array_equal(xy2, frm_ref["b_s8_xy2"])
    # float64 / float16-exact inputs are computed in float32 too
    xy1, xy2 = fast_reciprocal_nns(b_desc[0].astype(np.float64), t2.double(), subsample=8)
    assert np.array_equal(xy1, frm_ref["b_s8_xy1"]) and np.array_equal(xy2, frm_ref["b_s8_xy2"])


def test_b_s8_tie_rule_matters(b_desc, frm_ref):
    """b_s8 has one exact tie that matters: image-2 pixel 17485 is equally close to image-1
    pixels 11883 and 11884. The first maximum must win at every tile size, also when the
    tie straddles two tiles (block_size=11884)."""
    for bs in (4096, 11884, 49152):
        xy1, xy2 = fast_reciprocal_nns(*b_desc, subsample=8, block_size=bs)
        assert np.array_equal(xy1, frm_ref["b_s8_xy1"]) and np.array_equal(xy2, frm_ref["b_s8_xy2"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(frm_ref, b_desc, model_desc):
    t1, t2 = (torch.from_numpy(d).cuda() for d in b_desc)
    for s in (8, 4):
        xy1, xy2 = fast_reciprocal_nns(t1, t2, subsample=s)
        assert np.array_equal(xy1, frm_ref[f"b_s{s}_xy1"]) and np.array_equal(xy2, frm_ref[f"b_s{s}_xy2"])
    m1, m2 = (torch.from_numpy(d).cuda() for d in model_desc)
    xy1, xy2 = fast_reciprocal_nns(m1, m2, subsample=8)
    assert np.array_equal(xy1, frm_ref["a_xy1"]) and np.array_equal(xy2, frm_ref["a_xy2"])


# --------------------------------------------------------------------------------------
# nearest neighbours: exactness and tie breaking
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 7, 64])
def test_nearest_neighbours_first_max(block_size):
    rng = np.random.default_rng(0)
    # small integer components: float32 dot products are exact and ties are frequent
    db = rng.integers(-1, 2, size=(300, 4)).astype(np.float32)
    q = rng.integers(-1, 2, size=(200, 4)).astype(np.float32)
    ref = np.argmax(q @ db.T, axis=1)  # numpy argmax returns the first maximum
    got = nearest_neighbours(q, db, block_size=block_size)
    assert got.dtype == np.int64
    assert np.array_equal(got, ref)


def test_nearest_neighbours_tie_across_tiles():
    db = np.zeros((100, 3), dtype=np.float32)
    db[[10, 50, 90]] = [1, 0, 0]
    got = nearest_neighbours(np.array([[1, 0, 0]], np.float32), db, block_size=16)
    assert got.tolist() == [10]


def test_torch_argmax_returns_first_max():
    x = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0]]).repeat(3, 1)
    assert torch.argmax(x, dim=1).tolist() == [1, 1, 1]
    big = torch.zeros(4, 100_000)
    big[:, [5, 70_000, 99_999]] = 1.0
    assert torch.argmax(big, dim=1).tolist() == [5] * 4


# --------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------
SHAPES = [
    ((8, 8), (8, 8)),
    ((5, 7), (7, 5)),
    ((24, 40), (40, 24)),  # landscape vs portrait
    ((33, 17), (20, 31)),
    ((48, 64), (48, 64)),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("dim", [3, 24])
def test_frm_pairs_are_mutual_nn(seed, shapes, dim):
    rng = np.random.default_rng(seed)
    (h1, w1), (h2, w2) = shapes
    d1, d2 = random_unit(h1, w1, dim, rng), random_unit(h2, w2, dim, rng)
    mnn = pair_set(*mutual_nearest_neighbours(d1, d2), w1, w2)
    for s in (1, 2, 4, 8):
        xy1, xy2 = fast_reciprocal_nns(d1, d2, subsample=s)
        assert xy1.dtype == np.int64 and xy1.shape == xy2.shape and xy1.shape[1:] == (2,)
        assert_sorted_unique(xy1, xy2, w1, w2)
        got = pair_set(xy1, xy2, w1, w2)
        assert got <= mnn
        if s == 1:  # every pixel is a seed: FRM finds every mutual pair in one step
            assert got == mnn


@pytest.mark.parametrize("seed", [0, 1])
def test_explicit_seeds_and_tolerance(seed):
    rng = np.random.default_rng(seed)
    d1, d2 = random_unit(20, 30, 3, rng), random_unit(25, 18, 3, rng)
    mnn = pair_set(*mutual_nearest_neighbours(d1, d2), 30, 18)
    sx, sy = rng.integers(0, 30, 50), rng.integers(0, 20, 50)
    xy1, xy2 = fast_reciprocal_nns(d1, d2, seeds=(sx, sy))
    assert pair_set(xy1, xy2, 30, 18) <= mnn
    assert set(flat(xy1, 30).tolist()) <= set((sx + 30 * sy).tolist())
    # with a tolerance, xy1 are the seeds themselves and a tolerance above the image diagonal keeps all
    xy1, xy2 = fast_reciprocal_nns(d1, d2, seeds=(sx, sy), pixel_tol=100)
    assert sorted(set(flat(xy1, 30).tolist())) == sorted(set((sx + 30 * sy).tolist()))
    t1, _ = fast_reciprocal_nns(d1, d2, seeds=(sx, sy), pixel_tol=1e-9)
    t0, _ = fast_reciprocal_nns(d1, d2, seeds=(sx, sy), pixel_tol=0)
    assert np.array_equal(t1, t0)  # tolerance -> 0 means exact round trips


def test_pixel_tol_without_seeds_uses_grid():
    rng = np.random.default_rng(3)
    d1, d2 = random_unit(30, 40, 4, rng), random_unit(30, 40, 4, rng)
    gx, gy = grid_seeds(30, 40, 8)
    assert gx[0] == 4 and gy[0] == 4 and len(gx) == 4 * 5
    a = fast_reciprocal_nns(d1, d2, subsample=8, pixel_tol=3)
    b = fast_reciprocal_nns(d1, d2, seeds=(gx, gy), pixel_tol=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_all_ties_deterministic():
    """All-equal descriptors: every NN is flat index 0 (first maximum).

    Seed s -> (0,0) in image 2 -> (0,0) in image 1 (moved unless s == 0); next iteration the
    image-2 partner is unchanged, so every walk converges to the single pair (0,0)<->(0,0).
    """
    d1 = np.ones((16, 20, 8), np.float32)
    d2 = np.ones((12, 9, 8), np.float32)
    for s in (1, 3, 8):
        xy1, xy2 = fast_reciprocal_nns(d1, d2, subsample=s)
        assert xy1.tolist() == [[0, 0]] and xy2.tolist() == [[0, 0]]
    # zero descriptors are all ties too; with a tolerance, seeds near (0,0) keep their position
    z1, z2 = np.zeros_like(d1), np.zeros_like(d2)
    xy1, xy2 = fast_reciprocal_nns(z1, z2, seeds=([0, 1, 2, 5], [0, 1, 2, 5]), pixel_tol=3)
    assert xy1.tolist() == [[0, 0], [1, 1], [2, 2]] and xy2.tolist() == [[0, 0]] * 3


def test_tilings_identical():
    rng = np.random.default_rng(7)
    # quantised descriptors: many exact ties, exact dot products
    d1 = rng.integers(-2, 3, size=(40, 56, 6)).astype(np.float32)
    d2 = rng.integers(-2, 3, size=(56, 40, 6)).astype(np.float32)
    ref = fast_reciprocal_nns(d1, d2, subsample=4, block_size=500)
    got = fast_reciprocal_nns(d1, d2, subsample=4)
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))
    sx, sy = rng.integers(0, 56, 100), rng.integers(0, 40, 100)
    ref = fast_reciprocal_nns(d1, d2, seeds=(sx, sy), pixel_tol=4, block_size=500)
    got = fast_reciprocal_nns(d1, d2, seeds=(sx, sy), pixel_tol=4)
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))
    # and torch inputs
    got = fast_reciprocal_nns(torch.from_numpy(d1), torch.from_numpy(d2), seeds=(sx, sy), pixel_tol=4)
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))


def test_empty_results():
    rng = np.random.default_rng(0)
    d1, d2 = random_unit(3, 3, 4, rng), random_unit(6, 6, 4, rng)
    xy1, xy2 = fast_reciprocal_nns(d1, d2, subsample=8)  # no seed fits
    for xy in (xy1, xy2):
        assert xy.shape == (0, 2) and xy.dtype == np.int64
    xy1, xy2 = fast_reciprocal_nns(d1, d2, seeds=(np.zeros(0, int), np.zeros(0, int)), pixel_tol=2)
    assert xy1.shape == (0, 2) and xy2.shape == (0, 2) and xy1.dtype == np.int64
    xy1, xy2 = fast_reciprocal_nns(np.zeros((0, 5, 4), np.float32), d2)
    assert xy1.shape == (0, 2) and xy2.shape == (0, 2)
    xy1, xy2 = mutual_nearest_neighbours(np.zeros((0, 5, 4), np.float32), d2)
    assert xy1.shape == (0, 2) and xy1.dtype == np.int64


def test_merge_corres_first_occurrence():
    i1, i2, first = merge_corres(np.array([5, 1, 5, 1, 0]), np.array([2, 9, 2, 3, 7]))
    assert i1.tolist() == [0, 1, 1, 5] and i2.tolist() == [7, 3, 9, 2]
    assert first.tolist() == [4, 3, 1, 0]


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def test_dim_mismatch_raises():
    with pytest.raises(ValueError, match="descriptor dimensions differ"):
        fast_reciprocal_nns(np.zeros((8, 8, 24), np.float32), np.zeros((8, 8, 16), np.float32))
    with pytest.raises(ValueError, match="descriptor dimensions differ"):
        mutual_nearest_neighbours(torch.zeros(8, 8, 24), torch.zeros(8, 8, 23))


@pytest.mark.parametrize("bad", [np.zeros((64, 24), np.float32), np.zeros((1, 8, 8, 24), np.float32)])
def test_non_3d_raises(bad):
    good = np.zeros((8, 8, 24), np.float32)
    with pytest.raises(ValueError, match=r"\(H, W, D\)"):
        fast_reciprocal_nns(bad, good)
    with pytest.raises(ValueError, match=r"\(H, W, D\)"):
        fast_reciprocal_nns(good, torch.from_numpy(bad))


def test_bad_arguments_raise():
    d = np.ones((8, 8, 4), np.float32)
    with pytest.raises(ValueError, match="outside"):
        fast_reciprocal_nns(d, d, seeds=([8], [0]))
    with pytest.raises(ValueError):
        fast_reciprocal_nns(d, d, pixel_tol=-1)
    with pytest.raises(TypeError):
        fast_reciprocal_nns([[[1.0]]], d)


def test_exact_fp32_context_restores_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with _exact_fp32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
