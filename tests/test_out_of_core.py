"""Out-of-core consolidation (``keypoints.consolidate_out_of_core``): bitwise the in-memory result, from lists and
match stores, with memory that follows the largest image, not the collection; and the pipeline's database."""

from __future__ import annotations

import gc
import shutil
import tracemalloc
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest

from mast3r_colmap.export import colmap_db, scores
from mast3r_colmap.keypoints import KeypointConfig, consolidate, consolidate_out_of_core
from mast3r_colmap.pipeline import PipelineConfig, default_store_path, reconstruct
from mast3r_colmap.shards import StoreChain
from mast3r_colmap.store import MatchStore, config_key
from mast3r_colmap.structures import PairMatches, SamplingGrid

import pycolmap  # noqa: E402  (after mast3r_colmap)

Pair = Tuple[str, str]


def _points(rng: np.random.Generator, n: int, grid) -> np.ndarray:
    """``n`` points in a 200x150 image: on ``grid`` (float32, as stored) or anywhere."""
    if grid is None:
        return rng.uniform(-0.5, 199.5, (n, 2)) * [1, 0.75]
    ij = np.stack([rng.integers(0, int(200 / grid.sx), n), rng.integers(0, int(150 / grid.sy), n)], 1)
    return (ij * [grid.sx, grid.sy] + [grid.ox, grid.oy]).astype(np.float32).astype(np.float64)


def random_input(seed: int, kind: str, n_images: int = 7, n_pairs: int = 14) -> List[PairMatches]:
    """Random pairs over ``n_images`` images: grids per image (``grid``), none (``none``) or a mix of grids,
    whole pixels and none (``mixed``); repeated and reversed copies with matches of their own, an empty copy,
    non-finite rows, negative and low scores, and points shared between pairs (so keypoints collect votes)."""
    rng = np.random.default_rng(seed)
    names = [f"im{i:02d}.png" for i in range(n_images)]
    grids = {n: SamplingGrid(0.3 + 0.1 * i, 0.2, 3.125, 2.5 + 0.25 * (i % 2)) for i, n in enumerate(names)}
    pool = {n: _points(rng, 60, grids[n] if kind != "none" else None) for n in names}
    out = []
    for k in range(n_pairs):
        a, b = (names[i] for i in rng.choice(n_images, 2, replace=False))
        if kind == "grid" or (kind == "mixed" and k % 3 == 0):
            ga, gb = grids[a], grids[b]
        elif kind == "mixed" and k % 3 == 1:
            ga = gb = SamplingGrid(0, 0, 1, 1)
        else:
            ga = gb = None
        n = int(rng.integers(0, 80))
        xa = np.where(rng.random((n, 1)) < 0.6, pool[a][rng.integers(0, 60, n)], _points(rng, n, ga))
        xb = np.where(rng.random((n, 1)) < 0.6, pool[b][rng.integers(0, 60, n)], _points(rng, n, gb))
        if ga is not None and ga.sx == 1:
            xa, xb = np.round(xa), np.round(xb)
        s = rng.choice([-0.5, 0.0, 0.2, 1.0, 2.0, 3.5], n).astype(np.float32)
        if n > 3:
            xa[1, 0] = np.nan
            s[2] = np.inf
        out.append(PairMatches(a, b, xa, xb, s, ga, gb))
    out.append(out[3].swapped())                               # the same matches again, reversed
    p = out[5]
    out.append(PairMatches(p.name1, p.name0, p.xy1[::2] + 0.25, p.xy0[::2], p.scores[::2] + 1))  # other matches
    out.append(PairMatches(p.name0, p.name1, np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), p.grid0, p.grid1))
    return out


def reader(pms: Sequence[PairMatches], seed: int = 0):
    """``read`` over a list: the asked positions in a shuffled order, each in a random orientation."""
    rng = np.random.default_rng(seed)

    def read(positions: List[int]):
        return [pms[i] if rng.random() < 0.5 else pms[i].swapped() for i in rng.permutation(positions)]
    return read


def assert_identical(ref, result) -> None:
    """Keypoints and matches bitwise equal, matches in the same order and orientation."""
    kps, matches = ref
    assert list(result.keypoints) == list(kps)
    for name, kp in kps.items():
        got = result.keypoints[name]
        assert got.keypoints.dtype == np.float64 and got.scores.dtype == np.float32
        np.testing.assert_array_equal(got.keypoints, kp.keypoints)
        np.testing.assert_array_equal(got.scores, kp.scores)
    for _ in range(2):                                          # read back as often as needed
        got = list(result.matches())
        assert [m.pair for m in got] == [m.pair for m in matches]
        for g, m in zip(got, matches):
            assert g.matches.dtype == np.int64 and g.scores.dtype == np.float32
            np.testing.assert_array_equal(g.matches, m.matches)
            np.testing.assert_array_equal(g.scores, m.scores)
    assert result.match_counts == [len(m) for m in matches]


@pytest.mark.parametrize("kind", ["grid", "none", "mixed"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_kps", [None, 40])
def test_identical_to_in_memory(kind, seed, max_kps, tmp_path):
    pms = random_input(seed, kind)
    conf = KeypointConfig(max_kps=max_kps, min_score=0.1 if seed else 0.0)
    pairs = [pm.pair for pm in pms]
    with consolidate_out_of_core(pairs, reader(pms, seed), conf, workdir=tmp_path) as result:
        assert_identical(consolidate(pms, conf), result)
        assert sorted(result.raw_counts) == sorted(len(pm) for pm in pms)
        folder = result.folder
        assert folder.parent == tmp_path and sorted(p.name for p in folder.iterdir()) == ["keypoints.bin",
                                                                                         "matches.bin"]
    assert not folder.exists()                                   # the scratch folder is gone


@pytest.mark.parametrize("kind", ["grid", "mixed"])
def test_fixed_and_unquantised_images(kind, tmp_path):
    pms = random_input(5, kind)
    names = sorted({n for pm in pms for n in pm.pair})
    rng = np.random.default_rng(3)
    fixed = {names[0]: rng.uniform(0, 150, (40, 2)), names[3]: np.zeros((0, 2)), "not-in-a-pair": np.ones((2, 2))}
    unq = {names[1], names[4]}
    conf = KeypointConfig(max_kps=30, max_error=6.0)
    pairs = [pm.pair for pm in pms]
    ref = consolidate(pms, conf, fixed=fixed, unquantized=unq)
    with consolidate_out_of_core(pairs, reader(pms), conf, fixed=fixed, unquantized=unq, workdir=tmp_path) as result:
        assert_identical(ref, result)
        assert result.fixed == {names[0], names[3]}
        assert list(result.keypoints.without(result.fixed)) == [n for n in names if n not in fixed]
        np.testing.assert_array_equal(result.keypoints[names[0]].keypoints, fixed[names[0]])


def test_bad_input_is_refused_and_leaves_nothing(tmp_path):
    pms = random_input(0, "grid")
    pairs = [pm.pair for pm in pms]
    with pytest.raises(ValueError, match="self-pair"):
        consolidate_out_of_core(pairs + [("a", "a")], reader(pms), workdir=tmp_path)
    with pytest.raises(ValueError, match="both fixed and unquantized"):
        consolidate_out_of_core(pairs, reader(pms), fixed={"a": np.zeros((1, 2))}, unquantized={"a"},
                                workdir=tmp_path)
    wrong = list(pms)
    wrong[2] = PairMatches("x", "y", np.zeros((1, 2)), np.zeros((1, 2)), [1.0])
    with pytest.raises(ValueError, match="for the pair"):
        consolidate_out_of_core(pairs, reader(wrong), workdir=tmp_path)

    def changing(positions, calls=[0]):                         # a source that changes between two reads
        calls[0] += 1
        return [PairMatches("a", "b", np.ones((calls[0], 2)), np.ones((calls[0], 2)), np.ones(calls[0]))]
    with pytest.raises(RuntimeError, match="read 1 then 2 matches"):
        consolidate_out_of_core([("b", "a")], changing, workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []                        # scratch folders removed on failure
    with consolidate_out_of_core([], reader([]), workdir=tmp_path) as empty:
        assert (dict(empty.keypoints), list(empty.matches())) == ({}, [])


def test_several_stores(tmp_path):
    """Pairs dealt over three match stores and read through a StoreChain, one pair held twice, pairs repeated
    and reversed in the list: the in-memory result of the same reads."""
    pms = random_input(7, "mixed")[:-3]                           # one copy per pair in a store
    pms = list({frozenset(pm.pair): pm for pm in pms}.values())
    stores = [MatchStore(tmp_path / f"s{i}.sqlite", "key") for i in range(3)]
    try:
        for i, pm in enumerate(pms):
            stores[i % 3].put(pm)
        stores[2].put(pms[0])
        pairs = [pm.pair for pm in pms] + [pms[4].pair[::-1], pms[1].pair]
        chain = StoreChain(stores)
        conf = KeypointConfig(max_kps=50)
        kps, matches = consolidate(chain.get_many(pairs), conf)   # pairs come store after store
        first: Dict[frozenset, int] = {}
        for i, pair in enumerate(pairs):
            first.setdefault(frozenset(pair), i)
        ref = (kps, sorted(matches, key=lambda m: first[frozenset(m.pair)]))
        with consolidate_out_of_core(pairs, lambda ix: chain.get_many([pairs[i] for i in ix]), conf,
                                     workdir=tmp_path) as result:
            assert_identical(ref, result)
    finally:
        for store in stores:
            store.close()


# ---- memory -----------------------------------------------------------------------------------------

def _ring(n_images: int, matches: int) -> Tuple[List[Pair], callable]:
    """A ring of images, each paired with its 4 next neighbours; matches made on demand (nothing is held)."""
    names = [f"{i:04d}.jpg" for i in range(n_images)]
    pairs = [(names[i], names[(i + d) % n_images]) for i in range(n_images) for d in (1, 2, 3, 4)]
    grid = SamplingGrid(1.0, 1.0, 3.125, 3.125)

    def read(positions):
        for i in positions:
            rng = np.random.default_rng(i)
            xy = [(rng.integers(0, 200, (matches, 2)) * 3.125 + 1.0).astype(np.float32) for _ in range(2)]
            yield PairMatches(*pairs[i], xy[0], xy[1], rng.uniform(0.1, 1, matches), grid, grid)
    return pairs, read


def _peak(run) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_follows_the_largest_image_not_the_collection(tmp_path):
    conf = KeypointConfig(max_kps=2000)
    peaks = {}
    for n in (12, 48):
        pairs, read = _ring(n, 4000)
        peaks["ooc", n] = _peak(lambda: consolidate_out_of_core(pairs, read, conf, workdir=tmp_path).close())
        peaks["mem", n] = _peak(lambda: consolidate(read(range(len(pairs))), conf))
    # in memory: ~36 bytes per raw match of the collection (4 x 48 x 4000 matches: 28 MB at 48 images; 32 MB
    # measured, 11 MB at 12 images)
    assert peaks["mem", 48] > 2.5 * peaks["mem", 12], peaks
    # out of core: one image's 8 pairs at a time, whatever the number of images (5.2 MB measured for both)
    assert peaks["ooc", 48] < 1.1 * peaks["ooc", 12], peaks
    assert peaks["ooc", 48] < peaks["mem", 48] / 4, peaks


# ---- the pipeline's database ----------------------------------------------------------------------------

def _content(path: Path) -> Dict[str, bytes]:
    """Keypoints, matches and their scores of a database, as bytes."""
    out = {}
    with pycolmap.Database.open(str(path)) as db:
        names = {im.image_id: im.name for im in db.read_all_images()}
        for image_id, name in names.items():
            out[f"kp:{name}"] = np.asarray(db.read_keypoints(image_id)).tobytes()
        pair_ids, _ = db.read_num_matches()
        for pid in pair_ids:
            i, j = (int(v) for v in pycolmap.pair_id_to_image_pair(int(pid)))
            out[f"m:{names[i]}|{names[j]}"] = np.asarray(db.read_matches(i, j)).tobytes()
    for key, value in scores.read_keypoint_scores(path, names).items():
        out[f"kps:{key}"] = value.tobytes()
    for key, value in scores.read_match_scores(path, [int(p) for p in pair_ids]).items():
        out[f"ms:{key}"] = value.tobytes()
    return out


def test_pipeline_database_is_the_in_memory_one(tmp_path):
    """A run (through the out-of-core path) writes the keypoints, matches and scores that in-memory
    consolidation of its match store writes; its scratch folder is gone afterwards."""
    from mast3r_colmap.matching.matcher import Matcher
    from mast3r_colmap.testing.synthetic import SyntheticNetwork, SyntheticScene

    pycolmap.logging.minloglevel = 2
    scene = SyntheticScene.make(num_cameras=3, image_size=(256, 192), seed=2, kind="planes")
    scene.write_images(tmp_path / "images")
    matcher = Matcher(SyntheticNetwork(scene), {"image_size": 256, "batch_size": 1}, image_dir=tmp_path / "images")
    config = PipelineConfig(pairs="exhaustive", camera_model="PINHOLE", mapper="none", progress=False,
                            keypoints=KeypointConfig(max_kps=300))
    run_db = tmp_path / "run.db"
    reconstruct(tmp_path / "images", run_db, matcher, config)
    assert not any("consolidation" in p.name for p in tmp_path.iterdir())

    # the same database filled by the in-memory route of earlier versions
    mem_db = tmp_path / "mem.db"
    shutil.copy(run_db, mem_db)
    with pycolmap.Database.open(str(mem_db)) as db:
        db.clear_matches()
        db.clear_two_view_geometries()
        db.clear_keypoints()
        ids = {im.name: im.image_id for im in db.read_all_images()}
    pairs = [(a, b) for i, a in enumerate(sorted(ids)) for b in sorted(ids)[i + 1:]]
    with MatchStore(default_store_path(run_db), config_key(matcher.settings()), tmp_path / "images",
                    read_only=True) as store:
        kps, matches = consolidate(store.get_many(pairs), config.keypoints)
    colmap_db.write_features_and_matches(mem_db, ids, kps, matches)
    scores.record(mem_db, ids, kps, matches)
    expected, got = _content(mem_db), _content(run_db)
    assert sum(k.startswith("m:") for k in got) == len(pairs) and sum(k.startswith("ms:") for k in got) == len(pairs)
    assert got == expected
