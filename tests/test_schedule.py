"""schedule_pairs / count_encodings: a cache-friendly matching order, and the real cache follows the model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mast3r_colmap.matching.matcher import Matcher
from mast3r_colmap.matching.schedule import count_encodings, schedule_groups, schedule_pairs
from mast3r_colmap.pairs import exhaustive, pairs_from_similarity

from test_matcher import ImageDescriptorNetwork


def test_count_encodings_is_an_lru_simulation():
    pairs = [("a", "b"), ("c", "d"), ("a", "c")]
    # cap 2: a b | c (evicts a) d (evicts b) | a (evicts c) c (evicts d) -> 6 misses
    assert count_encodings(pairs, 2) == 6
    # cap 3: a b | c d (evicts a) | a (evicts b), c is a hit -> 5
    assert count_encodings(pairs, 3) == 5
    assert count_encodings(pairs, 4) == 4
    assert count_encodings([], 1) == 0
    with pytest.raises(ValueError, match="cache_size"):
        count_encodings(pairs, 0)
    with pytest.raises(ValueError, match="cache_size"):
        schedule_pairs(pairs, 0)


def _shuffled_band(n: int, width: int, seed: int = 0):
    """A banded pair graph (each image with its `width` successors along a hidden path), listed by name."""
    perm = np.random.default_rng(seed).permutation(n)
    names = [f"img{i:04d}" for i in range(n)]
    pairs = {tuple(sorted((names[perm[i]], names[perm[i + d]]))) for i in range(n) for d in range(1, width + 1)
             if i + d < n}
    return names, sorted(pairs)


def test_schedule_is_a_permutation_keeping_orientation_and_repeats():
    _, pairs = _shuffled_band(60, 3)
    pairs = pairs + [pairs[0], pairs[5][::-1]]  # a repeat and a reversed copy
    out = schedule_pairs(pairs, 8)
    assert Counter(out) == Counter(pairs)
    assert schedule_pairs(pairs[:1], 8) == pairs[:1] and schedule_pairs([], 8) == []


def test_banded_graph_is_encoded_once_per_image():
    """Shuffled names hide the path; sorted by name the cache thrashes, scheduled each image is encoded once."""
    names, pairs = _shuffled_band(300, 5)
    assert count_encodings(pairs, 32) > 1000
    out = schedule_pairs(pairs, 32)
    assert count_encodings(out, 32) == 300


def test_exhaustive_costs_about_n_squared_over_block():
    n, cap = 40, 8
    pairs = exhaustive([f"{i:02d}" for i in range(n)])
    given = count_encodings(pairs, cap)
    out = schedule_pairs(pairs, cap)
    # blocks of B images: each block's images once, plus every later image once per block
    b = cap // 2
    bound = n + sum(n - (a + 1) * b for a in range(n // b))
    assert count_encodings(out, cap) <= bound < given / 3


def test_never_worse_than_the_given_order():
    rng = np.random.default_rng(1)
    for trial in range(5):
        n = int(rng.integers(5, 80))
        names = [f"{i}" for i in range(n)]
        pairs = pairs_from_similarity(names, rng.random((n, n)), int(rng.integers(1, 6)))
        for cap in (2, 7, 30):
            assert count_encodings(schedule_pairs(pairs, cap), cap) <= count_encodings(pairs, cap)
    # an order that is already optimal is kept as it is
    seq = [(f"{i}", f"{i + 1}") for i in range(20)]
    assert schedule_pairs(seq, 4) == seq


@pytest.fixture(scope="module")
def six_images(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("six")
    for i in range(6):
        img = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((64, 48), Image.BICUBIC)
        img.save(folder / f"{i}.png")
    return [str(folder / f"{i}.png") for i in range(6)]


def test_the_matcher_cache_follows_the_model(six_images):
    """The real EncodingCache misses exactly as count_encodings predicts, in the given and the scheduled order."""
    pairs = exhaustive(six_images)
    scheduled = schedule_pairs(pairs, 4)
    assert (count_encodings(pairs, 4), count_encodings(scheduled, 4)) == (14, 9)
    for order in (pairs, scheduled):
        model = ImageDescriptorNetwork()
        matcher = Matcher(model, {"image_size": 64, "cache_size": 4, "batch_size": 1})
        assert matcher.cache_size == 4
        out = list(matcher.match_pairs(order))
        assert [(p.name0, p.name1) for p in out] == order
        assert matcher.encodings.misses == len(model.encoded) == count_encodings(order, 4)


def test_the_pipeline_matches_in_the_scheduled_order(six_images, tmp_path):
    from mast3r_colmap.pipeline import match_into_store
    from mast3r_colmap.store import MatchStore

    pairs = exhaustive(six_images)
    model = ImageDescriptorNetwork()
    matcher = Matcher(model, {"image_size": 64, "cache_size": 4, "batch_size": 1})
    with MatchStore(tmp_path / "m.sqlite", "k") as store:
        assert match_into_store(matcher, pairs, store, progress=False) == len(pairs)
        assert store.done_pairs() == {frozenset(p) for p in pairs}
    assert len(model.encoded) == count_encodings(schedule_pairs(pairs, 4), 4) == 9


def test_schedule_groups():
    """Query-like groups along a chain, listed out of order, come back in chain order; empty groups last."""
    names = [f"c{i:02d}" for i in range(23)]
    groups = {names[i]: [(names[i], names[i - 1]), (names[i], names[i + 1])] for i in range(1, 23, 2)}
    given = list(groups)[0::3] + list(groups)[1::3] + list(groups)[2::3]
    groups = {q: groups[q] for q in given}
    groups["lonely"] = []
    order = schedule_groups(groups, 4)
    assert order == [names[i] for i in range(1, 23, 2)] + ["lonely"]
    flat = lambda keys: [p for k in keys for p in groups[k]]  # noqa: E731
    assert (count_encodings(flat(groups), 4), count_encodings(flat(order), 4)) == (33, 23)
    # an order that is already best is kept
    assert schedule_groups({k: groups[k] for k in order}, 4) == order
    assert schedule_groups({}, 4) == []


def test_images_are_decoded_once_per_encoding(tmp_path, monkeypatch):
    """Exhaustive pairs of 20 images with a cache of 24: every image is decoded and encoded once."""
    import mast3r_colmap.matching.matcher as matcher_module

    rng = np.random.default_rng(2)
    names = []
    for i in range(20):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        names.append(f"{i}.png")
    pairs = exhaustive(names)
    decoded = []
    real_load = matcher_module.load_image
    monkeypatch.setattr(matcher_module, "load_image", lambda *a, **k: decoded.append(a[0]) or real_load(*a, **k))
    model = ImageDescriptorNetwork()
    matcher = Matcher(model, {"image_size": 64, "cache_size": 24, "batch_size": 1}, image_dir=tmp_path)
    assert len(list(matcher.match_pairs(pairs))) == len(pairs) == 190
    assert len(decoded) == len(model.encoded) == 20
