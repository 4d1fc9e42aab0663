"""Encoder runs of a sharded run: the cut by graph locality of ``partition_pairs`` vs dealing pairs out in turn.

    python benchmarks/bench_shards.py [--images 1000] [--k 20] [--shards 4,8,16] [--cache 128]

Pair lists as in bench_schedule.py: a retrieval graph (each image with its k nearest along a random 2-D camera
walk, names shuffled), the same with random similarities (no structure), and exhaustive pairs of a fifth of the
images. Each shard's worker matches its pairs in the order of ``schedule_pairs`` with an LRU cache of ``--cache``
encodings (what ``match_into_store`` does); its encoder runs come from the LRU simulation. One encoder run is
one ViT-L encoding (about 3 s on 2 CPU cores, some 20 ms on a GPU).
"""

from __future__ import annotations

import argparse
import time

from mast3r_colmap.matching.schedule import count_encodings, schedule_pairs
from mast3r_colmap.shards import partition_pairs

from bench_schedule import pair_lists  # the same pair lists (benchmarks/ is on sys.path when run as a script)


def _runs(shards, cache: int) -> list:
    return [count_encodings(schedule_pairs(list(s), cache), cache) if s else 0 for s in shards]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--shards", default="4,8,16")
    ap.add_argument("--cache", type=int, default=128)
    args = ap.parse_args()
    n = args.images
    lists = pair_lists(n, args.k, n // 5)
    header = (f"{'pair list':32} {'pairs':>7} {'N':>3} {'images/shard':>13} {'encoder runs':>13} "
              f"{'dealt: images/shard':>20} {'encoder runs':>13} {'cut s':>6}")
    print(f"cache of {args.cache} encodings; images/shard: the largest shard; encoder runs: all shards together")
    print(header)
    print("-" * len(header))
    for label, pairs in lists.items():
        for count in (int(c) for c in args.shards.split(",")):
            t0 = time.perf_counter()
            cut = [s.pairs for s in partition_pairs(pairs, count, args.cache)]
            seconds = time.perf_counter() - t0
            dealt = [pairs[i::count] for i in range(count)]
            images = max(len({x for p in s for x in p}) for s in cut)
            images_dealt = max(len({x for p in s for x in p}) for s in dealt)
            print(f"{label:32} {len(pairs):7d} {count:3d} {images:13d} {sum(_runs(cut, args.cache)):13d} "
                  f"{images_dealt:20d} {sum(_runs(dealt, args.cache)):13d} {seconds:6.2f}")


if __name__ == "__main__":
    main()
