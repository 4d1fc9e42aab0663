"""The reference model: its keypoints and 3D points per image, and building it from known poses.

* :func:`reference_keypoints`: the keypoints of every image of a model, from its points2D.
* :class:`ReferenceCache`: the registered images of a model with, per image, the keypoints handed in
  (hloc's convention, checked against the model's points2D), the point3D id and the xyz of each keypoint;
  an LRU cache of :data:`REFERENCE_CACHE` images (Aachen has 6,697).
* :func:`triangulate_reference`: hloc's triangulation: match reference pairs, then triangulate with the
  reference poses.

Conventions: keypoints are in hloc's convention ((0, 0) is the centre of the top-left pixel), the model's
points2D in COLMAP's ((0, 0) is the top-left corner): they differ by 0.5 px, within
:data:`~mast3r_colmap.export.colmap_db.KEYPOINT_TOLERANCE`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pycolmap

from ..export.colmap_db import KEYPOINT_TOLERANCE
from ..keypoints import KeypointConfig
from ..lock import locks_database
from .results import QueryFailure

__all__ = ["REFERENCE_CACHE", "ReferenceCache", "has_pose", "reference_keypoints", "triangulate_reference"]

logger = logging.getLogger(__name__)

#: Reference images whose keypoints and 3D points are kept in memory at once (Aachen has 6,697).
REFERENCE_CACHE = 1024


def has_pose(img: pycolmap.Image) -> bool:
    """Whether an image of a model is registered (``has_pose`` is a method or a property by pycolmap version)."""
    return bool(img.has_pose() if callable(img.has_pose) else img.has_pose)


def reference_keypoints(reconstruction: pycolmap.Reconstruction) -> Dict[str, np.ndarray]:
    """The keypoints of every image of a model, from its points2D, in hloc's convention (-0.5)."""
    out = {}
    for img in reconstruction.images.values():
        pts = img.points2D
        xy = np.array([p.xy for p in pts], np.float64).reshape(-1, 2)
        out[img.name] = xy - 0.5
    return out


class ReferenceCache:
    """Registered images of the reference model with their keypoints and per-keypoint 3D points (LRU cache)."""

    def __init__(self, reconstruction: pycolmap.Reconstruction,
                 keypoints: Optional[Mapping[str, np.ndarray]], cache_size: int = REFERENCE_CACHE) -> None:
        self.rec = reconstruction
        self.ids = {img.name: int(i) for i, img in reconstruction.images.items() if has_pose(img)}
        self.keypoints = keypoints
        self.cache_size = cache_size
        self._cache: "OrderedDict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]" = OrderedDict()

    def pose(self, name: str) -> pycolmap.Rigid3d:
        return self.rec.images[self.ids[name]].cam_from_world()

    def get(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keypoints (K, 2) hloc, point3D id per keypoint (K,) or -1, xyz per keypoint (K, 3)).

        Raises :class:`~.results.QueryFailure` for an image without keypoints, ValueError for keypoints
        that do not belong to the model (another count, another convention, other positions).
        """
        if name in self._cache:
            self._cache.move_to_end(name)
        else:
            self._cache[name] = self._load(name)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return self._cache[name]

    def _load(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        img = self.rec.images[self.ids[name]]
        pts = img.points2D
        n = len(pts)
        obs = np.asarray(img.get_observation_point2D_idxs(), np.int64)
        xy_obs = np.array([pts[int(i)].xy for i in obs], np.float64).reshape(-1, 2)
        pid = np.full(n, -1, np.int64)
        pid[obs] = [int(pts[int(i)].point3D_id) for i in obs]
        xyz = np.full((n, 3), np.nan)
        for i in obs:
            xyz[i] = self.rec.points3D[int(pid[i])].xyz
        if self.keypoints is None:
            kps = np.array([p.xy for p in pts], np.float64).reshape(-1, 2) - 0.5
        else:
            if name not in self.keypoints:
                raise QueryFailure(f"reference image {name!r} has no keypoints")
            kps = np.asarray(self.keypoints[name], np.float64).reshape(-1, 2)
            if len(kps) != n:
                raise ValueError(f"reference image {name!r}: {len(kps)} keypoints but the model has {n} points2D; "
                                 "the keypoints (database / features) do not belong to this model")
            if len(obs):
                err = np.abs(kps[obs] + 0.5 - xy_obs).max()
                if err > KEYPOINT_TOLERANCE:
                    if np.abs(kps[obs] - xy_obs).max() <= KEYPOINT_TOLERANCE:
                        raise ValueError(f"reference image {name!r}: the keypoints are in COLMAP's convention "
                                         "(they equal the model's points2D); pass hloc-convention keypoints "
                                         "(points2D - 0.5), e.g. from colmap_db.existing_keypoints")
                    raise ValueError(f"reference image {name!r}: keypoints differ from the model's points2D by "
                                     f"up to {err:.3g} px; the keypoints do not belong to this model")
        return kps, pid, xyz


@locks_database("database")
def triangulate_reference(reference: pycolmap.Reconstruction | str | os.PathLike, image_dir: str | os.PathLike,
                          database: str | os.PathLike, matcher: Any, pairs: Sequence[Tuple[str, str]],
                          output_dir: str | os.PathLike,
                          keypoints: KeypointConfig = KeypointConfig(),
                          store_path: Optional[str | os.PathLike] = None,
                          progress: bool = True) -> pycolmap.Reconstruction:
    """A map from known poses: match ``pairs`` of reference images, then triangulate (hloc's triangulation).

    The database gets the cameras and images of ``reference`` with the same ids
    (:func:`~mast3r_colmap.mapping.database_from_reconstruction`), then consolidated keypoints (quantised,
    capped by ``keypoints.max_kps``) and matches, verified two-view geometries, and the points are
    triangulated with the reference poses (:func:`~mast3r_colmap.mapping.triangulate`). Raw matches go
    through a resumable :class:`~mast3r_colmap.store.MatchStore` (default beside the database) and pairs
    already in the database are skipped, so an interrupted run can be started again; a database in use by
    another run raises ValueError (:func:`~mast3r_colmap.lock.database_lock`). Returns the triangulated
    model (also written to ``output_dir``).
    """
    from .. import mapping
    from ..pipeline import match_into_database

    rec = mapping.load_reference(reference)
    ids = mapping.database_from_reconstruction(rec, database)
    unknown = sorted({n for p in pairs for n in p if n not in ids})
    if unknown:
        raise ValueError(f"{len(unknown)} image(s) of the pairs are not in the reference model: {unknown[:5]}")
    match_into_database(database, ids, pairs, matcher, keypoints, store_path, progress)
    return mapping.triangulate(rec, database, image_dir, output_dir)
