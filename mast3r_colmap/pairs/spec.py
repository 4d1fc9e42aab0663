"""The ``--pairs`` spec of the command line: a strategy name with its arguments, or an hloc pairs file."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .common import Pair, check_names, named
from .files import read_pairs
from .similarity import pairs_from_descriptors, pairs_from_similarity, retrieval_graph
from .strategies import exhaustive, sequential

__all__ = ["pairs_from_spec"]

logger = logging.getLogger(__name__)

_UINT = re.compile(r"^[0-9]+$")

_SPEC_HELP = ("expected 'exhaustive', 'sequential:W', 'sequential:W:loop', 'retrieval:K', "
              "'retrieval:Na,K' or the path of an existing pairs file")


def _spec_int(text: str, what: str, spec: str, minimum: int = 1) -> int:
    text = text.strip()
    if not _UINT.match(text) or int(text) < minimum:
        raise ValueError(f"pairs spec {spec!r}: {what} must be an integer >= {minimum}, got {text!r}")
    return int(text)


def pairs_from_spec(spec: str, names: Sequence[str],
                    descriptors_fn: Callable[[list[str]], np.ndarray] | None = None,
                    seed: int = 0,
                    similarity_fn: Callable[[list[str]], np.ndarray] | None = None) -> list[Pair]:
    """Pairs from a CLI spec string.

    * ``exhaustive`` -> :func:`exhaustive`
    * ``sequential:W`` / ``sequential:W:loop`` -> :func:`sequential` (``loop`` = cyclic loop closure)
    * ``retrieval:K`` -> :func:`~.similarity.pairs_from_descriptors` with top-``K`` neighbours
    * ``retrieval:Na,K`` -> :func:`~.similarity.retrieval_graph` (MASt3R-SfM ``retrieval-Na-K``, with ``seed``)
    * anything else is the path of an hloc pairs file; its pairs are de-duplicated and put in the
      canonical order of ``names``; a name missing from ``names`` raises ValueError.

    For retrieval specs ``descriptors_fn(names)`` must return the ``(N, D)`` global descriptors; when
    ``similarity_fn`` is given it is used instead: ``similarity_fn(names)`` returns an ``(N, N)``
    similarity (e.g. ASMK scores, :mod:`mast3r_colmap.retrieval`) and the pairs come from
    :func:`~.similarity.pairs_from_similarity`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty pairs spec; {_SPEC_HELP}")
    names = check_names(names)
    spec = spec.strip()
    head, _, rest = spec.partition(":")
    head_l = head.lower()

    if head_l == "exhaustive":
        if rest:
            raise ValueError(f"pairs spec {spec!r}: 'exhaustive' takes no argument")
        return exhaustive(names)

    if head_l == "sequential":
        parts = rest.split(":") if rest else []
        if not 1 <= len(parts) <= 2:
            raise ValueError(f"pairs spec {spec!r}: expected 'sequential:W' or 'sequential:W:loop'")
        window = _spec_int(parts[0], "the window W", spec)
        loop = False
        if len(parts) == 2:
            if parts[1].strip().lower() != "loop":
                raise ValueError(f"pairs spec {spec!r}: unknown sequential option {parts[1]!r} "
                                 "(only 'loop' is supported)")
            loop = True
        return sequential(names, window, loop_closure=loop)

    if head_l == "retrieval":
        if not rest:
            raise ValueError(f"pairs spec {spec!r}: expected 'retrieval:K' or 'retrieval:Na,K'")
        parts = rest.split(",")
        if len(parts) == 1:
            k, n_keys = _spec_int(parts[0], "K", spec), None
        elif len(parts) == 2:
            n_keys, k = _spec_int(parts[0], "Na", spec), _spec_int(parts[1], "K", spec)
        else:
            raise ValueError(f"pairs spec {spec!r}: expected 'retrieval:K' or 'retrieval:Na,K'")
        if descriptors_fn is None and similarity_fn is None:
            raise ValueError(f"pairs spec {spec!r} needs global descriptors, but no descriptors_fn was given")
        if len(names) < 2:
            return []
        if similarity_fn is not None:
            return pairs_from_similarity(names, similarity_fn(list(names)), k, n_keys=n_keys, seed=seed)
        desc = descriptors_fn(list(names))
        if n_keys is None:
            return pairs_from_descriptors(names, desc, k)
        return retrieval_graph(names, desc, n_keys, k, seed=seed)

    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown pairs strategy or missing pairs file {spec!r}; {_SPEC_HELP}")
    index = {n: i for i, n in enumerate(names)}
    file_pairs = read_pairs(path, dedupe=True)
    missing = sorted({n for pair in file_pairs for n in pair if n not in index})
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"pairs file {path}: {len(missing)} image name(s) not among the {len(names)} "
                         f"images: {missing[:5]}{more}")
    pairs = named(names, ((index[a], index[b]) for a, b in file_pairs))
    logger.info("pairs file %s: %d unique pairs", path, len(pairs))
    return pairs
