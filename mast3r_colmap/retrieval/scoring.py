"""ASMK scoring of images by their local retrieval descriptors, as MASt3R-SfM's Retriever does it.

Binary kernel with MASt3R-SfM's asmk parameters: each descriptor is assigned to its nearest visual words
(exact L2; multiple assignment 1 for the database and 5 for the queries, one search serving both), the
residuals are summed per visual word and binarised by sign, the word similarity ``1 - 2 * hamming / bits``
is kept when >= 0 and raised to the power 3, and the image score is summed over shared words and divided
by ``sqrt(#words)`` of both images. Every image queries the database of all images, giving an ``N x N``
similarity (rows are queries).

The steps are numpy, the word assignment torch (on CUDA when available). The scores equal those of the
MIT-licensed ``asmk`` package within float rounding (``tests/test_retrieval.py`` compares them, with
:mod:`mast3r_colmap.testing.asmk_reference`), and are computed about 1.7x faster, since the words are
assigned with one search instead of two.
"""

from __future__ import annotations

import logging
import math
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..model.checkpoint import resolve_device

__all__ = ["asmk_similarity"]

logger = logging.getLogger(__name__)


def _check_features(features: Sequence[np.ndarray], centroids: np.ndarray) -> List[np.ndarray]:
    out = []
    for i, f in enumerate(features):
        f = np.asarray(f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f)
        if f.ndim != 2 or f.shape[1] != centroids.shape[1] or len(f) == 0:
            raise ValueError(f"image {i}: local features must be a non-empty (n, {centroids.shape[1]}) array, "
                             f"got shape {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError(f"image {i}: local features contain NaN or inf")
        out.append(np.ascontiguousarray(f, dtype=np.float32))
    return out



def _nearest_words(x: np.ndarray, centroids: np.ndarray, k: int, device: torch.device,
                   tile_elems: int = 2 ** 25) -> np.ndarray:
    """Indices (n, k) of the k nearest centroids of each row of ``x`` (L2), nearest first.

    Ranks ``||c||^2 - 2 x.c`` in float32 (``||x||^2`` is the same for every word), ``tile_elems``
    distances at a time. It replaced faiss ``IndexFlatL2`` with the same indices and about the same speed
    (one CPU core, D = 1024, k = 5, ``benchmarks/bench_retrieval.py --faiss``: 1500 queries among 65536
    words 1.78 s vs 1.57 s for faiss, 3000 among 16384 words 2.1 s vs 2.0 s; the matrix product is 88 % of
    the time). Per image (300 features, 65536 words) that is 0.36 s, next to 13 s for the encoder.
    """
    c = torch.from_numpy(centroids).to(device)
    c_sq = (c * c).sum(dim=1)
    rows = max(1, tile_elems // len(c))
    out = np.empty((len(x), k), dtype=np.int64)
    with torch.inference_mode():
        for s in range(0, len(x), rows):
            dist = torch.addmm(c_sq, torch.from_numpy(x[s:s + rows]).to(device), c.T, alpha=-2)
            out[s:s + rows] = torch.topk(dist, k, dim=1, largest=False).indices.cpu().numpy()
    return out


if hasattr(np, "bitwise_count"):
    def _popcount(a: np.ndarray) -> np.ndarray:
        return np.bitwise_count(a)
else:  # numpy < 2.0
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(a: np.ndarray) -> np.ndarray:
        return _POP8[a.view(np.uint8)].reshape(*a.shape, -1).sum(-1, dtype=np.uint8)


def _aggregate(x: np.ndarray, words: np.ndarray, centroids: np.ndarray, nbits: int) -> Tuple[np.ndarray, np.ndarray]:
    """(unique words, packed sign codes (w, nbits / 64) uint64) of one image's residuals summed per word.

    A descriptor counts once for each of its words; residuals are summed in float32 in descriptor order,
    like asmk, and a bit is set where the sum is > 0 (asmk's ``binarize_and_pack``).
    """
    rows = np.repeat(np.arange(len(x)), words.shape[1])
    w = words.ravel()
    valid = w >= 0
    rows, w = rows[valid], w[valid]
    order = np.lexsort((rows, w))
    rows, w = rows[order], w[order]
    keep = np.ones(len(w), dtype=bool)
    keep[1:] = (w[1:] != w[:-1]) | (rows[1:] != rows[:-1])
    rows, w = rows[keep], w[keep]
    uniq, start = np.unique(w, return_index=True)
    sums = np.add.reduceat(x[rows] - centroids[w], start, axis=0)
    bits = np.zeros((len(uniq), nbits), dtype=bool)
    bits[:, :x.shape[1]] = sums > 0
    packed = np.packbits(bits, axis=1)
    return uniq, np.ascontiguousarray(packed).view(np.uint64)


def _aggregate_all(features: List[np.ndarray], words: np.ndarray, centroids: np.ndarray, ma: int,
                   nbits: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, packed codes, image ids) of every image's aggregated residuals, with ``ma`` assignments."""
    offsets = np.cumsum([0] + [len(f) for f in features])
    ws, cs, ims = [], [], []
    for i, x in enumerate(features):
        u, c = _aggregate(x, words[offsets[i]:offsets[i + 1], :ma], centroids, nbits)
        ws.append(u), cs.append(c), ims.append(np.full(len(u), i))
    return np.concatenate(ws), np.concatenate(cs), np.concatenate(ims)


def _score(db: Tuple[np.ndarray, np.ndarray, np.ndarray], query: Tuple[np.ndarray, np.ndarray, np.ndarray],
           n: int, dim: int, alpha: float, threshold: float, max_pairs: int = 1 << 22) -> np.ndarray:
    """The (N, N) ASMK scores of aggregated query entries against the aggregated database (an inverted file)."""
    norm_bits = np.float32(32 * math.ceil(dim / 32))  # asmk normalises by its packed length (uint32 words)
    dbw, dbc, dbi = db
    qw, qc, qi = query
    db_norm = np.sqrt(np.bincount(dbi, minlength=n).astype(np.float64))
    q_norm = np.sqrt(np.bincount(qi, minlength=n).astype(np.float64))
    order = np.argsort(dbw, kind="stable")
    dbw, dbc, dbi = dbw[order], dbc[order], dbi[order]
    lo, hi = np.searchsorted(dbw, qw, "left"), np.searchsorted(dbw, qw, "right")
    counts = hi - lo
    sim = np.zeros((n, n), dtype=np.float64)
    ends = np.cumsum(counts)
    start = 0
    while start < len(qw):  # query entries in chunks of <= max_pairs (query word, database word) pairs
        stop = max(int(np.searchsorted(ends, (ends[start - 1] if start else 0) + max_pairs, "right")), start + 1)
        cnt = counts[start:stop]
        total = int(cnt.sum())
        if total:
            qe = np.repeat(np.arange(start, stop), cnt)
            first = np.repeat(lo[start:stop] - (np.cumsum(cnt) - cnt), cnt)
            de = first + np.arange(total)
            ham = _popcount(qc[qe] ^ dbc[de]).sum(axis=1, dtype=np.int64)
            s = np.float32(-2) * (ham.astype(np.float32) / norm_bits) + np.float32(1)
            ok = s >= threshold
            val = np.power(s[ok], np.float32(alpha)).astype(np.float64) / db_norm[dbi[de[ok]]]
            np.add.at(sim, (qi[qe[ok]], dbi[de[ok]]), val)
        start = stop
    return sim / np.maximum(q_norm, 1e-300)[:, None]


def asmk_similarity(features: Sequence[np.ndarray], centroids: np.ndarray, *, multiple_assignment: int = 5,
                    db_multiple_assignment: int = 1, alpha: float = 3.0, similarity_threshold: float = 0.0,
                    device: Optional[str | torch.device] = None) -> np.ndarray:
    """ASMK (binary kernel) similarity ``(N, N)`` of images given their local descriptors; rows are queries.

    ``features``: per image an ``(n_i, D)`` array; ``centroids``: the ``(K, D)`` visual words.
    ``device`` (default: CUDA when available) runs the word assignment.
    """
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or len(centroids) < 1:
        raise ValueError(f"centroids must be a non-empty (K, D) array, got shape {centroids.shape}")
    feats = _check_features(features, centroids)
    if not feats:
        return np.zeros((0, 0))
    device = resolve_device(device)
    t0 = time.perf_counter()
    dim = centroids.shape[1]
    k_max = min(max(multiple_assignment, db_multiple_assignment), len(centroids))
    nbits = 64 * math.ceil(dim / 64)
    # one search serves both assignments: the first k' columns of the k-NN lists are the k'-NN lists
    words = _nearest_words(np.concatenate(feats), centroids, k_max, device)
    db = _aggregate_all(feats, words, centroids, min(db_multiple_assignment, k_max), nbits)
    query = _aggregate_all(feats, words, centroids, min(multiple_assignment, k_max), nbits)
    sim = _score(db, query, len(feats), dim, alpha, similarity_threshold)
    logger.info("ASMK: %d images, %d local features, %d words in %.2f s (words assigned on %s)", len(feats),
                sum(len(f) for f in feats), len(centroids), time.perf_counter() - t0, device)
    return sim
