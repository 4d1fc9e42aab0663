"""Tests for correspondence extraction (mast3r_colmap.matching.extract)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mast3r_colmap.matching.extract import (
    Matches,
    border_mask,
    extract_correspondences_nonsym,
    extract_correspondences_symmetric,
)
from mast3r_colmap.matching.frm import fast_reciprocal_nns, mutual_nearest_neighbours

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def frm_ref() -> dict[str, np.ndarray]:
    with np.load(DATA / "frm.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def d_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with np.load(DATA / "frm_inputs.npz") as f:
        return (
            f["b_desc1_q11"].astype(np.float32) / 2048,
            f["b_desc2_q11"].astype(np.float32) / 2048,
            f["d_confA"],
            f["d_confB"],
        )


@pytest.fixture(scope="module")
def sym_inputs() -> tuple[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    with np.load(DATA / "model_small.npz") as m, np.load(DATA / "symmetric_small.npz") as s:
        descs = [m["same_pred1_desc"], m["same_pred2_desc"], s["res22_desc"], s["res12_desc"]]
        confs = [m["same_pred1_desc_conf"], m["same_pred2_desc_conf"], s["res22_desc_conf"], s["res12_desc_conf"]]
        ref = {k: s[k] for k in ("xy1", "xy2", "conf")}
    return descs, confs, ref


@pytest.mark.parametrize("tol", [0, 5])
def test_nonsym_golden(frm_ref, d_inputs, tol):
    m = extract_correspondences_nonsym(*d_inputs, subsample=8, pixel_tol=tol)
    xy1, xy2, conf = m
    assert np.array_equal(xy1, frm_ref[f"d_tol{tol}_xy1"])
    assert np.array_equal(xy2, frm_ref[f"d_tol{tol}_xy2"])
    assert conf.dtype == np.float32 and np.array_equal(conf, frm_ref[f"d_tol{tol}_conf"])
    assert xy1.dtype == np.int64 and xy2.dtype == np.int64
    assert int((conf >= 1.001).sum()) == {0: 202, 5: 207}[tol]  # kept by the COLMAP-export threshold


def test_nonsym_torch_inputs(frm_ref, d_inputs):
    t = [torch.from_numpy(a) for a in d_inputs]
    xy1, xy2, conf = extract_correspondences_nonsym(*t, subsample=8, pixel_tol=5)
    assert np.array_equal(xy1, frm_ref["d_tol5_xy1"]) and np.array_equal(xy2, frm_ref["d_tol5_xy2"])
    assert np.array_equal(conf, frm_ref["d_tol5_conf"])


def test_symmetric_golden(sym_inputs):
    descs, confs, ref = sym_inputs
    xy1, xy2, conf = extract_correspondences_symmetric(descs, confs, subsample=8)
    assert np.array_equal(xy1, ref["xy1"]) and np.array_equal(xy2, ref["xy2"])
    assert conf.dtype == np.float32 and np.array_equal(conf, ref["conf"])


def test_nonsym_is_union_of_both_directions():
    rng = np.random.default_rng(0)
    d1 = rng.standard_normal((30, 44, 5)).astype(np.float32)
    d2 = rng.standard_normal((36, 28, 5)).astype(np.float32)
    c1 = rng.random((30, 44)).astype(np.float32)
    c2 = rng.random((36, 28)).astype(np.float32)
    xy1, xy2, conf = extract_correspondences_nonsym(d1, d2, c1, c2, subsample=4)
    f1, f2 = fast_reciprocal_nns(d1, d2, 4)
    b2, b1 = fast_reciprocal_nns(d2, d1, 4)
    key = lambda a, b: set(zip((a @ [1, 44]).tolist(), (b @ [1, 28]).tolist()))  # noqa: E731
    got = key(xy1, xy2)
    assert got == key(f1, f2) | key(b1, b2)
    assert got <= key(*mutual_nearest_neighbours(d1, d2))
    k = (xy1 @ [1, 44]) * 2**32 + xy2 @ [1, 28]
    assert np.all(np.diff(k) > 0)
    assert np.array_equal(conf, np.minimum(c1[xy1[:, 1], xy1[:, 0]], c2[xy2[:, 1], xy2[:, 0]]))


def test_empty_extraction():
    d = np.ones((3, 3, 4), np.float32)
    m = extract_correspondences_nonsym(d, d, np.ones((3, 3)), np.ones((3, 3)), subsample=8)
    assert m.xy1.shape == (0, 2) and m.xy2.shape == (0, 2) and m.conf.shape == (0,)
    assert m.xy1.dtype == np.int64 and m.conf.dtype == np.float32
    m = extract_correspondences_symmetric([d] * 4, [np.ones((3, 3))] * 4, subsample=8)
    assert m.num == 0 and m.xy1.shape == (0, 2)


def test_extract_validation():
    d = np.ones((8, 8, 4), np.float32)
    with pytest.raises(ValueError, match="conf1"):
        extract_correspondences_nonsym(d, d, np.ones((8, 7)), np.ones((8, 8)))
    with pytest.raises(ValueError, match="descriptor dimensions differ"):
        extract_correspondences_nonsym(d, np.ones((8, 8, 3), np.float32), np.ones((8, 8)), np.ones((8, 8)))
    with pytest.raises(ValueError, match="4 maps"):
        extract_correspondences_symmetric([d, d], [np.ones((8, 8))] * 2)
    with pytest.raises(ValueError, match="differ in shape"):
        extract_correspondences_symmetric([d, d, d, np.ones((8, 9, 4), np.float32)], [np.ones((8, 8))] * 4)


def test_border_filter():
    xy1 = np.array([[3, 3], [2, 5], [508, 380], [509, 380], [100, 100], [10, 381]])
    xy2 = np.array([[10, 10], [10, 10], [10, 10], [10, 10], [380, 10], [10, 10]])
    # image 1 is 384x512 (H, W); image 2 is portrait 512x384
    m = border_mask(xy1, xy2, (384, 512), (512, 384))
    assert m.tolist() == [True, False, True, False, True, False]
    m2 = border_mask(xy1, xy2, (384, 512), (512, 384), border=0)
    assert m2.tolist() == [True] * 6
    conf = np.arange(6, dtype=np.float32)
    mt = Matches(xy1, xy2, conf).select(m)
    assert mt.conf.tolist() == [0, 2, 4] and mt.xy1.shape == (3, 2) and mt.xy2.shape == (3, 2)
    # x = 381 is inside a 384-wide image 2 only without the 3-px border
    assert not border_mask(np.array([[100, 100]]), np.array([[381, 100]]), (384, 512), (512, 384))[0]


def test_matches_select():
    xy = np.arange(10).reshape(5, 2)
    conf = np.array([0.5, 1.001, 1.0, 2.0, 1.0009], np.float32)
    m = Matches(xy, xy + 1, conf)
    xy1, xy2, cc = m.select(m.conf >= 1.001)  # unpacks like a tuple
    assert cc.tolist() == pytest.approx([1.001, 2.0]) and xy1.tolist() == [[2, 3], [6, 7]]
    assert xy2.tolist() == [[3, 4], [7, 8]] and m.num == 5
