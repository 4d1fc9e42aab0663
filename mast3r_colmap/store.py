"""A crash-safe store of raw pair matches, so that long matching runs can resume.

Each finished pair is committed in its own SQLite transaction (journalled by SQLite), so a run killed
at any moment (even ``kill -9``) loses at most the pair in flight and never leaves a half-written
one. Rows are keyed by the unordered image pair and a key of the matching configuration (checkpoint,
preset, ...): changing the configuration never reuses stale matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Set, Tuple

import numpy as np

from .structures import PairMatches

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pair_matches (
    config TEXT NOT NULL,
    name0 TEXT NOT NULL,
    name1 TEXT NOT NULL,
    num INTEGER NOT NULL,
    xy0 BLOB NOT NULL,
    xy1 BLOB NOT NULL,
    scores BLOB NOT NULL,
    PRIMARY KEY (config, name0, name1)
)
"""


def config_key(settings: Mapping[str, Any]) -> str:
    """A short stable digest of the settings that determine the matches."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class MatchStore:
    """Raw per-pair matches (float32 coordinates) in a SQLite file, one transaction per pair.

    Pairs are stored with ``name0 < name1``; :meth:`get` returns them in the orientation asked for.
    """

    def __init__(self, path: str | os.PathLike, config: str):
        self.path = Path(path)
        self.config = config
        try:
            self._db = sqlite3.connect(str(self.path))
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open the match store {str(self.path)!r}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "MatchStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _key(name0: str, name1: str) -> Tuple[str, str, bool]:
        return (name0, name1, False) if name0 < name1 else (name1, name0, True)

    def done_pairs(self) -> Set[frozenset]:
        """The unordered pairs already stored for this configuration."""
        rows = self._db.execute("SELECT name0, name1 FROM pair_matches WHERE config = ?", (self.config,))
        return {frozenset(r) for r in rows}

    def __contains__(self, pair: Tuple[str, str]) -> bool:
        a, b, _ = self._key(*pair)
        row = self._db.execute("SELECT 1 FROM pair_matches WHERE config = ? AND name0 = ? AND name1 = ?",
                               (self.config, a, b)).fetchone()
        return row is not None

    def put(self, matches: PairMatches) -> None:
        """Store (or replace) the matches of one pair, committed at once."""
        if matches.name0 > matches.name1:
            matches = matches.swapped()
        with self._db:  # one transaction
            self._db.execute(
                "INSERT OR REPLACE INTO pair_matches VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.config, matches.name0, matches.name1, len(matches),
                 matches.xy0.astype("<f4").tobytes(), matches.xy1.astype("<f4").tobytes(),
                 matches.scores.astype("<f4").tobytes()))

    def get(self, name0: str, name1: str) -> PairMatches:
        """The stored matches of a pair, oriented as (name0, name1). KeyError if absent."""
        a, b, swap = self._key(name0, name1)
        row = self._db.execute("SELECT num, xy0, xy1, scores FROM pair_matches WHERE config = ? AND "
                               "name0 = ? AND name1 = ?", (self.config, a, b)).fetchone()
        if row is None:
            raise KeyError((name0, name1))
        num, xy0, xy1, scores = row
        pm = PairMatches(a, b, np.frombuffer(xy0, "<f4").reshape(num, 2), np.frombuffer(xy1, "<f4").reshape(num, 2),
                         np.frombuffer(scores, "<f4"))
        return pm.swapped() if swap else pm

    def get_many(self, pairs: Iterable[Tuple[str, str]]) -> Iterator[PairMatches]:
        for name0, name1 in pairs:
            yield self.get(name0, name1)
