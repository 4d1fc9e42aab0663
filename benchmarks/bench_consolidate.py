"""Cost of keypoint consolidation (``keypoints.consolidate``) on large inputs, with and without sampling grids.

    python benchmarks/bench_consolidate.py [--images 100] [--pairs 1000] [--matches 5000] [--repeats 2]

Each pair has ``--matches`` random matches on the network pixels of two 1600x1200 images matched at 512 px
(3.125 px apart), with float32 coordinates as they come from the match store. They are consolidated once
carrying their grid (one keypoint per network pixel) and once without (4-px cells, score-weighted means, the
behaviour for grid-less sources), each with the default cap (8192) and without cap. CPU seconds (the
best of ``--repeats``) are reported with the keypoints per image and the matches kept.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mast3r_colmap.keypoints import KeypointConfig, consolidate
from mast3r_colmap.structures import PairMatches, SamplingGrid


def make_pairs(n_images: int, n_pairs: int, n: int, grids: bool, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    names = [f"{i:05d}.jpg" for i in range(n_images)]
    links = set()
    while len(links) < n_pairs:
        i, j = sorted(rng.choice(n_images, 2, replace=False).tolist())
        links.add((i, j))
    step = 1600 / 512
    grid = SamplingGrid(0.5 * step - 0.5, 0.5 * step - 0.5, step, step) if grids else None
    out = []
    for i, j in sorted(links):
        xy = [((np.stack([rng.integers(3, 509, n), rng.integers(3, 381, n)], 1) + 0.5) * step - 0.5)
              .astype(np.float32) for _ in range(2)]
        out.append(PairMatches(names[i], names[j], xy[0], xy[1], rng.uniform(1, 10, n), grid, grid))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--matches", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"{args.pairs} pairs x {args.matches} matches over {args.images} images")
    header = f"{'grids':6} {'max_kps':>8} {'cpu s':>7} {'kps/image':>10} {'matches':>10}"
    print(header)
    print("-" * len(header))
    for grids in (True, False):
        pairs = make_pairs(args.images, args.pairs, args.matches, grids)
        for max_kps in (8192, None):
            best = np.inf
            for _ in range(args.repeats):
                t0 = time.process_time()
                kps, matches = consolidate(pairs, KeypointConfig(max_kps=max_kps))
                best = min(best, time.process_time() - t0)
            per_image = np.mean([len(k) for k in kps.values()])
            print(f"{str(grids):6} {str(max_kps):>8} {best:7.2f} {per_image:10.0f} {sum(len(m) for m in matches):10d}")


if __name__ == "__main__":
    main()
