"""Keypoint and match scores kept beside COLMAP's own tables, for complete hloc exports.

COLMAP's database stores keypoints and matches without scores, but hloc's ``features.h5`` (``scores``)
and ``matches.h5`` (``matching_scores0``) carry them. So that an export can always be written from the
database alone (every image and pair, also those matched by an earlier run), the scores of what a run
writes are stored in two extra tables of the database file (COLMAP leaves them alone, see
:mod:`.provenance`), float32 little-endian blobs in the row order of COLMAP's keypoints / matches::

    mast3r_keypoint_scores(image_id INTEGER PRIMARY KEY, scores BLOB NOT NULL)
    mast3r_match_scores(pair_id INTEGER PRIMARY KEY, scores BLOB NOT NULL)   -- COLMAP's pair_id

Call these functions while no transaction of pycolmap is open on the same file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import pycolmap

from ..structures import ImageKeypoints, IndexMatches
from .provenance import connect

__all__ = ["read_keypoint_scores", "read_match_scores", "record"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS mast3r_keypoint_scores (image_id INTEGER PRIMARY KEY, scores BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS mast3r_match_scores (pair_id INTEGER PRIMARY KEY, scores BLOB NOT NULL)",
)


def _blob(values) -> bytes:
    return np.asarray(values, "<f4").tobytes()


def record(database: str | os.PathLike, ids: Mapping[str, int], keypoints: Mapping[str, ImageKeypoints],
           matches: Iterable[IndexMatches]) -> None:
    """Store the scores of ``keypoints`` (images without scores are skipped) and of ``matches``."""
    with connect(database) as con, con:
        for statement in _SCHEMA:
            con.execute(statement)
        # generators, not lists: sqlite3 takes the rows one at a time (keypoints and matches may be read lazily)
        con.executemany("INSERT OR REPLACE INTO mast3r_keypoint_scores VALUES (?, ?)",
                        ((int(ids[name]), _blob(kp.scores)) for name, kp in keypoints.items()
                         if kp.scores is not None))
        # pycolmap keeps the row order of a pair's matches when it swaps the pair, so the scores of a
        # pair are in COLMAP's row order whichever way round it was written
        con.executemany("INSERT OR REPLACE INTO mast3r_match_scores VALUES (?, ?)",
                        ((int(pycolmap.image_pair_to_pair_id(ids[m.name0], ids[m.name1])), _blob(m.scores))
                         for m in matches))


def _read(database: str | os.PathLike, table: str, key: str, wanted: Iterable[int]) -> dict[int, np.ndarray]:
    with connect(database) as con:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
            return {}
        out = {}
        for value in wanted:
            row = con.execute(f"SELECT scores FROM {table} WHERE {key} = ?", (int(value),)).fetchone()
            if row is not None:
                out[int(value)] = np.frombuffer(row[0], "<f4").copy()
        return out


def read_keypoint_scores(database: str | os.PathLike, image_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """``{image_id: scores}`` of the given images that have stored scores."""
    return _read(database, "mast3r_keypoint_scores", "image_id", image_ids)


def read_match_scores(database: str | os.PathLike, pair_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """``{pair_id: scores}`` (COLMAP's row order) of the given pairs that have stored scores."""
    return _read(database, "mast3r_match_scores", "pair_id", pair_ids)
