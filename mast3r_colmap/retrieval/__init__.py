"""Image retrieval as MASt3R-SfM does it: the training-free retrieval model on MASt3R encoder tokens, and ASMK.

Two files, side by side: ``<prefix>_trainingfree.pth`` and ``<prefix>_codebook.pkl``.

* :mod:`.network`: the retrieval head (configuration, modules, building it from the checkpoint);
* :mod:`.codebook`: reading the visual words (restricted unpickling);
* :mod:`.scoring`: ASMK similarities of images from their local descriptors;
* :mod:`.retriever`: :class:`Retriever` / :func:`load_retriever`, the two files together, scoring images with
  the encodings of a :class:`~mast3r_colmap.matching.matcher.Matcher`.
"""

from .codebook import codebook_path, read_codebook
from .network import (RetrievalConfig, RetrievalError, RetrievalModel, Whitener, codebook_size, load_retrieval_model,
                      read_retrieval_checkpoint)
from .retriever import Retriever, load_retriever, retrieval_features
from .scoring import asmk_similarity

__all__ = [
    "RetrievalError",
    "RetrievalConfig",
    "Whitener",
    "RetrievalModel",
    "Retriever",
    "codebook_path",
    "codebook_size",
    "read_codebook",
    "read_retrieval_checkpoint",
    "load_retrieval_model",
    "load_retriever",
    "retrieval_features",
    "asmk_similarity",
]
