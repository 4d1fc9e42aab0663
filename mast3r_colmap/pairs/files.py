"""hloc pairs files: one ``name0 name1`` per line, names without whitespace, no trailing newline."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable

from ..utils import atomic_write_text, text_records
from .common import Pair

__all__ = ["read_pairs", "write_pairs"]

logger = logging.getLogger(__name__)

_WS = re.compile(r"\s")


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
    atomic_write_text(path, "\n".join(lines))  # hloc never reads a half-written pairs file
    logger.debug("wrote %d pairs to %s", len(lines), path)

