"""Seconds per image pair of the MASt3R network: full outputs vs descriptor-only with cached encodings.

    python benchmarks/bench_model.py                       # full config, 512x384, CPU (+ CUDA if present)
    python benchmarks/bench_model.py --config small --repeats 3

"full" = encode both images + decoder + DPT and local-feature heads (what the official inference does).
"desc-only cached" = decoder + local-feature heads from encodings computed beforehand (what the matcher
does: each image is encoded once and reused for all its pairs). The ratio column is measured in the
same run against the "full" row of the same device/precision/batch. Weights are the deterministic test
weights (the speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from typing import Callable, List

import torch

from mast3r_colmap.model import MASt3R
from mast3r_colmap.model.checkpoint import match_state_dict
from mast3r_colmap.testing.weights import make_state_dict


def build(config: str) -> MASt3R:
    with torch.device("meta"):
        model = MASt3R(config)
    model.load_state_dict(match_state_dict(model, make_state_dict(config, 0)), assign=True)
    return model.eval().requires_grad_(False)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (KiB -> GiB)


def bench(model: MASt3R, device: torch.device, amp: torch.dtype | None, batch: int, hw: tuple,
          repeats: int) -> List[dict]:
    model.amp_dtype = amp
    g = torch.Generator().manual_seed(0)
    img1 = (torch.rand(batch, 3, *hw, generator=g) * 2 - 1).to(device)
    img2 = (torch.rand(batch, 3, *hw, generator=g) * 2 - 1).to(device)
    rows = []
    with torch.inference_mode():
        def full():
            enc = model.encode(torch.cat([img1, img2]))
            return model.predict(enc[:batch], enc[batch:], with_pts3d=True)

        enc = model.encode(torch.cat([img1, img2]))
        enc1, enc2 = enc[:batch], enc[batch:]

        def desc_only():
            return model.predict(enc1, enc2, with_pts3d=False)

        for name, fn in (("full", full), ("desc-only cached", desc_only)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(fn, repeats, device) / batch
            rows.append(dict(device=device.type, precision=str(amp).replace("torch.", "") if amp else "fp32",
                             batch=batch, mode=name, s_per_pair=seconds, peak_gb=peak_memory_gb(device)))
    full_s = rows[0]["s_per_pair"]
    for row in rows:
        row["ratio"] = row["s_per_pair"] / full_s
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="full", choices=["full", "small"])
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cuda-batches", default="1,8,32")
    parser.add_argument("--no-cpu", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = (args.height, args.width)
    model = build(args.config)
    rows: List[dict] = []
    if not args.no_cpu:
        rows += bench(model, torch.device("cpu"), None, 1, hw, args.repeats)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        model = model.to(cuda)
        torch.backends.cuda.matmul.allow_tf32 = False
        for amp in (None, torch.bfloat16):
            for batch in (int(b) for b in args.cuda_batches.split(",")):
                try:
                    rows += bench(model, cuda, amp, batch, hw, max(args.repeats, 5))
                except torch.cuda.OutOfMemoryError:
                    print(f"# OOM at batch {batch}")
                gc.collect()
                torch.cuda.empty_cache()
    print(f"MASt3R '{args.config}' at {hw[0]}x{hw[1]} (HxW), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    header = f"{'device':6} {'precision':9} {'batch':>5} {'mode':18} {'s/pair':>9} {'pairs/s':>8} {'vs full':>8} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['device']:6} {r['precision']:9} {r['batch']:>5} {r['mode']:18} {r['s_per_pair']:>9.4f} "
              f"{1 / r['s_per_pair']:>8.2f} {r['ratio']:>8.1%} {r['peak_gb']:>9.2f}")


if __name__ == "__main__":
    main()
