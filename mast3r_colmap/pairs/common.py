"""The conventions every pair strategy follows (see :mod:`mast3r_colmap.pairs`): unique string names,
unordered pairs ``(names[i], names[j])`` with ``i < j`` sorted by ``(i, j)``, and positive counts."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

Pair = tuple[str, str]


def check_names(names: Sequence[str]) -> list[str]:
    """``names`` as a list; ValueError unless they are unique strings."""
    names = list(names)
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"image names must be strings, got {type(n).__name__} {n!r}")
    if len(set(names)) != len(names):
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        raise ValueError(f"image names must be unique; duplicated: {dup[:5]}")
    return names


def check_count(value: Any, what: str, minimum: int = 1) -> int:
    """``value`` as an int; ValueError ``"<what> must be an integer >= <minimum>"`` for anything else
    (booleans and floats included)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def canonical(index_pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Unordered, unique, self-pair-free index pairs ``(i, j)``, ``i < j``, sorted."""
    out = {(min(i, j), max(i, j)) for i, j in index_pairs if i != j}
    return sorted((int(i), int(j)) for i, j in out)


def named(names: Sequence[str], index_pairs: Iterable[tuple[int, int]]) -> list[Pair]:
    """:func:`canonical` index pairs as name pairs."""
    return [(names[i], names[j]) for i, j in canonical(index_pairs)]
