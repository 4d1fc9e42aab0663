"""The retriever: a training-free retrieval model and its codebook, scoring images on a shared matcher.

:func:`load_retriever` reads ``<prefix>_trainingfree.pth`` (:mod:`.network`) and the
``<prefix>_codebook.pkl`` beside it (:mod:`.codebook`) and checks that they fit each other.
:meth:`Retriever.similarity_fn` gives ``names -> (N, N)`` ASMK similarities (:mod:`.scoring`) for
:func:`~mast3r_colmap.pairs.pairs_from_spec`.

Encodings are shared with matching: :func:`retrieval_features` takes them from the matcher's
:class:`~mast3r_colmap.matching.matcher.EncodingCache`, so images that are still cached when matching starts
are not encoded again.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch

from .codebook import codebook_path, read_codebook
from .network import RetrievalError, RetrievalModel, load_retrieval_model
from .scoring import asmk_similarity

__all__ = ["Retriever", "load_retriever", "retrieval_features"]

logger = logging.getLogger(__name__)


def retrieval_features(matcher: Any, names: Sequence[str], model: RetrievalModel,
                       batch_size: Optional[int] = None) -> List[np.ndarray]:
    """Local retrieval descriptors ``(<= nfeat, D')`` float32 of each image, from the matcher's encodings.

    Images are loaded by ``matcher.image(name)`` and encoded through ``matcher.encodings.get_many`` with
    the key ``(name, None)``, exactly as matching does, so an image is encoded once for both as long as
    its encoding is still in the cache when its pairs are matched. The cache is an LRU of
    ``matcher.conf.cache_size`` encodings (default 128; about ``S * C * 4`` bytes each, 3 MiB for a
    512x384 image with the ViT-L encoder): with more images than that, the encodings of the first images
    are evicted while the later ones are described, and matching encodes them again (the encoder then
    runs up to twice per image, as it would for the pooled global descriptors). A larger cache
    (``get_config(preset, cache_size=N)``) trades that recomputation for memory.

    The images are encoded at the matcher's resolution (``matcher.conf.image_size``); a checkpoint made
    for another ``imsize`` gets a warning.
    """
    imsize = model.config.imsize
    conf_size = getattr(getattr(matcher, "conf", None), "image_size", None)
    if imsize is not None and conf_size is not None and imsize != conf_size:
        logger.warning("retrieval model made for %d-px images, but the matcher encodes at %d px; the shared "
                       "encodings are used anyway", imsize, conf_size)
    batch_size = batch_size or getattr(getattr(matcher, "conf", None), "batch_size", 8)
    names = list(names)
    out: List[np.ndarray] = []
    device = None
    with torch.inference_mode():
        loaded = matcher.images(names) if hasattr(matcher, "images") else map(matcher.image, names)
        for _ in range(0, len(names), batch_size):
            images = list(itertools.islice(loaded, batch_size))
            encs = matcher.encodings.get_many([(im.name, None) for im in images], [im.img for im in images])
            for enc in encs:
                tokens = enc.tokens
                if device is None:
                    device = tokens.device
                    if model.device != device:
                        model.to(device)
                feats = model.local_features(tokens.to(device).float())[0]
                out.append(feats.float().cpu().numpy())
        getattr(loaded, "close", lambda: None)()  # stops the loader threads
    return out


class Retriever:
    """A retrieval model and its codebook: MASt3R-SfM's ``Retriever`` on a shared :class:`Matcher`."""

    def __init__(self, model: RetrievalModel, centroids: np.ndarray, source: str = ""):
        if centroids.shape[1] != model.output_dim:
            raise RetrievalError(f"{source}: codebook dimension {centroids.shape[1]} != retrieval feature "
                                 f"dimension {model.output_dim}")
        self.model = model
        self.centroids = centroids
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, encoder_dim: Optional[int] = None) -> "Retriever":
        """Load ``<prefix>_trainingfree.pth`` and the ``<prefix>_codebook.pkl`` beside it."""
        model = load_retrieval_model(path, encoder_dim)
        config = model.config
        centroids = read_codebook(codebook_path(path), config.nclusters, model.output_dim)
        logger.info("retrieval model %s: %s, nfeat=%d, %d visual words", path, config.describe(),
                    config.nfeat, len(centroids))
        return cls(model, centroids, str(path))

    def check_encoder(self, encoder_dim: int) -> None:
        """Raise :class:`RetrievalError` when the retrieval model does not take tokens of ``encoder_dim``."""
        if encoder_dim != self.model.input_dim:
            raise RetrievalError(f"retrieval model {self.source} takes features of dimension "
                                 f"{self.model.input_dim}, but the MASt3R encoder gives {encoder_dim}")

    def features(self, matcher: Any, names: Sequence[str]) -> List[np.ndarray]:
        """:func:`retrieval_features` of the images (encodings shared with the matcher)."""
        return retrieval_features(matcher, names, self.model)

    def similarity(self, features: Sequence[np.ndarray], device: Optional[str | torch.device] = None) -> np.ndarray:
        """The ``(N, N)`` ASMK similarity of :func:`~.scoring.asmk_similarity` (words assigned on ``device``,
        default CUDA when available)."""
        return asmk_similarity(features, self.centroids, device=device)

    def similarity_fn(self, matcher: Any) -> Callable[[List[str]], np.ndarray]:
        """``names -> (N, N)`` similarity, for :func:`~mast3r_colmap.pairs.pairs_from_spec` (``similarity_fn``);
        everything runs on the device of the matcher's model."""
        device = getattr(getattr(matcher, "model", None), "device", None)

        def fn(names: List[str]) -> np.ndarray:
            t0 = time.perf_counter()
            feats = self.features(matcher, names)
            logger.info("retrieval features of %d images in %.1f s", len(names), time.perf_counter() - t0)
            return self.similarity(feats, device)
        return fn


def load_retriever(path: str | os.PathLike, encoder_dim: Optional[int] = None) -> Retriever:
    """:meth:`Retriever.from_checkpoint`."""
    return Retriever.from_checkpoint(path, encoder_dim)
