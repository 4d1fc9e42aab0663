"""Training-free retrieval checkpoints and asmk codebooks in the official layout, for tests and benchmarks.

* ``<prefix>_trainingfree.pth``: ``torch.save({'args': Namespace(...), 'model': state_dict})`` with the
  arguments of MASt3R-SfM's retrieval model and ``prewhiten.{m,p}`` (float64), ``projector.*``
  (an ``nn.Sequential`` of [Linear, LayerNorm, GELU] x (k - 1) + Linear) and ``postwhiten.{m,p}`` entries;
* ``<prefix>_codebook.pkl``: ``pickle.dump({'type': 'Codebook', 'params': {'size': nclusters},
  'state': {'centroids': float32 (K, D)}})``, the asmk Codebook state.

Whiteners are learned like the official ones, by PCA of sample features (:func:`learn_whitener`); without
samples, pseudo-random features are used. Codebooks come from faiss k-means (:func:`train_codebook`) or are
pseudo-random.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "learn_whitener",
    "make_retrieval_args",
    "make_retrieval_state_dict",
    "train_codebook",
    "write_codebook",
    "write_retrieval_checkpoint",
]


def learn_whitener(samples: np.ndarray, shrinkage: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """PCA whitening ``(m (1, D), p (D, D))`` float64 of samples (n, D): eigenvalues sorted descending and
    clipped >= 1e-14, ``P = diag(lambda^-0.5) E^T``, ``p = P^T``; ``shrinkage`` mixes the covariance with
    its mean eigenvalue times the identity."""
    x = np.asarray(samples, dtype=np.float64)
    m = x.mean(axis=0, keepdims=True)
    xc = x - m
    cov = xc.T @ xc / max(len(x) - 1, 1)
    if shrinkage:
        cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1]
    lam, vec = np.clip(lam[order], 1e-14, None), vec[:, order]
    big_p = np.diag(lam ** -0.5) @ vec.T
    return m, np.ascontiguousarray(big_p.T)


def make_retrieval_args(nclusters: Any = "64k", *, prewhiten: Any = True, hdims: Any = "", residual: bool = False,
                        postwhiten: Any = None, featweights: str = "l2norm", nfeat: int = 300, imsize: int = 512,
                        **extra: Any) -> argparse.Namespace:
    """The checkpoint's ``args``: MASt3R-SfM's retrieval-model arguments (plus ``extra``)."""
    return argparse.Namespace(pretrained="", freeze_backbone=True, prewhiten=prewhiten, hdims=hdims,
                              residual=residual, postwhiten=postwhiten, featweights=featweights, nfeat=nfeat,
                              imsize=imsize, nclusters=nclusters, **extra)


def _hdims(hdims: Any) -> Tuple[int, ...]:
    if not hdims:
        return ()
    if isinstance(hdims, str):
        return tuple(int(t) for t in hdims.replace(",", "_").split("_") if t)
    return tuple(int(h) for h in hdims)


def make_retrieval_state_dict(dim: int, *, prewhiten: bool = True, hdims: Any = "", postwhiten: bool = False,
                              seed: int = 0, samples: Optional[np.ndarray] = None) -> Dict[str, torch.Tensor]:
    """A state_dict for encoder tokens of dimension ``dim``; whiteners learned from ``samples`` (n, dim)
    (or from pseudo-random correlated features), projector weights pseudo-random (float32)."""
    rng = np.random.default_rng(seed)
    if samples is None:
        mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
        samples = rng.standard_normal((max(4 * dim, 256), dim)) @ mix + rng.standard_normal(dim)
    state: Dict[str, torch.Tensor] = {}
    d = dim
    if prewhiten:
        m, p = learn_whitener(samples, shrinkage=0.1)
        state["prewhiten.m"], state["prewhiten.p"] = torch.from_numpy(m), torch.from_numpy(p)
    hd = _hdims(hdims)
    for i, h in enumerate(hd):
        state[f"projector.{3 * i}.weight"] = torch.from_numpy((rng.standard_normal((h, d)) / np.sqrt(d))
                                                              .astype(np.float32))
        state[f"projector.{3 * i}.bias"] = torch.from_numpy((0.02 * rng.standard_normal(h)).astype(np.float32))
        if i < len(hd) - 1:
            state[f"projector.{3 * i + 1}.weight"] = torch.from_numpy(
                (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
            state[f"projector.{3 * i + 1}.bias"] = torch.from_numpy((0.02 * rng.standard_normal(h)).astype(np.float32))
        d = h
    if postwhiten:
        mix = rng.standard_normal((d, d)) / np.sqrt(d)
        m, p = learn_whitener(rng.standard_normal((max(4 * d, 256), d)) @ mix, shrinkage=0.1)
        state["postwhiten.m"], state["postwhiten.p"] = torch.from_numpy(m), torch.from_numpy(p)
    return state


def train_codebook(features: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """(k, D) float32 k-means centroids of features (n, D) (faiss, deterministic with ``seed``)."""
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def write_codebook(path: str | os.PathLike, centroids: np.ndarray, size: Any = None,
                   protocol: Optional[int] = None) -> Path:
    """Pickle an asmk Codebook state (``params = {'size': size}``, default ``K``)."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    data = {"type": "Codebook", "params": {"size": len(centroids) if size is None else size},
            "state": {"centroids": centroids}}
    path = Path(path)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def write_retrieval_checkpoint(path: str | os.PathLike, dim: int, nclusters: Any = 64, *,
                               centroids: Optional[np.ndarray] = None, prewhiten: bool = True, hdims: Any = "",
                               residual: bool = False, postwhiten: bool = False, nfeat: int = 300,
                               imsize: int = 512, seed: int = 0, samples: Optional[np.ndarray] = None,
                               state: Optional[Dict[str, torch.Tensor]] = None, codebook: bool = True,
                               **extra_args: Any) -> Tuple[Path, Path]:
    """Write ``path`` (e.g. ``x_trainingfree.pth``) and, with ``codebook``, ``x_codebook.pkl`` beside it.

    ``centroids`` default to pseudo-random ones of the output dimension. Returns both paths.
    """
    from ..retrieval import codebook_path, codebook_size

    path = Path(path)
    if state is None:
        state = make_retrieval_state_dict(dim, prewhiten=prewhiten, hdims=hdims, postwhiten=postwhiten,
                                          seed=seed, samples=samples)
    args = make_retrieval_args(nclusters, prewhiten="pca" if prewhiten else None, hdims=hdims, residual=residual,
                               postwhiten="pca" if postwhiten else None, nfeat=nfeat, imsize=imsize, **extra_args)
    torch.save({"args": args, "model": state}, path)
    cb = codebook_path(path)
    if codebook:
        if centroids is None:
            hd = _hdims(hdims)
            out_dim = state["postwhiten.p"].shape[1] if postwhiten else (hd[-1] if hd else dim)
            rng = np.random.default_rng([seed, 1])
            centroids = rng.standard_normal((codebook_size(nclusters), out_dim)).astype(np.float32)
        write_codebook(cb, centroids, size=nclusters)
    return path, cb

