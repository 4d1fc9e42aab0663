"""Pairs of images by their order alone: all of them (:func:`exhaustive`), or neighbours in a sequence
(:func:`sequential`), following the conventions of :mod:`mast3r_colmap.pairs`."""

from __future__ import annotations

import logging
from typing import Sequence

from .common import Pair, check_count, check_names, named

__all__ = ["exhaustive", "sequential"]

logger = logging.getLogger(__name__)


def exhaustive(names: Sequence[str]) -> list[Pair]:
    """All ``N (N - 1) / 2`` pairs ``(names[i], names[j])``, ``i < j`` (MASt3R ``complete``)."""
    names = check_names(names)
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
    names = check_names(names)
    window = check_count(window, "sequential window")
    n = len(names)
    if n < 2:
        return []
    offsets = set(range(1, min(window, n - 1) + 1))
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
    pairs = named(names, idx)
    logger.debug("sequential(window=%d, loop=%s, log=%s): %d images -> %d pairs",
                 window, loop_closure, log_offsets, n, len(pairs))
    return pairs

