"""Benchmark fast reciprocal matching (FRM) against the brute-force mutual-NN baseline.

Synthetic but realistic inputs: image 1 samples a smooth random 24-channel field, image 2
samples the same field through a similarity warp (rotation, scale, shift, so part of image 2
sees unseen content), plus per-pixel noise; both are normalised to unit length.

    python benchmarks/bench_matching.py --repeats 3

On a machine shared with other busy processes, OpenMP spin-waiting makes multi-threaded
torch calls very slow (10x and more); run with ``OMP_WAIT_POLICY=PASSIVE`` (or ``--threads 1``)
there, and read the ``cpu s`` column (process CPU time) as well as wall time.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mast3r_colmap.matching.frm import fast_reciprocal_nns, mutual_nearest_neighbours

logger = logging.getLogger("bench_matching")


def smooth_field(height: int, width: int, dim: int, rng: np.random.Generator,
                 sigmas: tuple[float, ...] = (1.5, 5.0, 15.0)) -> np.ndarray:
    """(H, W, dim) float32 sum of Gaussian-smoothed (periodic, via FFT) white noise at several scales."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f2 = (fy**2 + fx**2)[..., None]
    field = np.zeros((height, width, dim), dtype=np.float32)
    for s in sigmas:
        noise = rng.standard_normal((height, width, dim))
        spec = np.fft.rfft2(noise, axes=(0, 1)) * np.exp(-2.0 * (np.pi * s) ** 2 * f2)
        sm = np.fft.irfft2(spec, s=(height, width), axes=(0, 1))
        field += (sm / (sm.std() + 1e-12)).astype(np.float32)
    return field


def descriptor_pair(height: int = 384, width: int = 512, dim: int = 24, seed: int = 0,
                    angle_deg: float = 8.0, scale: float = 1.1, shift: tuple[float, float] = (40.0, -25.0),
                    noise: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Two unit-norm (H, W, dim) float32 descriptor maps related by a similarity warp."""
    rng = np.random.default_rng(seed)
    pad = max(height, width) // 2
    canvas = smooth_field(height + 2 * pad, width + 2 * pad, dim, rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)

    def sample(xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
        coords = [yc + pad, xc + pad]
        # bilinear sampling of all channels at once
        y = np.clip(coords[0], 0, canvas.shape[0] - 1.001)
        x = np.clip(coords[1], 0, canvas.shape[1] - 1.001)
        y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
        wy, wx = (y - y0)[..., None], (x - x0)[..., None]
        c = canvas
        out = ((1 - wy) * ((1 - wx) * c[y0, x0] + wx * c[y0, x0 + 1])
               + wy * ((1 - wx) * c[y0 + 1, x0] + wx * c[y0 + 1, x0 + 1]))
        return out.astype(np.float32)

    d1 = sample(xs, ys)
    a = np.deg2rad(angle_deg)
    cx, cy = width / 2, height / 2
    x2 = cx + scale * (np.cos(a) * (xs - cx) - np.sin(a) * (ys - cy)) + shift[0]
    y2 = cy + scale * (np.sin(a) * (xs - cx) + np.cos(a) * (ys - cy)) + shift[1]
    d2 = sample(x2, y2)
    d1 += noise * rng.standard_normal(d1.shape).astype(np.float32) * d1.std()
    d2 += noise * rng.standard_normal(d2.shape).astype(np.float32) * d2.std()
    d1 /= np.linalg.norm(d1, axis=-1, keepdims=True)
    d2 /= np.linalg.norm(d2, axis=-1, keepdims=True)
    return d1, d2


def timeit(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Best-of-`repeats` wall time and process CPU time (s), and the last result."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--dim", type=int, default=24)
    ap.add_argument("--subsample", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="FRM timings are best of N runs")
    ap.add_argument("--baseline-repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the (slow) brute-force baseline")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--e2e-config", default="full", choices=["full", "small", "none"],
                    help="network architecture for the end-to-end match_pair rows (test weights)")
    ap.add_argument("--e2e-images", type=int, default=4, help="images in the end-to-end sequence")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    d1, d2 = descriptor_pair(args.height, args.width, args.dim, seed=args.seed)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[tuple[str, str, float, float, int]] = []
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    baseline: dict[str, float] = {}
    mnn_pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    for dev in devices:
        t1 = torch.from_numpy(d1).to(dev)
        t2 = torch.from_numpy(d2).to(dev)
        fast_reciprocal_nns(t1, t2, args.subsample)  # warm-up
        sec, cpu, res = timeit(lambda: fast_reciprocal_nns(t1, t2, args.subsample), args.repeats)
        results[dev] = res
        rows.append((dev, f"FRM S={args.subsample}", sec, cpu, len(res[0])))
        if not args.no_baseline:
            sec, cpu, res = timeit(lambda: mutual_nearest_neighbours(t1, t2), args.baseline_repeats)
            baseline[dev] = sec
            mnn_pairs[dev] = res
            rows.append((dev, "dense MNN (brute force)", sec, cpu, len(res[0])))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntorch threads={torch.get_num_threads()}, cpus={os.cpu_count()}, load avg (1 min)={load:.2f}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"pair {args.height}x{args.width}, D={args.dim}; best of {args.repeats} (baseline {args.baseline_repeats})")
    hdr = f"{'device':6} | {'method':24} | {'wall s':>8} | {'cpu s':>8} | {'matches':>7} | {'MNN/this':>8}"
    print(hdr)
    print("-" * len(hdr))
    for dev, method, sec, cpu, n in rows:
        ratio = f"{baseline[dev] / sec:7.1f}x" if dev in baseline else "     n/a"
        print(f"{dev:6} | {method:24} | {sec:8.3f} | {cpu:8.3f} | {n:7d} | {ratio:>8}")

    # exactness checks: every device gives the same pairs, all of them mutual NNs
    ref = next(iter(results.values()))
    ok_agree = all(np.array_equal(r[0], ref[0]) and np.array_equal(r[1], ref[1]) for r in results.values())
    print(f"\nall devices agree ({', '.join(results)}): {ok_agree}")
    if "cpu" in mnn_pairs:
        w1, w2 = args.width, args.width
        mnn = set(zip((mnn_pairs["cpu"][0] @ [1, w1]).tolist(), (mnn_pairs["cpu"][1] @ [1, w2]).tolist()))
        frm = set(zip((ref[0] @ [1, w1]).tolist(), (ref[1] @ [1, w2]).tolist()))
        print(f"FRM pairs that are mutual NNs: {len(frm & mnn)}/{len(frm)} "
              f"(dense MNN finds {len(mnn)}): {'OK' if frm <= mnn else 'MISMATCH'}")


    if args.e2e_config != "none":
        print()
        bench_match_pairs(args.e2e_config, args.e2e_images, devices)


def bench_match_pairs(config: str, n_images: int, devices: list[str]) -> None:
    """End-to-end Matcher throughput: n 1024x768 images matched as a sequence (i, i+1): each image
    encoded once, descriptor-only decoding, FRM both ways, filters, mapping to original pixels."""
    import tempfile

    from PIL import Image

    from mast3r_colmap.matching.matcher import Matcher
    from mast3r_colmap.model import MASt3R
    from mast3r_colmap.model.checkpoint import match_state_dict
    from mast3r_colmap.testing.weights import make_state_dict

    rng = np.random.default_rng(0)
    folder = Path(tempfile.mkdtemp())
    names = []
    for i in range(n_images):
        small = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((1024, 768), Image.BICUBIC).save(folder / f"{i}.png")
        names.append(str(folder / f"{i}.png"))
    pairs = list(zip(names[:-1], names[1:]))
    with torch.device("meta"):
        model = MASt3R(config)
    model.load_state_dict(match_state_dict(model, make_state_dict(config, 0)), assign=True)
    model.eval()
    print(f"match_pair end to end: '{config}' network (test weights), {n_images} images 1024x768 -> 512x384, "
          f"{len(pairs)} sequential pairs, preset 'default'")
    hdr = f"{'device':6} | {'pairs':>5} | {'total s':>8} | {'s/pair':>8} | {'pairs/s':>8} | {'matches/pair':>12}"
    print(hdr)
    print("-" * len(hdr))
    for dev in devices:
        model = model.to(dev)
        matcher = Matcher(model, "default")
        t0 = time.perf_counter()
        out = list(matcher.match_pairs(pairs))
        if dev == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        print(f"{dev:6} | {len(pairs):5d} | {sec:8.2f} | {sec / len(pairs):8.2f} | {len(pairs) / sec:8.3f} | "
              f"{np.mean([len(p) for p in out]):12.0f}")


if __name__ == "__main__":
    main()
