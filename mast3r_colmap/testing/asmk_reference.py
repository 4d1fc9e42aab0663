"""The asmk package (MIT) scoring images as MASt3R-SfM's Retriever calls it: the reference that
:func:`mast3r_colmap.retrieval.asmk_similarity` is tested and benchmarked against.

Needs ``pip install asmk`` (the ``test`` extra; it brings faiss). MASt3R-SfM's parameters: binary kernel,
no idf, multiple assignment 1 for the database and 5 for the queries, similarity threshold 0, alpha 3.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

__all__ = ["ASMK_PARAMS", "asmk_available", "asmk_package_similarity"]

#: The ASMK parameters of MASt3R-SfM's Retriever (asmk package layout).
ASMK_PARAMS: Dict[str, Any] = {
    "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                  "quantize": {"multiple_assignment": 1}, "aggregate": {}},
    "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {}, "search": {"topk": None},
                  "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}},
}


def asmk_available() -> bool:
    """Whether the ``asmk`` package (with its compiled hamming module) can be imported."""
    try:
        import asmk.asmk_method  # noqa: F401, PLC0415
        import asmk.hamming  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def asmk_package_similarity(features: Sequence[np.ndarray], centroids: np.ndarray, codebook_size: Any = None,
                            use_gpu: bool = False) -> np.ndarray:
    """``(N, N)`` ASMK similarity by the asmk package with :data:`ASMK_PARAMS` (rows are queries).

    ``codebook_size`` is the codebook's ``size`` parameter as written in its file (default ``K``).
    """
    from asmk import asmk_method, codebook as cdb_pkg, index as idx_pkg  # noqa: PLC0415

    size = len(centroids) if codebook_size is None else codebook_size
    params = {"index": {"gpu_id": 0 if use_gpu else None}, "train_codebook": {"codebook": {"size": size}},
              **ASMK_PARAMS}
    codebook = cdb_pkg.Codebook(idx_pkg.initialize_index(params["index"]["gpu_id"]), size=size)
    codebook.index(np.ascontiguousarray(centroids, dtype=np.float32))
    method = asmk_method.ASMKMethod(params, {}, codebook=codebook)
    vecs = np.concatenate([np.asarray(f, dtype=np.float32) for f in features])
    imids = np.concatenate([np.full(len(f), i, dtype=np.int64) for i, f in enumerate(features)])
    built = method.build_ivf(vecs, imids.copy())
    _, images, ranks, scores = built.query_ivf(vecs, imids.copy())
    sim = np.zeros((len(features), len(features)), dtype=np.float64)
    sim[np.asarray(images)[:, None], ranks] = scores
    return sim
