"""What filled a COLMAP database: the content hash of each image and the matching settings.

Keypoints and matches in a database were made from certain pictures with certain settings, and the
matches of a re-run are snapped onto the stored keypoints. A re-run must therefore use the same pictures
and settings; :func:`check` refuses one that does not (a :class:`ValueError` naming each changed image
and each setting, old -> new) and :func:`record` stores what a run uses. The pairs are not recorded:
adding pairs or images to a database is a normal re-run. A database without recorded settings (new, or
made by :func:`~mast3r_colmap.mapping.database_from_reconstruction`) takes those of its first matching
run; an image without a recorded hash takes the hash of the first run that names it.

Both live in extra tables of the database file itself; pycolmap 4.2.1 leaves tables it does not know
alone (checked across open/close, transactions, ``clear_*``, ``verify_matches``,
``geometric_verification``, incremental and global mapping and ``triangulate_points``)::

    mast3r_images(name TEXT PRIMARY KEY, sha256 TEXT NOT NULL)
    mast3r_settings(key TEXT PRIMARY KEY, value TEXT NOT NULL)   -- flattened keys, JSON values

Call these functions while no transaction of pycolmap is open on the same file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Provenance", "check", "connect", "differences", "flatten_settings", "read", "record"]

logger = logging.getLogger(__name__)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS mast3r_images (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS mast3r_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
#: Changed images listed by name in the message of :func:`check`.
_MAX_LISTED = 10


@dataclass
class Provenance:
    """What a database records: ``{image name: sha256}`` and ``{setting key: JSON value}``."""

    images: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)


def flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as ``{"a.b": JSON text}`` (tuples and lists compare equal; keys sorted)."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_settings(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True, default=str)
    return dict(sorted(out.items()))


@contextlib.contextmanager
def connect(database: str | os.PathLike) -> Iterator[sqlite3.Connection]:
    """A plain SQLite connection to the database file; SQLite errors become ValueErrors naming it."""
    con = None
    try:
        con = sqlite3.connect(os.fspath(database), timeout=60)
        yield con
    except sqlite3.Error as exc:
        raise ValueError(f"cannot read or write database {os.fspath(database)!r}: {exc}") from None
    finally:
        if con is not None:
            con.close()


def read(database: str | os.PathLike) -> Provenance:
    """The recorded hashes and settings (empty for a database that records none, or no file)."""
    if not Path(database).is_file():
        return Provenance()
    with connect(database) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        out = Provenance()
        if "mast3r_images" in tables:
            out.images = dict(con.execute("SELECT name, sha256 FROM mast3r_images"))
        if "mast3r_settings" in tables:
            out.settings = dict(con.execute("SELECT key, value FROM mast3r_settings ORDER BY key"))
        return out


def differences(recorded: Provenance, hashes: Mapping[str, str], settings: Mapping[str, Any]) -> list[str]:
    """One line per image whose recorded hash differs from ``hashes`` and per differing setting."""
    lines = []
    changed = sorted(n for n, h in hashes.items() if recorded.images.get(n, h) != h)
    for name in changed[:_MAX_LISTED]:
        lines.append(f"image {name!r} changed (sha256 {recorded.images[name][:12]} -> {hashes[name][:12]})")
    if len(changed) > _MAX_LISTED:
        lines.append(f"... and {len(changed) - _MAX_LISTED} more changed images")
    if recorded.settings:
        new = flatten_settings(settings)
        for key in sorted(set(recorded.settings) | set(new)):
            old_value, new_value = recorded.settings.get(key, "(none)"), new.get(key, "(none)")
            if old_value != new_value:
                lines.append(f"setting {key}: {old_value} -> {new_value}")
    return lines


def check(database: str | os.PathLike, hashes: Mapping[str, str], settings: Mapping[str, Any]) -> None:
    """Raise a ValueError if ``database`` was filled from other pictures (``hashes``: ``{name: sha256}``
    of this run) or with other ``settings`` than this run's."""
    lines = differences(read(database), hashes, settings)
    if lines:
        raise ValueError(
            f"database {os.fspath(database)!r} was filled from other pictures or with other settings than this "
            "run's:\n  " + "\n  ".join(lines) + "\nIts keypoints and matches cannot be mixed with new ones: run "
            "again with --overwrite (overwrite=True) to start the database and its match store afresh, or "
            "give a new database path.")


def record(database: str | os.PathLike, hashes: Mapping[str, str], settings: Mapping[str, Any]) -> None:
    """Record the image hashes (new names; :func:`check` first) and, if none are recorded yet, the settings."""
    with connect(database) as con, con:
        for statement in _SCHEMA:
            con.execute(statement)
        con.executemany("INSERT OR REPLACE INTO mast3r_images VALUES (?, ?)", sorted(hashes.items()))
        if con.execute("SELECT COUNT(*) FROM mast3r_settings").fetchone()[0] == 0:
            con.executemany("INSERT INTO mast3r_settings VALUES (?, ?)", flatten_settings(settings).items())
            logger.info("recorded the matching settings in %s", os.fspath(database))
