"""Tests for mast3r_colmap.pairs: pair strategies, hloc pairs files, top-k retrieval and the MASt3R-SfM graph."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mast3r_colmap import pairs as P
from mast3r_colmap.pairs import (
    exhaustive,
    farthest_point_sampling,
    mast3r_sfm_graph,
    pairs_from_descriptors,
    pairs_from_spec,
    read_pairs,
    retrieval_graph,
    sequential,
    topk_neighbors,
    write_pairs,
)

NAMES5 = ["a", "b", "c", "d", "e"]


def names_n(n: int) -> list[str]:
    return [f"seq/img_{i:04d}.jpg" for i in range(n)]


def assert_canonical(pairs, names):
    """Unordered, unique, no self pairs, (i < j) orientation, sorted by (i, j)."""
    index = {n: i for i, n in enumerate(names)}
    idx = [(index[a], index[b]) for a, b in pairs]
    assert all(i < j for i, j in idx), "pairs must be (earlier, later) in list order"
    assert idx == sorted(set(idx)), "pairs must be unique and sorted by (i, j)"


def clustered_descriptors(n_clusters=4, per_cluster=8, dim=64, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    x = centers[labels] + noise * rng.normal(size=(len(labels), dim))
    perm = rng.permutation(len(labels))  # interleave clusters in the name list
    return x[perm].astype(np.float32), labels[perm]


# ----------------------------------------------------------------------------------------- exhaustive

def test_exhaustive_exact_small():
    assert exhaustive(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 30])
def test_exhaustive_counts(n):
    names = names_n(n)
    pairs = exhaustive(names)
    assert len(pairs) == n * (n - 1) // 2
    assert_canonical(pairs, names)


def test_duplicate_or_non_string_names_rejected():
    with pytest.raises(ValueError, match="unique.*'b'"):
        exhaustive(["a", "b", "b"])
    with pytest.raises(ValueError, match="strings"):
        exhaustive(["a", 3])


# ----------------------------------------------------------------------------------------- sequential

def test_sequential_exact_small():
    assert sequential(NAMES5, window=2) == [
        ("a", "b"), ("a", "c"), ("b", "c"), ("b", "d"), ("c", "d"), ("c", "e"), ("d", "e")]
    assert sequential(NAMES5, window=1, loop_closure=True) == [
        ("a", "b"), ("a", "e"), ("b", "c"), ("c", "d"), ("d", "e")]
    assert sequential(NAMES5, window=2, loop_closure=True) == exhaustive(NAMES5)


@pytest.mark.parametrize("n,w,loop,expected", [
    (10, 1, False, 9),
    (10, 3, False, 9 + 8 + 7),
    (10, 3, True, 3 * 10),           # cyclic distance 1..3, N pairs each
    (6, 3, True, 6 + 6 + 3),         # distance 3 = N/2: each pair reached from both ends
    (6, 2, True, 12),
    (5, 10, False, 10),              # window clipped: exhaustive
    (5, 10, True, 10),
    (2, 1, True, 1),                 # (0, 1) and (1, 0) collapse
    (1, 3, True, 0),
    (0, 3, False, 0),
])
def test_sequential_counts(n, w, loop, expected):
    names = names_n(n)
    pairs = sequential(names, window=w, loop_closure=loop)
    assert len(pairs) == expected
    assert_canonical(pairs, names)
    index = {nm: i for i, nm in enumerate(names)}
    for a, b in pairs:
        d = index[b] - index[a]
        assert (min(d, n - d) if loop else d) <= w


def test_sequential_log_offsets():
    # offsets {1} U {1, 2, 4, 8}: 9 + 8 + 6 + 2 pairs
    names = names_n(10)
    pairs = sequential(names, window=1, log_offsets=True)
    assert len(pairs) == 25
    assert_canonical(pairs, names)
    # cyclic, N = 8: offsets {1, 2, 4}: 8 + 8 + 4
    assert len(sequential(names_n(8), window=1, loop_closure=True, log_offsets=True)) == 20
    # offsets inside the window add nothing
    assert sequential(names, window=8, log_offsets=True) == sequential(names, window=8)


@pytest.mark.parametrize("w", [0, -1, 1.5, "3", True])
def test_sequential_bad_window(w):
    with pytest.raises(ValueError, match="window"):
        sequential(NAMES5, window=w)


# ----------------------------------------------------------------------------------------- pairs files

def test_pairs_file_round_trip(tmp_path):
    names = ["db/1045.jpg", "query/night/nexus5x/IMG_1.jpg", "sequences/s6/0073.png", "x.jpg"]
    pairs = exhaustive(names)
    path = tmp_path / "pairs.txt"
    write_pairs(path, pairs)
    raw = path.read_bytes()
    assert not raw.endswith(b"\n"), "hloc writes no trailing newline"
    assert raw.decode() == "\n".join(f"{a} {b}" for a, b in pairs)
    assert read_pairs(path) == pairs


def test_write_empty_and_read_empty(tmp_path):
    path = tmp_path / "empty.txt"
    write_pairs(path, [])
    assert path.read_bytes() == b""
    assert read_pairs(path) == []


def test_read_tolerates_comments_blank_lines_and_whitespace(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("# header comment\n\n  a.jpg b.jpg  \r\n\t\nb.jpg\tc.jpg\n   # indented comment\n"
                    "c.jpg a.jpg   \n\n", encoding="utf-8")
    assert read_pairs(path) == [("a.jpg", "b.jpg"), ("b.jpg", "c.jpg"), ("c.jpg", "a.jpg")]


def test_read_dedupe(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("a b\nb a\na c\na b\nc c\nc b", encoding="utf-8")
    assert read_pairs(path) == [("a", "b"), ("b", "a"), ("a", "c"), ("a", "b"), ("c", "c"), ("c", "b")]
    assert read_pairs(path, dedupe=True) == [("a", "b"), ("a", "c"), ("c", "b")]


@pytest.mark.parametrize("bad", ["a.jpg", "a.jpg b.jpg c.jpg", "a.jpg, b.jpg, 1.0"])
def test_read_malformed_line(tmp_path, bad):
    path = tmp_path / "pairs.txt"
    path.write_text(f"# comment\nx y\n{bad}\nz w", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs\.txt:3:.*name0 name1"):
        read_pairs(path)


@pytest.mark.parametrize("pair", [("a b", "c"), ("a", ""), ("a\tb", "c"), ("a", "b\n"), ("a",)])
def test_write_rejects_bad_names(tmp_path, pair):
    with pytest.raises(ValueError, match="pair #1"):
        write_pairs(tmp_path / "p.txt", [("x", "y"), pair])


# ----------------------------------------------------------------------------------------- retrieval

def test_retrieval_exact_small():
    ang = np.deg2rad([0, 10, 25, 90, 100])
    desc = np.stack([np.cos(ang), np.sin(ang)], 1)
    # top-1: a->b, b->a, c->b, d->e, e->d
    assert pairs_from_descriptors(NAMES5, desc, k=1) == [("a", "b"), ("b", "c"), ("d", "e")]
    # scale does not matter (cosine)
    assert pairs_from_descriptors(NAMES5, desc * np.array([[1], [5], [0.1], [3], [2]]), k=1) == \
        [("a", "b"), ("b", "c"), ("d", "e")]


def test_retrieval_neighbours_stay_in_cluster():
    desc, labels = clustered_descriptors(n_clusters=4, per_cluster=8)
    nn = topk_neighbors(desc, k=5)
    assert nn.shape == (32, 5)
    assert (labels[nn] == labels[:, None]).all()
    assert (nn != np.arange(32)[:, None]).all()
    names = names_n(32)
    pairs = pairs_from_descriptors(names, desc, k=5)
    assert_canonical(pairs, names)
    index = {n: i for i, n in enumerate(names)}
    assert all(labels[index[a]] == labels[index[b]] for a, b in pairs)
    assert {n for p in pairs for n in p} == set(names)


def test_retrieval_ties_to_lower_index_and_clipping():
    desc = np.ones((4, 3))
    desc[3] = [1, 0, 0]
    nn = topk_neighbors(desc, k=2)
    assert nn.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1]]
    # k >= N: clipped to N - 1, which gives every pair
    names = ["a", "b", "c", "d"]
    assert pairs_from_descriptors(names, desc, k=10) == exhaustive(names)
    assert topk_neighbors(desc, k=10).shape == (4, 3)
    assert pairs_from_descriptors(["a"], desc[:1], k=3) == []
    assert pairs_from_descriptors([], np.zeros((0, 3)), k=3) == []


@pytest.mark.parametrize("case", ["gaussian", "ties", "clusters"])
def test_topk_equals_brute_force(case):
    """The float32 candidate search never drops one of the exact (float64) top-k, ties to the lower index."""
    rng = np.random.default_rng(1)
    if case == "gaussian":
        desc = rng.normal(size=(400, 96)).astype(np.float32)
    elif case == "ties":  # few distinct directions: lots of exact ties and duplicates
        desc = rng.integers(0, 2, size=(300, 4)).astype(np.float32)
        desc[:, 0] += 1
    else:
        desc, _ = clustered_descriptors(n_clusters=10, per_cluster=30, dim=128, noise=0.3, seed=2)
    x = desc.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    for k in (1, 5, 20):
        ref = []
        for i in range(n):
            others = np.delete(np.arange(n), i)
            score = (x[others] * x[i]).sum(axis=1)  # the same per-pair float64 sums as the ranking
            ref.append(others[np.lexsort((others, -score))[:k]])
        np.testing.assert_array_equal(topk_neighbors(desc, k), np.stack(ref))


def test_retrieval_errors():
    with pytest.raises(ValueError, match="k must be"):
        pairs_from_descriptors(NAMES5, np.ones((5, 4)), k=0)
    with pytest.raises(ValueError, match="4 global descriptors for 5 images"):
        pairs_from_descriptors(NAMES5, np.ones((4, 4)), k=2)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        pairs_from_descriptors(NAMES5, np.ones(5), k=2)
    bad = np.ones((5, 4))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pairs_from_descriptors(NAMES5, bad, k=2)


# ----------------------------------------------------------------------------------------- MASt3R-SfM graph

def line_similarity(pos):
    pos = np.asarray(pos, dtype=np.float64)
    return 1.0 - np.abs(pos[:, None] - pos[None, :]) / 20.0


def test_sfm_graph_hand_checked():
    sim = line_similarity([0, 1, 2, 10, 11])
    # start 0 -> FPS picks 4 (farthest); keys {0, 4}: (0, 4)
    assert farthest_point_sampling(1 - sim, 2, 0) == [0, 4]
    # non-keys to nearest key: (0, 1), (0, 2), (3, 4)
    # argsort(dist[i])[:2] minus self: 0->1, 1->0 (tie with 2, lower index), 2->1, 3->4, 4->3
    assert mast3r_sfm_graph(sim, n_keys=2, k=2, start=0) == [(0, 1), (0, 2), (0, 4), (1, 2), (3, 4)]
    # from the other end: keys {4, 0}, same graph
    assert mast3r_sfm_graph(sim, n_keys=2, k=2, start=4) == [(0, 1), (0, 2), (0, 4), (1, 2), (3, 4)]
    # k = 1 only yields the image itself: keys + links only
    assert mast3r_sfm_graph(sim, n_keys=2, k=1, start=0) == [(0, 1), (0, 2), (0, 4), (3, 4)]
    # start 1: FPS picks 4, keys {1, 4}
    assert mast3r_sfm_graph(sim, n_keys=2, k=0, start=1) == [(0, 1), (1, 2), (1, 4), (3, 4)]


def test_sfm_graph_seed_and_determinism():
    desc, _ = clustered_descriptors(n_clusters=5, per_cluster=6, dim=32, noise=0.2, seed=3)
    x = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    n = len(sim)
    for seed in (0, 1, 7):
        start = int(np.random.default_rng(seed).integers(n))
        g = mast3r_sfm_graph(sim, n_keys=5, k=3, seed=seed)
        assert g == mast3r_sfm_graph(sim, n_keys=5, k=3, seed=seed)
        assert g == mast3r_sfm_graph(sim, n_keys=5, k=3, start=start)


@pytest.mark.parametrize("n_keys,k", [(1, 1), (3, 2), (5, 4), (8, 10)])
def test_sfm_graph_properties(n_keys, k):
    desc, _ = clustered_descriptors(n_clusters=5, per_cluster=6, dim=32, noise=0.2, seed=4)
    x = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    n = len(sim)
    start = int(np.random.default_rng(0).integers(n))
    g = mast3r_sfm_graph(sim, n_keys=n_keys, k=k, seed=0)
    assert g == sorted(set(g)) and all(i < j for i, j in g)
    edges = set(g)
    keys = farthest_point_sampling(1 - sim, n_keys, start)
    assert len(set(keys)) == n_keys
    for a, b in itertools.combinations(sorted(keys), 2):
        assert (a, b) in edges
    degree = np.zeros(n, int)
    for i, j in edges:
        degree[i] += 1
        degree[j] += 1
    assert (degree >= 1).all()
    # every non-key is linked to its nearest key
    for i in set(range(n)) - set(keys):
        nearest = min(keys, key=lambda q: (1 - sim[i, q], q))
        assert (min(i, nearest), max(i, nearest)) in edges


def test_sfm_graph_clipping_and_errors():
    sim = line_similarity([0, 1, 2, 10])
    # n_keys > N: every image is a key -> complete graph
    assert mast3r_sfm_graph(sim, n_keys=50, k=1) == list(itertools.combinations(range(4), 2))
    assert mast3r_sfm_graph(sim, n_keys=2, k=99, start=0) == list(itertools.combinations(range(4), 2))
    assert mast3r_sfm_graph(np.ones((1, 1)), n_keys=2, k=2) == []
    with pytest.raises(ValueError, match="square"):
        mast3r_sfm_graph(np.ones((3, 4)), n_keys=2, k=2)
    with pytest.raises(ValueError, match="n_keys"):
        mast3r_sfm_graph(sim, n_keys=0, k=2)
    with pytest.raises(ValueError, match="k must be"):
        mast3r_sfm_graph(sim, n_keys=2, k=-1)
    with pytest.raises(ValueError, match="start"):
        mast3r_sfm_graph(sim, n_keys=2, k=2, start=4)


def test_retrieval_graph_names():
    desc, _ = clustered_descriptors(n_clusters=3, per_cluster=5, dim=16, seed=5)
    names = names_n(15)
    pairs = retrieval_graph(names, desc, n_keys=3, k=3, seed=0)
    assert_canonical(pairs, names)
    x = desc.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert pairs == [(names[i], names[j]) for i, j in mast3r_sfm_graph(x @ x.T, 3, 3, seed=0)]


# ----------------------------------------------------------------------------------------- pairs_from_spec

def test_spec_strategies():
    names = names_n(12)
    assert pairs_from_spec("exhaustive", names) == exhaustive(names)
    assert pairs_from_spec("sequential:3", names) == sequential(names, 3)
    assert pairs_from_spec("sequential:3:loop", names) == sequential(names, 3, loop_closure=True)
    assert pairs_from_spec(" Sequential:2 ", names) == sequential(names, 2)


def test_spec_retrieval_calls_descriptors_fn():
    desc, _ = clustered_descriptors(n_clusters=3, per_cluster=4, dim=16, seed=6)
    names = names_n(12)
    calls = []

    def fn(ns):
        calls.append(list(ns))
        return desc

    assert pairs_from_spec("retrieval:3", names, fn) == pairs_from_descriptors(names, desc, 3)
    assert pairs_from_spec("retrieval:4,3", names, fn, seed=2) == retrieval_graph(names, desc, 4, 3, seed=2)
    assert calls == [names, names]
    assert pairs_from_spec("retrieval:3", ["only.jpg"], fn) == []
    assert len(calls) == 2  # not called for fewer than 2 images


def test_spec_pairs_file(tmp_path):
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    path = tmp_path / "pairs.txt"
    path.write_text("# mine\nc.jpg a.jpg\na.jpg c.jpg\nd.jpg b.jpg\n\nb.jpg b.jpg\na.jpg b.jpg", encoding="utf-8")
    assert pairs_from_spec(str(path), names) == [("a.jpg", "b.jpg"), ("a.jpg", "c.jpg"), ("b.jpg", "d.jpg")]
    path.write_text("a.jpg x1.jpg\nx2.jpg b.jpg\nx3.jpg x4.jpg\nx5.jpg x6.jpg\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"6 image name\(s\) not among the 4 images.*x1\.jpg.*and 1 more"):
        pairs_from_spec(str(path), names)


@pytest.mark.parametrize("spec,match", [
    ("sequential:0", "window W must be an integer >= 1"),
    ("sequential:abc", "window W must be an integer"),
    ("sequential:-2", "window W must be an integer"),
    ("sequential", "expected 'sequential:W'"),
    ("sequential:3:ring", "unknown sequential option"),
    ("sequential:3:loop:x", "expected 'sequential:W'"),
    ("retrieval:abc", "K must be an integer"),
    ("retrieval:0", "K must be an integer >= 1"),
    ("retrieval:", "expected 'retrieval:K'"),
    ("retrieval:5,x", "K must be an integer"),
    ("retrieval:x,5", "Na must be an integer"),
    ("retrieval:1,2,3", "expected 'retrieval:K'"),
    ("exhaustive:2", "takes no argument"),
    ("cosine:5", "unknown pairs strategy or missing pairs file"),
    ("no/such/pairs.txt", "unknown pairs strategy or missing pairs file"),
    ("", "empty pairs spec"),
])
def test_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        pairs_from_spec(spec, NAMES5, descriptors_fn=lambda ns: np.eye(len(ns)))


def test_spec_retrieval_needs_descriptors_fn():
    with pytest.raises(ValueError, match="no descriptors_fn"):
        pairs_from_spec("retrieval:3", NAMES5)
    with pytest.raises(ValueError, match="no descriptors_fn"):
        pairs_from_spec("retrieval:2,3", NAMES5)


def test_public_api():
    for name in P.__all__:
        assert hasattr(P, name), name
