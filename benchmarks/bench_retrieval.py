"""Benchmark MASt3R-SfM retrieval: local retrieval features and ASMK scoring, extrapolated to 1000 images.

Inputs are synthetic at the real sizes: encoder tokens (S = 768 tokens of a 512x384 image, C = 1024) drawn
from shared "scene" clusters, a retrieval head with a float64 1024x1024 prewhitener (the likely layout of the
released file), ``nfeat = 300`` local features per image and a codebook of ``--words`` (default 65536,
MASt3R-SfM's "64k") random centroids. The encoder is not run (it is benchmarked by bench_model.py; about
13 s per image on this CPU); its encodings are shared with matching (see mast3r_colmap.retrieval.retriever).

Stages timed separately:

* features: the retrieval head + top-nfeat, per image (linear in N);
* assign: exact L2 search (torch) of every local feature among the words, 5 nearest (linear in N; the
  dominant cost: N * nfeat * K * D * 2 flops); with ``--faiss``, faiss IndexFlatL2 (the former
  implementation) is timed on the same input as the baseline;
* aggregate: residual sums per visual word and binarisation, MA 1 and MA 5 (linear in N);
* score: the inverted-file join and binary kernel (up to quadratic in N).

The estimate for ``--target`` images (default 1000) is
``T = target * (t_feat + t_assign + t_aggregate) / N + t_score * (target / N)^2`` from the largest N.

    python benchmarks/bench_retrieval.py --sizes 50 100 200
    python benchmarks/bench_retrieval.py --sizes 20 50 --words 16384   # quicker
    python benchmarks/bench_retrieval.py --sizes 5 --words 65536 --faiss --asmk-package --threads 1
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Dict, List

import numpy as np
import torch

from mast3r_colmap import retrieval as R
from mast3r_colmap.retrieval import scoring as S
from mast3r_colmap.testing.asmk_reference import asmk_available, asmk_package_similarity
from mast3r_colmap.testing.retrieval_weights import make_retrieval_args

logger = logging.getLogger("bench_retrieval")


def synthetic_tokens(n: int, tokens: int, dim: int, n_scenes: int, seed: int) -> List[torch.Tensor]:
    """Per image (tokens, dim) float32: a random subset of its scene's points plus noise and background."""
    rng = np.random.default_rng(seed)
    scenes = [rng.standard_normal((2 * tokens, dim)).astype(np.float32) for _ in range(n_scenes)]
    out = []
    for i in range(n):
        pts = scenes[i % n_scenes][rng.choice(2 * tokens, tokens // 2, replace=False)]
        x = np.concatenate([pts + 0.3 * rng.standard_normal(pts.shape).astype(np.float32),
                            rng.standard_normal((tokens - len(pts), dim)).astype(np.float32)])
        out.append(torch.from_numpy(x))
    return out


def retrieval_head(dim: int, nfeat: int, device: str, seed: int) -> R.RetrievalModel:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim)) / math.sqrt(dim)
    config = R.RetrievalConfig.from_args(make_retrieval_args(65536, prewhiten="pca", nfeat=nfeat), "bench")
    model = R.RetrievalModel(config, dim)
    model.prewhiten.m.copy_(torch.from_numpy(rng.standard_normal((1, dim))))
    model.prewhiten.p.copy_(torch.from_numpy(mix))
    return model.eval().to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(n: int, args: argparse.Namespace, device: str) -> Dict[str, float]:
    tokens = synthetic_tokens(n, args.tokens, args.dim, max(1, n // 10), args.seed)
    model = retrieval_head(args.dim, args.nfeat, device, args.seed)
    sync(device)
    t0 = time.perf_counter()
    feats = [model.local_features(t[None].to(device))[0].float().cpu().numpy() for t in tokens]
    sync(device)
    t_feat = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed + 1)
    centroids = rng.standard_normal((args.words, args.dim)).astype(np.float32)
    nbits = 64 * math.ceil(args.dim / 64)
    x = np.concatenate(feats)
    t0 = time.perf_counter()
    words = S._nearest_words(x, centroids, 5, torch.device(device))
    t_assign = time.perf_counter() - t0
    t0 = time.perf_counter()
    db = S._aggregate_all(feats, words, centroids, 1, nbits)
    query = S._aggregate_all(feats, words, centroids, 5, nbits)
    t_agg = time.perf_counter() - t0
    t0 = time.perf_counter()
    sim = S._score(db, query, n, args.dim, 3.0, 0.0)
    t_score = time.perf_counter() - t0
    hits = np.mean(sim.argmax(axis=1) == np.arange(n))
    res = {"n": n, "features": t_feat, "assign": t_assign, "aggregate": t_agg, "score": t_score,
           "self_first": float(hits)}
    if args.faiss and device == "cpu":
        import faiss  # noqa: PLC0415

        t0 = time.perf_counter()
        index = faiss.IndexFlatL2(args.dim)
        index.add(centroids)
        ref_words = index.search(x, 5)[1]
        res["faiss_assign"] = time.perf_counter() - t0
        res["faiss_same_words"] = float(np.mean(np.all(ref_words == words, axis=1)))
    if args.asmk_package and asmk_available() and n == min(args.sizes):
        t0 = time.perf_counter()
        ref = asmk_package_similarity(feats, centroids)
        res["asmk_package_total"] = time.perf_counter() - t0
        res["asmk_package_max_diff"] = float(np.abs(ref - sim).max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200], help="numbers of images N")
    ap.add_argument("--words", type=int, default=65536, help="codebook size K")
    ap.add_argument("--dim", type=int, default=1024, help="encoder / feature dimension")
    ap.add_argument("--tokens", type=int, default=768, help="encoder tokens per image (512x384: 768)")
    ap.add_argument("--nfeat", type=int, default=300)
    ap.add_argument("--target", type=int, default=1000, help="number of images of the estimate")
    ap.add_argument("--encoder-s", type=float, default=13.0, help="seconds per image of the encoder (for the note)")
    ap.add_argument("--asmk-package", action="store_true", help="also time the asmk package at the smallest N")
    ap.add_argument("--faiss", action="store_true", help="also time faiss IndexFlatL2 word assignment (CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (and faiss's threads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.faiss:
            import faiss  # noqa: PLC0415

            faiss.omp_set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        rows = []
        logger.info("device %s, K=%d words, D=%d, %d tokens -> %d features per image", device, args.words,
                    args.dim, args.tokens, args.nfeat)
        logger.info("%6s %10s %10s %10s %10s %10s", "N", "features s", "assign s", "aggreg. s", "score s",
                    "self 1st")
        for n in sorted(args.sizes):
            r = run(n, args, device)
            rows.append(r)
            logger.info("%6d %10.2f %10.2f %10.2f %10.2f %10.2f", n, r["features"], r["assign"], r["aggregate"],
                        r["score"], r["self_first"])
            if "faiss_assign" in r:
                logger.info("       faiss IndexFlatL2 assign (same input): %.2f s, same 5 words for %.4f of the "
                            "features", r["faiss_assign"], r["faiss_same_words"])
            if "asmk_package_total" in r:
                logger.info("       asmk package (same N, all stages): %.2f s, max |difference| %.2e",
                            r["asmk_package_total"], r["asmk_package_max_diff"])
        big = rows[-1]
        n, t = big["n"], args.target
        linear = (big["features"] + big["assign"] + big["aggregate"]) / n
        est = t * linear + big["score"] * (t / n) ** 2
        logger.info("estimate for %d images on %s: T = %d * (t_feat + t_assign + t_aggregate) / %d + t_score * "
                    "(%d / %d)^2 = %d * %.3f s + %.2f s * %.1f = %.0f s (%.1f min)", t, device, t, n, t, n, t,
                    linear, big["score"], (t / n) ** 2, est, est / 60)
        logger.info("  not included: the encoder (%.0f s/image here, shared with matching while the encoding "
                    "cache holds the image; with N > cache_size matching re-encodes: +%d * %.0f s = %.1f h)",
                    args.encoder_s, t, args.encoder_s, t * args.encoder_s / 3600)


if __name__ == "__main__":
    main()
