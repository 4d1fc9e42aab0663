"""A crash-safe store of raw pair matches, so that long matching runs can resume.

Each finished pair is committed in its own SQLite transaction (journalled by SQLite), so a run killed
at any moment (even ``kill -9``) loses at most the pair in flight and never leaves a half-written
one.

Stored matches are reused only while they describe the same inputs. Rows are keyed by the unordered
image pair and a key of the matching configuration (the digest of the weights, preset, ...), and carry
the content hash (sha256) of both image files as they were when the pair was matched: a changed
configuration, or a new picture under an old name, never reuses stale matches (the pair is matched
again and its row replaced). File hashes are kept in a fingerprint table: a file whose size and
modification time (ns) are unchanged is not read again. A store opened without an image folder cannot
hash files and keys pairs by their names only.

Each row also keeps the sampling grid of each side (:class:`~.structures.SamplingGrid`, NULL for none)
and the row format it was written in (:data:`FORMAT`). Rows of another format, such as those of a
store written before grids were kept (format 1), are never reused: their pairs are matched again and
the rows replaced, so no match is read back without the grid it was made on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Set, Tuple

import numpy as np

from .structures import PairMatches, SamplingGrid

logger = logging.getLogger(__name__)

#: The row format written by this version: 2 = with sampling grids (1: the rows of earlier versions).
FORMAT = 2

_SCHEMA = ("""
CREATE TABLE IF NOT EXISTS pair_matches (
    config TEXT NOT NULL,
    name0 TEXT NOT NULL,
    name1 TEXT NOT NULL,
    num INTEGER NOT NULL,
    xy0 BLOB NOT NULL,
    xy1 BLOB NOT NULL,
    scores BLOB NOT NULL,
    hash0 TEXT NOT NULL,  -- sha256 of the files when matched ('' without an image folder)
    hash1 TEXT NOT NULL,
    grid0 BLOB,           -- SamplingGrid (ox, oy, sx, sy) as 4 little-endian float64, NULL for none
    grid1 BLOB,
    format INTEGER NOT NULL DEFAULT 1,  -- rows of another format than FORMAT are never reused
    PRIMARY KEY (config, name0, name1)
)""", """
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY,  -- absolute path of an image file
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
)""")

_CHUNK = 1 << 20


def config_key(settings: Mapping[str, Any]) -> str:
    """A short stable digest of the settings that determine the matches."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _grid_blob(grid: Optional[SamplingGrid]) -> Optional[bytes]:
    return None if grid is None else np.array([grid.ox, grid.oy, grid.sx, grid.sy], "<f8").tobytes()


def _grid_of(blob: Optional[bytes]) -> Optional[SamplingGrid]:
    return None if blob is None else SamplingGrid(*np.frombuffer(blob, "<f8").tolist())


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class MatchStore:
    """Raw per-pair matches (float32 coordinates) in a SQLite file, one transaction per pair.

    Pairs are stored with ``name0 < name1``; :meth:`get` returns them in the orientation asked for.
    With ``image_dir``, image names are files under it, and a pair counts as stored only while both
    files have the content they had when it was matched (:meth:`file_hash`).
    """

    def __init__(self, path: str | os.PathLike, config: str, image_dir: Optional[str | os.PathLike] = None,
                 read_only: bool = False):
        self.path = Path(path)
        self.config = config
        self.image_dir = Path(image_dir) if image_dir is not None else None
        #: opened with SQLite's ``mode=ro`` (e.g. the shard stores a merge reads): nothing is ever written to it,
        #: not even file fingerprints (a file not in its fingerprint table is hashed again, in memory only)
        self.read_only = read_only
        self._hashes: Dict[str, str] = {}
        try:
            if read_only and not self.path.is_file():
                raise sqlite3.OperationalError("no such file")
            self._db = (sqlite3.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True) if read_only
                        else sqlite3.connect(str(self.path)))
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                self._db.execute(statement)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(pair_matches)")}
            # a store of an older version: its rows are never reused (read-only: it holds no usable row)
            added = [(c, k) for c, k in (("hash0", "TEXT NOT NULL DEFAULT '-'"), ("hash1", "TEXT NOT NULL DEFAULT '-'"),
                                         ("grid0", "BLOB"), ("grid1", "BLOB"),
                                         ("format", "INTEGER NOT NULL DEFAULT 1")) if c not in columns]
            self._outdated = bool(added) and read_only
            for column, kind in ([] if read_only else added):
                self._db.execute(f"ALTER TABLE pair_matches ADD COLUMN {column} {kind}")
            self._db.commit()
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open the match store {str(self.path)!r}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "MatchStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- image content -------------------------------------------------------------------------

    def file_hash(self, name: str) -> Optional[str]:
        """sha256 of the file of image ``name`` (None without an image folder); OSError if unreadable.

        Read once per store and file version: a file whose size and mtime (ns) match the fingerprint
        table is not read again.
        """
        if self.image_dir is None:
            return None
        if name in self._hashes:
            return self._hashes[name]
        path = os.path.abspath(self.image_dir / name)
        st = os.stat(path)
        row = self._db.execute("SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
                               (path, st.st_size, st.st_mtime_ns)).fetchone()
        if row is not None:
            digest = row[0]
        else:
            digest = file_sha256(path)
            if not self.read_only:
                with self._db:
                    self._db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)",
                                     (path, st.st_size, st.st_mtime_ns, digest))
            logger.debug("hashed %s: %s", path, digest[:12])
        self._hashes[name] = digest
        return digest

    def _current(self, name: str) -> Optional[str]:
        """:meth:`file_hash` as stored in rows ('' without an image folder), None if unreadable."""
        try:
            digest = self.file_hash(name)
        except OSError:
            return None
        return "" if digest is None else digest

    def _fresh(self, name0: str, name1: str, hash0: str, hash1: str) -> bool:
        """Whether a row stored with these hashes still describes the files."""
        return hash0 == self._current(name0) and hash1 == self._current(name1)

    # ---- pairs ---------------------------------------------------------------------------------

    @staticmethod
    def _key(name0: str, name1: str) -> Tuple[str, str, bool]:
        return (name0, name1, False) if name0 < name1 else (name1, name0, True)

    def done_pairs(self) -> Set[frozenset]:
        """The unordered pairs stored for this configuration whose image files are unchanged."""
        if self._outdated:
            return set()
        rows = self._db.execute("SELECT name0, name1, hash0, hash1 FROM pair_matches WHERE config = ? AND "
                                "format = ?", (self.config, FORMAT)).fetchall()
        return {frozenset((a, b)) for a, b, h0, h1 in rows if self._fresh(a, b, h0, h1)}

    def _row(self, name0: str, name1: str, columns: str) -> Optional[tuple]:
        """The columns of the fresh row of an ordered (``name0 < name1``) pair, None if absent or stale."""
        if self._outdated:
            return None
        row = self._db.execute(f"SELECT hash0, hash1, {columns} FROM pair_matches WHERE config = ? AND "
                               "name0 = ? AND name1 = ? AND format = ?", (self.config, name0, name1, FORMAT)).fetchone()
        if row is None or not self._fresh(name0, name1, row[0], row[1]):
            return None
        return row[2:]

    def __contains__(self, pair: Tuple[str, str]) -> bool:
        a, b, _ = self._key(*pair)
        return self._row(a, b, "1") is not None

    def put(self, matches: PairMatches) -> None:
        """Store (or replace) the matches of one pair with the hashes of its files, committed at once."""
        if matches.name0 > matches.name1:
            matches = matches.swapped()
        hash0, hash1 = (self.file_hash(n) or "" for n in (matches.name0, matches.name1))
        with self._db:  # one transaction
            self._db.execute(
                "INSERT OR REPLACE INTO pair_matches (config, name0, name1, num, xy0, xy1, scores, hash0, hash1, "
                "grid0, grid1, format) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.config, matches.name0, matches.name1, len(matches),
                 matches.xy0.astype("<f4").tobytes(), matches.xy1.astype("<f4").tobytes(),
                 matches.scores.astype("<f4").tobytes(), hash0, hash1,
                 _grid_blob(matches.grid0), _grid_blob(matches.grid1), FORMAT))

    def get(self, name0: str, name1: str) -> PairMatches:
        """The stored matches of a pair, oriented as (name0, name1). KeyError if absent or stale."""
        a, b, swap = self._key(name0, name1)
        row = self._row(a, b, "num, xy0, xy1, scores, grid0, grid1")
        if row is None:
            raise KeyError((name0, name1))
        num, xy0, xy1, scores, grid0, grid1 = row
        pm = PairMatches(a, b, np.frombuffer(xy0, "<f4").reshape(num, 2), np.frombuffer(xy1, "<f4").reshape(num, 2),
                         np.frombuffer(scores, "<f4"), _grid_of(grid0), _grid_of(grid1))
        return pm.swapped() if swap else pm

    def get_many(self, pairs: Iterable[Tuple[str, str]]) -> Iterator[PairMatches]:
        for name0, name1 in pairs:
            yield self.get(name0, name1)
