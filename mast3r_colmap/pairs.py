"""Image-pair selection ("which pairs to match") and hloc pairs files.

Image names are hloc-style relative POSIX paths (``"db/1045.jpg"``). A pair is a ``(name0, name1)`` tuple.

Conventions shared by every strategy (:func:`exhaustive`, :func:`sequential`, :func:`retrieval`,
:func:`retrieval_graph` and :func:`pairs_from_spec`):

* pairs are **unordered**: a pair and its reverse count once, and self-pairs are never produced;
* each pair is written in list order, ``(names[i], names[j])`` with ``i < j``;
* the returned list is sorted by ``(i, j)``, i.e. by the index of the first, then of the second image in
  the given name list, so the output is deterministic;
* fewer than two images give an empty list; window / neighbour / key counts larger than the number of
  images are clipped.

Strategies follow MASt3R-SfM's ``make_pairs`` (``complete``, ``swin``, ``logwin``, ``retrieval-Na-k``) and
hloc's ``pairs_from_*`` scripts; pairs files use hloc's text format (one ``name0 name1`` per line, no
trailing newline).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .utils import text_records

__all__ = [
    "Pair",
    "exhaustive",
    "sequential",
    "read_pairs",
    "write_pairs",
    "topk_neighbors",
    "retrieval",
    "global_descriptor_from_tokens",
    "farthest_point_sampling",
    "mast3r_sfm_graph",
    "retrieval_graph",
    "pairs_from_similarity",
    "pairs_from_spec",
]

logger = logging.getLogger(__name__)

Pair = tuple[str, str]

_WS = re.compile(r"\s")
_UINT = re.compile(r"^[0-9]+$")


# --------------------------------------------------------------------------------------------------------
# helpers

def _check_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"image names must be strings, got {type(n).__name__} {n!r}")
    if len(set(names)) != len(names):
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        raise ValueError(f"image names must be unique; duplicated: {dup[:5]}")
    return names


def _canonical(index_pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Unordered, unique, self-pair-free index pairs ``(i, j)``, ``i < j``, sorted."""
    out = {(min(i, j), max(i, j)) for i, j in index_pairs if i != j}
    return sorted((int(i), int(j)) for i, j in out)


def _named(names: Sequence[str], index_pairs: Iterable[tuple[int, int]]) -> list[Pair]:
    return [(names[i], names[j]) for i, j in _canonical(index_pairs)]


# --------------------------------------------------------------------------------------------------------
# exhaustive / sequential

def exhaustive(names: Sequence[str]) -> list[Pair]:
    """All ``N (N - 1) / 2`` pairs ``(names[i], names[j])``, ``i < j`` (MASt3R ``complete``)."""
    names = _check_names(names)
    n = len(names)
    pairs = [(names[i], names[j]) for i in range(n) for j in range(i + 1, n)]
    logger.debug("exhaustive: %d images -> %d pairs", n, len(pairs))
    return pairs


def sequential(names: Sequence[str], window: int = 3, loop_closure: bool = False,
               log_offsets: bool = False) -> list[Pair]:
    """Pairs of images close in list order (video / sequence capture).

    * Each image ``i`` is paired with its next ``window`` images ``i + 1 .. i + window`` (MASt3R
      ``swin-W-noncyclic``); ``window >= N - 1`` gives the exhaustive set.
    * ``loop_closure=True`` makes the sequence cyclic: images whose index distance modulo ``N``
      (``min(|i - j|, N - |i - j|)``) is at most ``window`` are also paired (MASt3R ``swin-W``), so the
      end of the sequence is linked to its start.
    * ``log_offsets=True`` adds sparse long-range pairs: each image with the images at offsets ``2^k``
      for every ``k`` with ``2^k < N`` (like MASt3R ``logwin``), cyclic when ``loop_closure`` is set.
    """
    names = _check_names(names)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"sequential window must be an integer >= 1, got {window!r}")
    n = len(names)
    if n < 2:
        return []
    offsets = set(range(1, min(int(window), n - 1) + 1))
    if log_offsets:
        k = 0
        while 2 ** k < n:
            offsets.add(2 ** k)
            k += 1
    idx: list[tuple[int, int]] = []
    for d in sorted(offsets):
        for i in range(n):
            j = i + d
            if j < n:
                idx.append((i, j))
            elif loop_closure:
                idx.append((i, j % n))
    pairs = _named(names, idx)
    logger.debug("sequential(window=%d, loop=%s, log=%s): %d images -> %d pairs",
                 window, loop_closure, log_offsets, n, len(pairs))
    return pairs


# --------------------------------------------------------------------------------------------------------
# hloc pairs files

def read_pairs(path: str | os.PathLike, dedupe: bool = False) -> list[Pair]:
    """Read an hloc pairs file: one ``name0 name1`` per line.

    Blank lines, lines starting with ``#`` and surrounding whitespace are ignored; names are separated by
    whitespace and cannot contain any. Pairs keep the file's order and orientation. With ``dedupe=True``,
    a pair already seen in either order is dropped (the first occurrence is kept), and so are self-pairs.

    Raises:
        ValueError: a line does not hold exactly two names (the message names the file and line).
    """
    path = Path(path)
    pairs: list[Pair] = []
    seen: set[frozenset[str]] = set()
    n_dropped = 0
    for where, parts in text_records(path):
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'name0 name1' (two names without spaces), "
                             f"got {' '.join(parts)!r}")
        a, b = parts
        if dedupe:
            key = frozenset((a, b))
            if a == b or key in seen:
                n_dropped += 1
                continue
            seen.add(key)
        pairs.append((a, b))
    if n_dropped:
        logger.info("%s: dropped %d duplicate or self pairs", path, n_dropped)
    logger.debug("read %d pairs from %s", len(pairs), path)
    return pairs


def write_pairs(path: str | os.PathLike, pairs: Iterable[tuple[str, str]]) -> None:
    """Write pairs in hloc's format: ``name0 name1`` lines joined by ``\\n``, no trailing newline.

    Raises:
        ValueError: a name is empty or contains whitespace (it could not be read back).
    """
    lines = []
    for k, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"pair #{k} must hold two names, got {pair!r}")
        for name in pair:
            if not isinstance(name, str) or not name or _WS.search(name):
                raise ValueError(f"pair #{k} {pair!r}: names must be non-empty strings without whitespace")
        lines.append(f"{pair[0]} {pair[1]}")
    with open(Path(path), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines))
    logger.debug("wrote %d pairs to %s", len(lines), path)


# --------------------------------------------------------------------------------------------------------
# retrieval (global descriptors)

def _normalized(descriptors: np.ndarray | torch.Tensor, n: int | None = None) -> np.ndarray:
    if isinstance(descriptors, torch.Tensor):
        descriptors = descriptors.detach().cpu().numpy()
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"global descriptors must be an (N, D) array, got shape {x.shape}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"got {x.shape[0]} global descriptors for {n} images")
    if x.shape[1] < 1 and x.shape[0] > 0:
        raise ValueError("global descriptors have dimension 0")
    if not np.isfinite(x).all():
        raise ValueError("global descriptors contain NaN or inf")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norm, 1e-12))


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:  # pragma: no cover - faiss is a dependency, the fallback is for minimal installs
        return None
    return faiss


def _rank(x: np.ndarray, i: int, cand: np.ndarray, k: int) -> np.ndarray:
    """The k best candidates of query i by exact float64 cosine, ties to the lower index.

    The score is an elementwise product summed along the contiguous axis, so each value depends only on
    the two vectors (not on BLAS blocking or on which other candidates are present): both back-ends give
    bit-identical rankings.
    """
    s = (x[cand] * x[i]).sum(axis=1)
    order = np.lexsort((cand, -s))
    return cand[order[:k]]


def _candidates_numpy(x: np.ndarray, k: int, chunk: int = 1024) -> list[np.ndarray]:
    n = len(x)
    margin = 1e-9
    out: list[np.ndarray] = []
    for start in range(0, n, chunk):
        sims = x[start:start + chunk] @ x.T
        rows = np.arange(sims.shape[0])
        sims[rows, rows + start] = -np.inf
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        for r in rows:
            out.append(np.flatnonzero(sims[r] >= kth[r] - margin))
    return out


def _candidates_faiss(x: np.ndarray, k: int, faiss) -> list[np.ndarray]:
    n, d = x.shape
    xf = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(d)
    index.add(xf)
    # float32 inner products of unit vectors are off by at most ~d * eps32; twice that (plus slack)
    # guarantees that every image tied with or above the exact k-th score is a candidate.
    margin = 1e-6 + 4.0 * (d + 2) * float(np.finfo(np.float32).eps)
    out: list[np.ndarray | None] = [None] * n
    todo = np.arange(n)
    kk = min(n, k + 1 + 8)
    while len(todo):
        sims, labels = index.search(xf[todo], kk)
        retry = []
        for q, s_row, l_row in zip(todo, sims, labels):
            keep = (l_row >= 0) & (l_row != q)
            s_other, l_other = s_row[keep], l_row[keep]
            kth = s_other[k - 1] if len(s_other) >= k else -np.inf
            complete = kk >= n or (len(s_other) > k and s_other[-1] < kth - margin)
            if complete:
                out[q] = l_other[s_other >= kth - margin].astype(np.int64)
            else:
                retry.append(q)
        todo = np.asarray(retry, dtype=np.int64)
        kk = min(n, 2 * kk)
    return out  # type: ignore[return-value]


def topk_neighbors(global_descriptors: np.ndarray | torch.Tensor, k: int,
                   use_faiss: bool | None = None) -> np.ndarray:
    """Indices ``(N, min(k, N - 1))`` of each image's most similar *other* images, best first.

    Similarity is the cosine (descriptors L2-normalised, dot product). Ties go to the lower index. With
    faiss (``IndexFlatIP``, used when installed unless ``use_faiss=False``) only the candidates are found by
    faiss; the final ranking is an exact float64 computation shared with the numpy path, so both
    back-ends return identical results.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"retrieval k must be an integer >= 1, got {k!r}")
    x = _normalized(global_descriptors)
    n = len(x)
    k = min(int(k), n - 1)
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64)
    faiss = _faiss() if use_faiss is not False else None
    if use_faiss and faiss is None:
        raise ValueError("use_faiss=True but faiss is not installed")
    cands = _candidates_faiss(x, k, faiss) if faiss is not None else _candidates_numpy(x, k)
    return np.stack([_rank(x, i, c, k) for i, c in enumerate(cands)]).astype(np.int64)


def retrieval(names: Sequence[str], global_descriptors: np.ndarray | torch.Tensor, k: int,
              use_faiss: bool | None = None) -> list[Pair]:
    """Each image with its top-``k`` most similar other images (cosine), as unordered unique pairs.

    See :func:`topk_neighbors` for the similarity, the tie-breaking and the faiss/numpy back-ends. ``k``
    is clipped to ``N - 1``.
    """
    names = _check_names(names)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"retrieval k must be an integer >= 1, got {k!r}")
    if len(names) < 2:
        return []
    _normalized(global_descriptors, len(names))  # validate shape before any work
    nn = topk_neighbors(global_descriptors, k, use_faiss=use_faiss)
    pairs = _named(names, ((i, int(j)) for i in range(len(names)) for j in nn[i]))
    logger.debug("retrieval(k=%d): %d images -> %d pairs", k, len(names), len(pairs))
    return pairs


def global_descriptor_from_tokens(tokens: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """A cheap global image descriptor pooled from MASt3R encoder tokens (after ``enc_norm``).

    Generalised-mean (GeM) pooling over the tokens of the ReLU'd features, then L2 normalisation::

        g_c = (mean_s max(t_sc, eps) ** p) ** (1 / p),   g = g / ||g||

    with ``p = 3`` by default (``p = 1`` is the mean of the ReLU'd tokens). Computed in float64 and
    returned in the input's floating dtype; there are no learned weights, and the result does not depend
    on the token order. ``tokens`` is ``(S, C)`` or ``(B, S, C)``; the result is ``(C,)`` or ``(B, C)``.
    """
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(np.asarray(tokens))
    if tokens.ndim not in (2, 3):
        raise ValueError(f"tokens must be (S, C) or (B, S, C), got shape {tuple(tokens.shape)}")
    if tokens.shape[-2] < 1 or tokens.shape[-1] < 1:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
    if not p > 0:
        raise ValueError(f"GeM power p must be > 0, got {p}")
    out_dtype = tokens.dtype if tokens.is_floating_point() else torch.float32
    t = tokens.detach().to(device="cpu", dtype=torch.float64)
    g = t.clamp_min(eps).pow(p).mean(dim=-2).pow(1.0 / p)
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return g.to(dtype=out_dtype, device=tokens.device)


# --------------------------------------------------------------------------------------------------------
# MASt3R-SfM retrieval graph

def _similarity(sim: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(sim, torch.Tensor):
        sim = sim.detach().cpu().numpy()
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square (N, N) matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity contains NaN or inf")
    return s


def farthest_point_sampling(dist: np.ndarray, n: int, start: int) -> list[int]:
    """Greedy farthest-point sampling of ``n`` indices from ``start``, in selection order.

    The distance of a candidate ``j`` to the selected set is ``min_s dist[s, j]``; the next index is the
    candidate maximising it (``np.argmax``: ties to the lower index). ``n`` is clipped to ``N``.
    """
    dist = np.asarray(dist, dtype=np.float64)
    total = dist.shape[0]
    n = min(int(n), total)
    if n < 1:
        return []
    selected = [int(start)]
    chosen = np.zeros(total, dtype=bool)
    chosen[start] = True
    d_min = dist[start].copy()
    while len(selected) < n:
        cand = np.where(chosen, -np.inf, d_min)
        nxt = int(np.argmax(cand))
        selected.append(nxt)
        chosen[nxt] = True
        d_min = np.minimum(d_min, dist[nxt])
    return selected


def mast3r_sfm_graph(similarity: np.ndarray | torch.Tensor, n_keys: int, k: int, seed: int = 0,
                     start: int | None = None) -> list[tuple[int, int]]:
    """The MASt3R-SfM ``retrieval-Na-k`` scene graph (``make_pairs_fps``) as sorted index pairs.

    1. ``dist = 1 - similarity``.
    2. Farthest-point sampling of ``n_keys`` key images (:func:`farthest_point_sampling`) from
       ``start``, by default ``int(np.random.default_rng(seed).integers(N))`` (deterministic, unlike the
       official unseeded ``np.random.choice``).
    3. The key images form a complete graph.
    4. Each non-key image is linked to its nearest key (``argmin dist[i, key]``, ties to the lower index).
    5. Each image ``i`` is linked to ``argsort(dist[i], stable)[:k]``, skipping ``i`` itself (as in the
       official code ``i`` is usually among them, so about ``k - 1`` neighbours are added).

    Returns unique ``(i, j)`` pairs, ``i < j``, sorted. ``n_keys`` and ``k`` are clipped to ``N``.
    """
    sim = _similarity(similarity)
    n = sim.shape[0]
    if isinstance(n_keys, bool) or not isinstance(n_keys, (int, np.integer)) or n_keys < 1:
        raise ValueError(f"n_keys must be an integer >= 1, got {n_keys!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if n < 2:
        return []
    if start is None:
        start = int(np.random.default_rng(seed).integers(n))
    elif not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    dist = 1.0 - sim
    keys = farthest_point_sampling(dist, n_keys, start)
    key_arr = np.array(sorted(keys), dtype=np.int64)
    idx: list[tuple[int, int]] = [(a, b) for a in keys for b in keys]
    is_key = np.zeros(n, dtype=bool)
    is_key[key_arr] = True
    for i in np.flatnonzero(~is_key):
        idx.append((int(i), int(key_arr[np.argmin(dist[i, key_arr])])))
    k = min(int(k), n)
    for i in range(n):
        for j in np.argsort(dist[i], kind="stable")[:k]:
            idx.append((i, int(j)))
    pairs = _canonical(idx)
    logger.debug("mast3r_sfm_graph(n_keys=%d, k=%d, start=%d): %d images -> %d pairs",
                 len(keys), k, start, n, len(pairs))
    return pairs


def retrieval_graph(names: Sequence[str], global_descriptors: np.ndarray | torch.Tensor, n_keys: int,
                    k: int, seed: int = 0) -> list[Pair]:
    """:func:`mast3r_sfm_graph` on the cosine similarity of global descriptors, as name pairs."""
    names = _check_names(names)
    if len(names) < 2:
        return []
    x = _normalized(global_descriptors, len(names))
    return [(names[i], names[j]) for i, j in mast3r_sfm_graph(x @ x.T, n_keys, k, seed=seed)]


def pairs_from_similarity(names: Sequence[str], similarity: np.ndarray | torch.Tensor, k: int,
                          n_keys: int | None = None, seed: int = 0) -> list[Pair]:
    """Pairs from an ``(N, N)`` image similarity (rows are queries; it need not be symmetric).

    * ``n_keys=None``: each image ``i`` with its ``k`` most similar other images (``similarity[i]``
      descending, ties to the lower index), as unordered unique pairs (``k`` clipped to ``N - 1``);
    * otherwise :func:`mast3r_sfm_graph` (MASt3R-SfM ``retrieval-Na-k``, deterministic with ``seed``).
    """
    names = _check_names(names)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"retrieval k must be an integer >= 1, got {k!r}")
    sim = _similarity(similarity)
    n = len(names)
    if sim.shape[0] != n:
        raise ValueError(f"got a {sim.shape[0]}x{sim.shape[1]} similarity for {n} images")
    if n < 2:
        return []
    if n_keys is not None:
        return [(names[i], names[j]) for i, j in mast3r_sfm_graph(sim, n_keys, k, seed=seed)]
    kk = min(int(k), n - 1)
    idx: list[tuple[int, int]] = []
    cols = np.arange(n)
    for i in range(n):
        others = cols[cols != i]
        order = np.lexsort((others, -sim[i, others]))
        idx.extend((i, int(j)) for j in others[order[:kk]])
    pairs = _named(names, idx)
    logger.debug("pairs_from_similarity(k=%d): %d images -> %d pairs", kk, n, len(pairs))
    return pairs


# --------------------------------------------------------------------------------------------------------
# CLI spec

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
    * ``retrieval:K`` -> :func:`retrieval` with top-``K`` neighbours
    * ``retrieval:Na,K`` -> :func:`retrieval_graph` (MASt3R-SfM ``retrieval-Na-K``, with ``seed``)
    * anything else is the path of an hloc pairs file; its pairs are de-duplicated and put in the
      canonical order of ``names``; a name missing from ``names`` raises ValueError.

    For retrieval specs ``descriptors_fn(names)`` must return the ``(N, D)`` global descriptors; when
    ``similarity_fn`` is given it is used instead: ``similarity_fn(names)`` returns an ``(N, N)``
    similarity (e.g. ASMK scores, :mod:`mast3r_colmap.retrieval`) and the pairs come from
    :func:`pairs_from_similarity`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty pairs spec; {_SPEC_HELP}")
    names = _check_names(names)
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
            return retrieval(names, desc, k)
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
    pairs = _named(names, ((index[a], index[b]) for a, b in file_pairs))
    logger.info("pairs file %s: %d unique pairs", path, len(pairs))
    return pairs
