"""Encoder runs needed to match a pair list, in the given order vs the order of ``schedule_pairs``.

    python benchmarks/bench_schedule.py [--images 1000] [--k 20]

Pair lists: a retrieval graph (each image with its k nearest along a random 2-D camera walk, names
shuffled, listed by name as pairs files are), the same with random similarities (no structure), and
exhaustive pairs. Counts come from the LRU simulation that the matcher's cache follows exactly
(tests/test_schedule.py); one encoding is one ViT-L encoder run (about 3 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Tuple

import numpy as np

from mast3r_colmap.matching.schedule import count_encodings, schedule_pairs
from mast3r_colmap.pairs import exhaustive, pairs_from_similarity


def pair_lists(n: int, k: int, exhaustive_images: int, seed: int = 0) -> Dict[str, List[Tuple[str, str]]]:
    """The benchmark's pair lists over ``n`` images: retrieval ``k`` along a random 2-D camera walk (names
    shuffled), retrieval ``k`` on random similarities, and exhaustive pairs of the first ``exhaustive_images``."""
    rng = np.random.default_rng(seed)
    names = [f"{i:05d}.jpg" for i in range(n)]
    walk = np.cumsum(rng.normal(size=(n, 2)), axis=0)[rng.permutation(n)]
    dist = np.linalg.norm(walk[:, None] - walk[None], axis=-1)
    label = "exhaustive" if exhaustive_images == n else f"exhaustive, {exhaustive_images} images"
    return {
        f"retrieval k={k}, camera walk": pairs_from_similarity(names, -dist, k),
        f"retrieval k={k}, random": pairs_from_similarity(names, rng.random((n, n)), k),
        label: exhaustive(names[:exhaustive_images]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--caches", default="64,128,256")
    args = ap.parse_args()
    n = args.images
    lists = pair_lists(n, args.k, n)
    print(f"{n} images; encodings needed (the minimum is {n})")
    header = f"{'pair list':32} {'pairs':>8} {'cache':>6} {'given order':>12} {'scheduled':>10} {'saved':>7} {'schedule s':>10}"
    print(header)
    print("-" * len(header))
    for label, pairs in lists.items():
        for cache in (int(c) for c in args.caches.split(",")):
            t0 = time.perf_counter()
            order = schedule_pairs(pairs, cache)
            seconds = time.perf_counter() - t0
            given, scheduled = count_encodings(pairs, cache), count_encodings(order, cache)
            print(f"{label:32} {len(pairs):8d} {cache:6d} {given:12d} {scheduled:10d} {given / scheduled:6.1f}x "
                  f"{seconds:10.2f}")


if __name__ == "__main__":
    main()
