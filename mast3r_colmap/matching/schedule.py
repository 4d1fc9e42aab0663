"""The order in which pairs are matched, so that each image is encoded about once.

The matcher keeps the encoder outputs of its most recently used images in an LRU cache of
``cache_size`` entries. Matched in the order pairs are usually listed (sorted by first image),
a pair list that touches more images than the cache holds re-encodes the same images over and
over: a 1000-image retrieval graph (k = 20) sorted by name costs about 11 500 encodings with a
64-entry cache instead of 1000, and exhaustive pairs of N images cost about N^2 / 2.

:func:`schedule_pairs` reorders the pairs (each keeps its orientation) to reduce that:

1. images are numbered along a reverse Cuthill-McKee ordering of the pair graph (scipy), which
   keeps the partners of an image close to it in the numbering (small bandwidth);
2. pairs are then taken block by block: those whose lower-numbered image lies in the same
   block of ``B`` images are matched together, by increasing higher-numbered image (or, in the
   serpentine variant, by increasing then decreasing one, block after block, so that a block
   starts with the partners the previous one ended with). While a block is processed its
   images stay cached and each partner is encoded once per block, so exhaustive matching
   costs about ``N^2 / (2B)`` encodings and a banded graph (bandwidth below ``B``) about one
   per image.

Several candidate orders (the input order, and both variants with block sizes of 1/4, 1/2 and
3/4 of the cache) are scored by simulating the LRU cache (:func:`count_encodings`) and the cheapest one wins, the
input order on ties, so an order that is already good is kept. Everything is deterministic.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Hashable, List, Mapping, Sequence, Tuple, TypeVar

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import reverse_cuthill_mckee

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

G = TypeVar("G", bound=Hashable)

__all__ = ["schedule_pairs", "schedule_groups", "count_encodings"]


def count_encodings(pairs: Sequence[Tuple[K, K]], cache_size: int) -> int:
    """How many encodings matching ``pairs`` in this order costs with an LRU cache of ``cache_size``
    images (the :class:`~.matcher.EncodingCache` policy: both images of a pair are looked up in turn)."""
    if cache_size < 1:
        raise ValueError(f"cache_size must be >= 1, got {cache_size}")
    cache: "OrderedDict[K, None]" = OrderedDict()
    misses = 0
    for pair in pairs:
        for key in pair:
            if key in cache:
                cache.move_to_end(key)
                continue
            misses += 1
            cache[key] = None
            if len(cache) > cache_size:
                cache.popitem(last=False)
    return misses


def _graph_positions(pairs: Sequence[Tuple[K, K]]) -> Tuple[np.ndarray, np.ndarray]:
    """Reverse Cuthill-McKee position of the two images of every pair."""
    index: dict = {}
    ends = np.array([[index.setdefault(a, len(index)), index.setdefault(b, len(index))] for a, b in pairs],
                    dtype=np.int64).reshape(-1, 2)
    n = len(index)
    graph = coo_matrix((np.ones(len(ends)), (ends[:, 0], ends[:, 1])), shape=(n, n)).tocsr()
    order = reverse_cuthill_mckee((graph + graph.T).tocsr(), symmetric_mode=True)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    pos = position[ends]
    return pos.min(axis=1), pos.max(axis=1)


def schedule_pairs(pairs: Sequence[Tuple[K, K]], cache_size: int) -> List[Tuple[K, K]]:
    """The pairs in an order that needs few encodings with an LRU cache of ``cache_size`` images.

    Returns the same pairs (same orientation, repeats kept), as a new list. See the module docstring.
    """
    pairs = [tuple(p) for p in pairs]
    if cache_size < 1:
        raise ValueError(f"cache_size must be >= 1, got {cache_size}")
    if len(pairs) < 2:
        return pairs
    lo, hi = _graph_positions(pairs)
    given_cost = count_encodings(pairs, cache_size)
    best, best_cost = pairs, given_cost
    for block in sorted({max(1, cache_size * f // 4) for f in (1, 2, 3)}):
        blocks = lo // block
        for serpentine in (False, True):
            sweep = np.where(blocks % 2 == 1, -hi, hi) if serpentine else hi
            order = np.lexsort((lo, sweep, blocks))
            candidate = [pairs[i] for i in order]
            cost = count_encodings(candidate, cache_size)
            if cost < best_cost:
                best, best_cost = candidate, cost
    n_images = len({k for p in pairs for k in p})
    logger.debug("schedule: %d pairs over %d images, %d encodings with a cache of %d (%d in the given order)",
                 len(pairs), n_images, best_cost, cache_size, given_cost)
    return best


def schedule_groups(groups: Mapping[G, Sequence[Tuple[K, K]]], cache_size: int) -> List[G]:
    """An order of pair groups (e.g. each query's pairs with its retrieved images, matched together)
    in which consecutive groups share images; the pairs inside a group keep their order.

    Groups are ordered by the first appearance of one of their pairs in :func:`schedule_pairs` of all
    pairs, forwards or backwards; the given order is kept when neither needs fewer encodings.
    """
    keys = list(groups)
    owner = {}
    for key in keys:
        for pair in groups[key]:
            owner.setdefault(tuple(pair), key)
    flat = [tuple(p) for key in keys for p in groups[key]]
    first_seen = list(dict.fromkeys(owner[p] for p in schedule_pairs(flat, cache_size)))
    rest = [key for key in keys if key not in set(first_seen)]  # e.g. empty groups: last

    def cost(seq: List[G]) -> int:
        return count_encodings([tuple(p) for key in seq for p in groups[key]], cache_size)

    # the sweep direction matters when the images a group shares with the next one come first in it
    candidates = [keys, first_seen + rest, first_seen[::-1] + rest]
    return min(candidates, key=cost)  # the first (the given order) on ties
