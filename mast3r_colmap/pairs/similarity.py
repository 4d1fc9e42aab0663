"""Pairs from image similarity: each image's top-k, or MASt3R-SfM's ``retrieval-Na-k`` graph.

The similarity is either the cosine of global descriptors (:func:`pairs_from_descriptors`,
:func:`retrieval_graph`; e.g. the GeM-pooled encoder tokens of :meth:`Matcher.global_descriptors`) or a
given ``(N, N)`` matrix (:func:`pairs_from_similarity`; e.g. ASMK scores of :mod:`mast3r_colmap.retrieval`).
Ties go to the lower image index everywhere, so the pairs are deterministic.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from .common import Pair, canonical, check_count, check_names, named

__all__ = [
    "topk_neighbors",
    "pairs_from_descriptors",
    "farthest_point_sampling",
    "mast3r_sfm_graph",
    "retrieval_graph",
    "pairs_from_similarity",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# top-k by the cosine of global descriptors

def _normalized(descriptors: np.ndarray | torch.Tensor, n: int | None = None) -> np.ndarray:
    if isinstance(descriptors, torch.Tensor):
        descriptors = descriptors.detach().cpu().numpy()
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"global descriptors must be an (N, D) array, got shape {x.shape}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"got {x.shape[0]} global descriptors for {n} images")
    if x.shape[1] < 1 and x.shape[0] > 0:
        raise ValueError("global descriptors have dimension 0")
    if not np.isfinite(x).all():
        raise ValueError("global descriptors contain NaN or inf")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norm, 1e-12))



def _rank(x: np.ndarray, i: int, cand: np.ndarray, k: int) -> np.ndarray:
    """The k best candidates of query i by exact float64 cosine, ties to the lower index.

    The score is an elementwise product summed along the contiguous axis, so each value depends only on
    the two vectors (not on BLAS blocking or on which other candidates are present).
    """
    s = (x[cand] * x[i]).sum(axis=1)
    order = np.lexsort((cand, -s))
    return cand[order[:k]]


def _candidates(x: np.ndarray, k: int, chunk: int = 1024) -> list[np.ndarray]:
    """Per image, the other images whose float32 cosine is within a rounding margin of its k-th best.

    Float32 inner products of unit vectors are off by at most ~D * eps32; twice that (plus slack) keeps
    every image tied with or above the exact k-th score, so :func:`_rank` then gives the exact top-k.

    One exact search in float32 blocks (``chunk`` queries at a time). Measured on one CPU core (D = 1024,
    k = 20, clustered descriptors), :func:`topk_neighbors` in all: 1k images 0.06 s, 5k 0.70 s, 10k 2.3 s;
    with faiss IndexFlatIP candidates 0.07 / 0.61 / 2.0 s, with float64 numpy candidates 0.05 / 1.1 / 4.4 s;
    identical results. So faiss is not used.
    """
    xf = np.ascontiguousarray(x, dtype=np.float32)
    n, d = xf.shape
    margin = 1e-6 + 4.0 * (d + 2) * float(np.finfo(np.float32).eps)
    out: list[np.ndarray] = []
    for start in range(0, n, chunk):
        sims = xf[start:start + chunk] @ xf.T
        rows = np.arange(sims.shape[0])
        sims[rows, rows + start] = -np.inf
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        for r in rows:
            out.append(np.flatnonzero(sims[r] >= kth[r] - margin))
    return out


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """:func:`topk_neighbors` of L2-normalised descriptors, ``k >= 1`` not yet clipped."""
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64)
    return np.stack([_rank(x, i, c, k) for i, c in enumerate(_candidates(x, k))]).astype(np.int64)


def topk_neighbors(global_descriptors: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Indices ``(N, min(k, N - 1))`` of each image's most similar *other* images, best first.

    Similarity is the cosine (descriptors L2-normalised, dot product), computed exactly in float64 for
    the ranking. Ties go to the lower index.
    """
    k = check_count(k, "retrieval k")
    return _topk(_normalized(global_descriptors), k)


def pairs_from_descriptors(names: Sequence[str], global_descriptors: np.ndarray | torch.Tensor,
                           k: int) -> list[Pair]:
    """Each image with its top-``k`` most similar other images (cosine), as unordered unique pairs.

    See :func:`topk_neighbors` for the similarity and the tie-breaking. ``k`` is clipped to ``N - 1``.
    """
    names = check_names(names)
    k = check_count(k, "retrieval k")
    if len(names) < 2:
        return []
    nn = _topk(_normalized(global_descriptors, len(names)), k)
    pairs = named(names, ((i, int(j)) for i in range(len(names)) for j in nn[i]))
    logger.debug("pairs_from_descriptors(k=%d): %d images -> %d pairs", k, len(names), len(pairs))
    return pairs


# --------------------------------------------------------------------------------------------------------
# MASt3R-SfM retrieval graph, and pairs from a given similarity

def _similarity(sim: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(sim, torch.Tensor):
        sim = sim.detach().cpu().numpy()
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square (N, N) matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity contains NaN or inf")
    return s


def farthest_point_sampling(dist: np.ndarray, n: int, start: int) -> list[int]:
    """Greedy farthest-point sampling of ``n`` indices from ``start``, in selection order.

    The distance of a candidate ``j`` to the selected set is ``min_s dist[s, j]``; the next index is the
    candidate maximising it (``np.argmax``: ties to the lower index). ``n`` is clipped to ``N``.
    """
    dist = np.asarray(dist, dtype=np.float64)
    total = dist.shape[0]
    n = min(int(n), total)
    if n < 1:
        return []
    selected = [int(start)]
    chosen = np.zeros(total, dtype=bool)
    chosen[start] = True
    d_min = dist[start].copy()
    while len(selected) < n:
        cand = np.where(chosen, -np.inf, d_min)
        nxt = int(np.argmax(cand))
        selected.append(nxt)
        chosen[nxt] = True
        d_min = np.minimum(d_min, dist[nxt])
    return selected


def mast3r_sfm_graph(similarity: np.ndarray | torch.Tensor, n_keys: int, k: int, seed: int = 0,
                     start: int | None = None) -> list[tuple[int, int]]:
    """The MASt3R-SfM ``retrieval-Na-k`` scene graph (``make_pairs_fps``) as sorted index pairs.

    1. ``dist = 1 - similarity``.
    2. Farthest-point sampling of ``n_keys`` key images (:func:`farthest_point_sampling`) from
       ``start``, by default ``int(np.random.default_rng(seed).integers(N))`` (deterministic, unlike the
       official unseeded ``np.random.choice``).
    3. The key images form a complete graph.
    4. Each non-key image is linked to its nearest key (``argmin dist[i, key]``, ties to the lower index).
    5. Each image ``i`` is linked to ``argsort(dist[i], stable)[:k]``, skipping ``i`` itself (as in the
       official code ``i`` is usually among them, so about ``k - 1`` neighbours are added).

    Returns unique ``(i, j)`` pairs, ``i < j``, sorted. ``n_keys`` and ``k`` are clipped to ``N``.
    """
    sim = _similarity(similarity)
    n = sim.shape[0]
    n_keys = check_count(n_keys, "n_keys")
    k = check_count(k, "k", minimum=0)
    if n < 2:
        return []
    if start is None:
        start = int(np.random.default_rng(seed).integers(n))
    elif not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    dist = 1.0 - sim
    keys = farthest_point_sampling(dist, n_keys, start)
    key_arr = np.array(sorted(keys), dtype=np.int64)
    idx: list[tuple[int, int]] = [(a, b) for a in keys for b in keys]
    is_key = np.zeros(n, dtype=bool)
    is_key[key_arr] = True
    for i in np.flatnonzero(~is_key):
        idx.append((int(i), int(key_arr[np.argmin(dist[i, key_arr])])))
    k = min(k, n)
    for i in range(n):
        for j in np.argsort(dist[i], kind="stable")[:k]:
            idx.append((i, int(j)))
    pairs = canonical(idx)
    logger.debug("mast3r_sfm_graph(n_keys=%d, k=%d, start=%d): %d images -> %d pairs",
                 len(keys), k, start, n, len(pairs))
    return pairs


def retrieval_graph(names: Sequence[str], global_descriptors: np.ndarray | torch.Tensor, n_keys: int,
                    k: int, seed: int = 0) -> list[Pair]:
    """:func:`mast3r_sfm_graph` on the cosine similarity of global descriptors, as name pairs."""
    names = check_names(names)
    if len(names) < 2:
        return []
    x = _normalized(global_descriptors, len(names))
    return [(names[i], names[j]) for i, j in mast3r_sfm_graph(x @ x.T, n_keys, k, seed=seed)]


def pairs_from_similarity(names: Sequence[str], similarity: np.ndarray | torch.Tensor, k: int,
                          n_keys: int | None = None, seed: int = 0) -> list[Pair]:
    """Pairs from an ``(N, N)`` image similarity (rows are queries; it need not be symmetric).

    * ``n_keys=None``: each image ``i`` with its ``k`` most similar other images (``similarity[i]``
      descending, ties to the lower index), as unordered unique pairs (``k`` clipped to ``N - 1``);
    * otherwise :func:`mast3r_sfm_graph` (MASt3R-SfM ``retrieval-Na-k``, deterministic with ``seed``).
    """
    names = check_names(names)
    k = check_count(k, "retrieval k")
    sim = _similarity(similarity)
    n = len(names)
    if sim.shape[0] != n:
        raise ValueError(f"got a {sim.shape[0]}x{sim.shape[1]} similarity for {n} images")
    if n < 2:
        return []
    if n_keys is not None:
        return [(names[i], names[j]) for i, j in mast3r_sfm_graph(sim, n_keys, k, seed=seed)]
    kk = min(k, n - 1)
    idx: list[tuple[int, int]] = []
    cols = np.arange(n)
    for i in range(n):
        others = cols[cols != i]
        order = np.lexsort((others, -sim[i, others]))
        idx.extend((i, int(j)) for j in others[order[:kk]])
    pairs = named(names, idx)
    logger.debug("pairs_from_similarity(k=%d): %d images -> %d pairs", kk, n, len(pairs))
    return pairs

