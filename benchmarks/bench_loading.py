"""Image decoding overlapped with the network: Matcher throughput with and without loader threads.

    python benchmarks/bench_loading.py [--images 12] [--size 4000x3000] [--network-ms 60]

The network is a stand-in whose pair inference takes a fixed time without holding the CPU
(``time.sleep``, like asynchronous CUDA work): what is measured is how much of the JPEG decoding
and resizing (the official preprocessing) the loader threads hide behind it. Images are large
synthetic JPEGs matched as a sequence (i, i+1), so each pair needs one new image.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mast3r_colmap.images import load_image
from mast3r_colmap.matching.matcher import Matcher


class SleepingNetwork:
    """A dense network stand-in: fixed latency, constant 8-dim descriptors (FRM cost negligible)."""

    device = torch.device("cpu")

    def __init__(self, seconds: float):
        self.seconds = seconds

    def settings(self) -> dict:
        return {"network": "sleeping"}

    def encode(self, images: torch.Tensor, keys, to_original) -> list:
        time.sleep(self.seconds / 2 * images.shape[0])
        return [tuple(images.shape[-2:])] * images.shape[0]

    def decode(self, enc0: list, enc1: list, symmetric: bool = False) -> tuple:
        time.sleep(self.seconds / 2 * len(enc0))
        out = []
        for enc in (enc0, enc1):
            desc = torch.nn.functional.normalize(torch.rand(len(enc), *enc[0], 8), dim=-1)
            out.append({"desc": desc, "desc_conf": torch.full(desc.shape[:3], 2.0)})
        return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--size", default="4000x3000", help="WxH of the synthetic JPEGs")
    ap.add_argument("--network-ms", type=float, default=60.0, help="stand-in network time per pair")
    ap.add_argument("--image-size", type=int, default=128, help="network resolution (small: cheap FRM)")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    names = []
    for i in range(args.images):
        small = (rng.random((h // 50, w // 50, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)
        names.append(f"{i}.jpg")
    pairs = list(zip(names[:-1], names[1:]))
    t0 = time.perf_counter()
    load_image(folder / names[0], args.image_size)
    decode = time.perf_counter() - t0
    print(f"{args.images} JPEGs {w}x{h}, {len(pairs)} sequential pairs; one load_image: {decode * 1e3:.0f} ms; "
          f"stand-in network: {args.network_ms:.0f} ms per pair")
    header = f"{'num_workers':>11} {'total s':>8} {'s/pair':>7} {'pairs/s':>8} {'vs inline':>9}"
    print(header)
    print("-" * len(header))
    base = None
    for workers in (0, 1, 2):
        matcher = Matcher(SleepingNetwork(args.network_ms / 1e3),
                          {"num_workers": workers, "batch_size": 1, "image_size": args.image_size,
                           "conf_threshold": 0.0}, image_dir=folder)
        t0 = time.perf_counter()
        for _ in matcher.match_pairs(pairs):
            pass
        total = time.perf_counter() - t0
        base = base or total
        print(f"{workers:>11} {total:8.2f} {total / len(pairs):7.3f} {len(pairs) / total:8.2f} {base / total:8.2f}x")


if __name__ == "__main__":
    main()
