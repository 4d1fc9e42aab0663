"""Reading the visual-word codebook of MASt3R-SfM's retrieval: ``<prefix>_codebook.pkl``.

The file sits beside the retrieval checkpoint (the checkpoint name with its last ``_``-separated token
replaced by ``codebook.pkl``) and holds the asmk Codebook state ``{'type': 'Codebook', 'params': {'size':
nclusters}, 'state': {'centroids': float32 (K, D)}}`` as a plain pickle.

It is read with a restricted unpickler that knows only plain containers and numpy array reconstruction
(the names of numpy 1.x and 2.x pickles), so a codebook cannot run code. This is the project's only
unpickler: checkpoints (``.pth``, a zip of tensors) go through ``torch.load(weights_only=True)`` in
:func:`~mast3r_colmap.model.checkpoint.load_training_container`, which cannot read a plain pickle.
"""

from __future__ import annotations

import codecs
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .network import RetrievalError, codebook_size

__all__ = ["codebook_path", "read_codebook"]


def codebook_path(checkpoint: str | os.PathLike) -> Path:
    """``<prefix>_codebook.pkl`` beside ``<prefix>_<anything>``: the last ``_`` token replaced."""
    path = Path(checkpoint)
    prefix, sep, _ = path.name.rpartition("_")
    return path.with_name(f"{prefix}{sep}codebook.pkl")


def _numpy_globals() -> Dict[Tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 keeps the implementation in numpy._core
    objs = {"_reconstruct": core.multiarray._reconstruct, "scalar": core.multiarray.scalar,
            "_frombuffer": core.numeric._frombuffer}
    out: Dict[Tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy.core", "numpy._core"):  # pickles of numpy 1.x and 2.x name different modules
        out[(f"{pkg}.multiarray", "_reconstruct")] = objs["_reconstruct"]
        out[(f"{pkg}.multiarray", "scalar")] = objs["scalar"]
        out[(f"{pkg}.numeric", "_frombuffer")] = objs["_frombuffer"]
    return out


class _SafeUnpickler(pickle.Unpickler):
    """Only builtin containers and numpy array reconstruction; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"disallowed class {module}.{name} (only numpy arrays and plain "
                                         "containers may appear in a codebook)")
        return allowed


_ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray, ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles of bytes
    **_numpy_globals(),
}


def read_codebook(path: str | os.PathLike, nclusters: Any, dim: Optional[int] = None) -> np.ndarray:
    """The (K, D) float32 centroids of an asmk codebook pickle, checked against ``nclusters`` and ``dim``."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"codebook {path} not found: the retrieval codebook must sit beside the checkpoint "
                             f"as <prefix>_codebook.pkl")
    try:
        with open(path, "rb") as f:
            data = _SafeUnpickler(f).load()
    except Exception as exc:  # disallowed global, truncated or corrupt file
        raise RetrievalError(f"cannot read codebook {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, Mapping) or data.get("type") != "Codebook" or not isinstance(data.get("state"), Mapping):
        raise RetrievalError(f"{path} is not an asmk codebook (expected {{'type': 'Codebook', 'params', 'state'}})")
    if data.get("params") != {"size": nclusters}:
        raise RetrievalError(f"{path}: codebook params {data.get('params')!r} do not match the checkpoint's "
                             f"{{'size': {nclusters!r}}}")
    centroids = data["state"].get("centroids")
    k = codebook_size(nclusters)
    if not isinstance(centroids, np.ndarray) or centroids.ndim != 2 or not np.issubdtype(centroids.dtype, np.floating):
        raise RetrievalError(f"{path}: centroids must be a 2-D float array, got "
                             f"{type(centroids).__name__} {getattr(centroids, 'shape', '')}")
    if centroids.shape[0] != k:
        raise RetrievalError(f"{path}: {centroids.shape[0]} centroids, but the codebook size is {nclusters!r} = {k}")
    if dim is not None and centroids.shape[1] != dim:
        raise RetrievalError(f"{path}: centroids of dimension {centroids.shape[1]}, but the retrieval features "
                             f"have dimension {dim}")
    if not np.isfinite(centroids).all():
        raise RetrievalError(f"{path}: centroids contain NaN or inf")
    return np.ascontiguousarray(centroids, dtype=np.float32)

