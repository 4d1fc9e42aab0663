"""Focal priors from the network: set on COLMAP's cameras, and recorded beside them.

COLMAP's camera table says *whether* a camera has a focal prior (``has_prior_focal_length``), not where
it came from. A run that sets the focal of a new camera from the network's pointmaps
(:meth:`~mast3r_colmap.matching.matcher.Matcher.focal_priors`, chosen by the pipeline) writes the camera
through ``pycolmap.Database`` (:func:`set_camera_focals`) and then records the value in an extra table of
the database file (COLMAP leaves it alone, see :mod:`.provenance`)::

    mast3r_focal_priors(camera_id INTEGER PRIMARY KEY, focal REAL NOT NULL, num_images INTEGER NOT NULL)

so that the mapping summary can tell a network prior from an EXIF or user one (:func:`read`), and a re-run
in camera mode ``auto`` can group new images without an EXIF focal with such a camera, as one run over all
the images would (:func:`~.colmap_db.import_images`, ``estimated_cameras``).

The camera is written first, the record right after: a run killed between the two (a few milliseconds)
leaves a network prior that reads as an EXIF or user one. Call :func:`record` and :func:`read` while no
transaction of pycolmap is open on the same file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import pycolmap

from .provenance import connect

__all__ = ["read", "record", "set_camera_focals"]

logger = logging.getLogger(__name__)

_TABLE = "mast3r_focal_priors"
_SCHEMA = (f"CREATE TABLE IF NOT EXISTS {_TABLE} (camera_id INTEGER PRIMARY KEY, focal REAL NOT NULL, "
           "num_images INTEGER NOT NULL)")


def set_camera_focals(d: pycolmap.Database, focals: Mapping[int, float]) -> None:
    """Give the cameras ``{camera_id: focal}`` that focal (every focal parameter of the model: fx and fy of
    PINHOLE alike) and mark it as a prior (``has_prior_focal_length``), in one transaction of the open
    database ``d``; the other parameters stay."""
    with pycolmap.DatabaseTransaction(d):
        for camera_id, focal in focals.items():
            cam = d.read_camera(int(camera_id))
            if not float(focal) > 0:
                raise ValueError(f"camera {camera_id}: a focal length must be positive, got {focal!r}")
            cam.focal_length = float(focal)
            cam.has_prior_focal_length = True
            d.update_camera(cam)


def record(database: str | os.PathLike, focals: Mapping[int, float], num_images: Mapping[int, int]) -> None:
    """Record the network focal priors ``{camera_id: focal}`` and how many images each is the median of."""
    if not focals:
        return
    with connect(database) as con, con:
        con.execute(_SCHEMA)
        con.executemany(f"INSERT OR REPLACE INTO {_TABLE} VALUES (?, ?, ?)",
                        [(int(c), float(f), int(num_images.get(c, 0))) for c, f in focals.items()])


def read(database: str | os.PathLike) -> dict[int, float]:
    """``{camera_id: focal}`` of the cameras whose focal prior came from the network (empty for a database
    that records none, or no file)."""
    if not Path(database).is_file():
        return {}
    with connect(database) as con:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_TABLE,)).fetchone():
            return {}
        return {int(c): float(f) for c, f in con.execute(f"SELECT camera_id, focal FROM {_TABLE}")}
