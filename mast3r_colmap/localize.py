"""Localise query images against a reference COLMAP model (hloc's ``localize_sfm`` with any pipeline matcher).

For each query:

1. match it to its retrieved reference images (``matcher.match_pairs([(query, ref), ...])``, the MASt3R
   :class:`~.matching.matcher.Matcher` or a :class:`~.matching.matcher.SourceMatcher`);
2. turn the raw matches into keypoint matches with :func:`~.keypoints.consolidate`: the query is
   *unquantised* (every raw position is a keypoint) and every reference image is *fixed* to the keypoints
   of the map (raw positions snap to the nearest map keypoint within ``keypoints.radius`` px);
3. lift the matches to 2D-3D correspondences through the reference model (``points2D[i].point3D_id``);
4. estimate the pose with ``pycolmap.estimate_and_refine_absolute_pose`` (LO-RANSAC, ``ransac_thresh`` px,
   then refinement), with the given intrinsics, or with the focal length estimated from a prior of
   ``1.2 * max(W, H)``; optionally per covisibility cluster of the retrieved images (best by inliers).

Conventions. Keypoints handed in (``ref_keypoints``) and matches are in hloc's convention ((0, 0) is the
centre of the top-left pixel). The model's ``points2D`` and pycolmap's camera models are in COLMAP's
((0, 0) is the top-left corner): the reference keypoints are checked against the model's points2D with
the +0.5 shift, and the query's 2D points get +0.5 before PnP. Poses are ``cam_from_world``
(world-to-camera).

Results (:func:`write_results`) have one line ``name qw qx qy qz tx ty tz`` per query, the basename by
default (the visuallocalization.net format). A query that cannot be localised (unreadable image, no
matches, too few correspondences, PnP failure, any error of the matcher) still gets a line: the pose of
its first retrieved reference image, as hloc does, with a warning and a ``reason`` in its log entry.
Per-query logs are JSON lines beside the results (:func:`logs_path`).

Command line::

    python -m mast3r_colmap.localize --images DIR --reference MODEL_DIR (--database DB | --features H5) \\
        --queries QUERIES.txt --pairs PAIRS.txt --output RESULTS.txt [--preset default|hires] ...

``--preset hires`` is the matcher's ``hires`` preset: after the 512-px pass, the query is matched
coarse-to-fine at full resolution with crops, as MASt3R's localisation does (``--coarse_to_fine``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pycolmap
from scipy import sparse

from .keypoints import KeypointConfig, consolidate
from .lock import locks_database
from .matching.schedule import schedule_groups
from .structures import IndexMatches, PairMatches
from .utils import EXIT_BAD_INPUT, check_writable, run_cli, setup_logging, text_records

__all__ = [
    "DEFAULT_FOCAL_PRIOR",
    "EXIT_BAD_INPUT",
    "LocalizationConfig",
    "QueryResult",
    "build_matcher",
    "covisibility_clusters",
    "localize",
    "logs_path",
    "main",
    "pairs_from_covisibility",
    "read_queries",
    "read_retrieval",
    "reference_keypoints",
    "triangulate_reference",
    "write_logs",
    "write_results",
]

logger = logging.getLogger(__name__)

#: Focal length prior of a query without intrinsics, as a multiple of max(W, H) (COLMAP's default).
DEFAULT_FOCAL_PRIOR = 1.2
#: Reference keypoints and model points2D agree when every coordinate is within this many pixels.
_KEYPOINT_TOLERANCE = 1e-2
_MIN_CORRESPONDENCES = 4
#: Reference images whose keypoints and 3D points are kept in memory at once (Aachen has 6,697).
_REFERENCE_CACHE = 1024


# ----------------------------------------------------------------------------------------------
# configuration and results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalizationConfig:
    """Settings of :func:`localize`."""

    ransac_thresh: float = 12.0          # px, RANSAC max reprojection error (hloc's default)
    covisibility_clustering: bool = False
    keypoints: KeypointConfig = field(default_factory=lambda: KeypointConfig(max_kps=None))
    focal_prior: float = DEFAULT_FOCAL_PRIOR  # x max(W, H), for queries without intrinsics
    estimated_camera_model: str = "SIMPLE_RADIAL"
    refine_focal_length: bool = True     # refine the estimated focal (queries without intrinsics only)
    seed: int = 0                        # RANSAC seed: results are repeatable

    def __post_init__(self) -> None:
        if not (np.isfinite(self.ransac_thresh) and self.ransac_thresh > 0):
            raise ValueError(f"ransac_thresh must be a positive number of pixels, got {self.ransac_thresh}")
        if not (np.isfinite(self.focal_prior) and self.focal_prior > 0):
            raise ValueError(f"focal_prior must be positive, got {self.focal_prior}")
        if self.estimated_camera_model not in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "PINHOLE", "RADIAL"):
            raise ValueError(f"estimated_camera_model must be a pinhole-like model, got "
                             f"{self.estimated_camera_model!r}")


@dataclass
class QueryResult:
    """The pose of one query and what led to it (``success`` False: a fallback pose, see ``reason``)."""

    name: str
    cam_from_world: pycolmap.Rigid3d
    success: bool
    reason: Optional[str] = None
    camera: Optional[pycolmap.Camera] = None
    focal_estimated: bool = False
    retrieved: List[str] = field(default_factory=list)
    fallback: Optional[str] = None                     # reference image whose pose was used on failure
    num_matches: int = 0                               # one-to-one keypoint matches over all pairs
    matches_per_db: Dict[str, int] = field(default_factory=dict)
    correspondences_per_db: Dict[str, int] = field(default_factory=dict)  # distinct, by first db image
    num_correspondences: int = 0                       # distinct 2D-3D correspondences used for PnP
    num_inliers: int = 0
    clusters: List[List[str]] = field(default_factory=list)
    best_cluster: Optional[int] = None
    times: Dict[str, float] = field(default_factory=dict)
    inlier_mask: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def qvec(self) -> np.ndarray:
        """Rotation quaternion (w, x, y, z) of ``cam_from_world`` (pycolmap stores x, y, z, w)."""
        return np.asarray(self.cam_from_world.rotation.quat, np.float64)[[3, 0, 1, 2]]

    @property
    def tvec(self) -> np.ndarray:
        return np.asarray(self.cam_from_world.translation, np.float64)

    def log_entry(self) -> Dict[str, Any]:
        """A JSON-able summary (no per-correspondence arrays)."""
        cam = None
        if self.camera is not None:
            cam = {"model": self.camera.model.name, "width": int(self.camera.width),
                   "height": int(self.camera.height), "params": [float(p) for p in self.camera.params]}
        return {
            "name": self.name, "success": self.success, "reason": self.reason,
            "qvec": [float(v) for v in self.qvec], "tvec": [float(v) for v in self.tvec],
            "camera": cam, "focal_estimated": self.focal_estimated,
            "retrieved": list(self.retrieved), "fallback": self.fallback,
            "num_matches": self.num_matches, "matches_per_db": dict(self.matches_per_db),
            "correspondences_per_db": dict(self.correspondences_per_db),
            "num_correspondences": self.num_correspondences, "num_inliers": self.num_inliers,
            "inlier_ratio": (self.num_inliers / self.num_correspondences) if self.num_correspondences else 0.0,
            "clusters": [list(c) for c in self.clusters], "best_cluster": self.best_cluster,
            "time": {k: round(float(v), 4) for k, v in self.times.items()},
        }


class _Failure(Exception):
    """A query-level failure with a reason (never escapes :func:`localize`)."""


# ----------------------------------------------------------------------------------------------
# input files
# ----------------------------------------------------------------------------------------------


def _camera_from_tokens(tokens: Sequence[str], where: str) -> pycolmap.Camera:
    model = tokens[0]
    if model not in pycolmap.CameraModelId.__members__ or model == "INVALID":
        raise ValueError(f"{where}: unknown camera model {model!r}")
    try:
        width, height = int(tokens[1]), int(tokens[2])
        params = [float(p) for p in tokens[3:]]
    except (IndexError, ValueError):
        raise ValueError(f"{where}: expected 'name MODEL WIDTH HEIGHT PARAMS...'") from None
    if width <= 0 or height <= 0 or not all(np.isfinite(params)):
        raise ValueError(f"{where}: bad image size or parameters")
    expected = len(pycolmap.Camera.create_from_model_name(0, model, 1.0, width, height).params)
    if len(params) != expected:
        raise ValueError(f"{where}: camera model {model} takes {expected} parameters, got {len(params)}")
    return pycolmap.Camera(model=model, width=width, height=height, params=params)


def read_queries(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Dict[str, Optional[pycolmap.Camera]]:
    """Read query lists (hloc's ``*_queries_with_intrinsics.txt``): ``name MODEL W H params...`` per line.

    A line holding only a name is a query without intrinsics (``None``: the focal length is estimated).
    Blank lines and ``#`` comments are skipped. Several files are read in the given order.

    Raises:
        ValueError: a missing file, a malformed line, an unknown model, a wrong number of parameters or a
            repeated name (the message names the file and line).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: Dict[str, Optional[pycolmap.Camera]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"queries file {str(path)!r} does not exist")
        for where, tokens in text_records(path):
            if tokens[0] in out:
                raise ValueError(f"{where}: query {tokens[0]!r} listed twice")
            out[tokens[0]] = _camera_from_tokens(tokens[1:], where) if len(tokens) > 1 else None
    return out


def read_retrieval(path: str | os.PathLike, num_loc: Optional[int] = None) -> Dict[str, List[str]]:
    """Read a query pairs file (``query db`` per line, best first) into ``{query: [db, ...]}``.

    The file order is kept; repeated pairs are dropped; ``num_loc`` keeps the first ``num_loc`` per query.
    """
    from .pairs import read_pairs

    if num_loc is not None and int(num_loc) < 1:
        raise ValueError(f"num_loc must be >= 1, got {num_loc}")
    out: Dict[str, List[str]] = {}
    for query, db in read_pairs(path):
        lst = out.setdefault(query, [])
        if db != query and db not in lst and (num_loc is None or len(lst) < num_loc):
            lst.append(db)
    return out


def reference_keypoints(reconstruction: pycolmap.Reconstruction) -> Dict[str, np.ndarray]:
    """The keypoints of every image of a model, from its points2D, in hloc's convention (-0.5)."""
    out = {}
    for img in reconstruction.images.values():
        pts = img.points2D
        xy = np.array([p.xy for p in pts], np.float64).reshape(-1, 2)
        out[img.name] = xy - 0.5
    return out


# ----------------------------------------------------------------------------------------------
# the reference model
# ----------------------------------------------------------------------------------------------


def _has_pose(img: pycolmap.Image) -> bool:
    return bool(img.has_pose() if callable(img.has_pose) else img.has_pose)


class _Reference:
    """Registered images of the reference model with their keypoints and per-keypoint 3D points (LRU cache)."""

    def __init__(self, reconstruction: pycolmap.Reconstruction,
                 keypoints: Optional[Mapping[str, np.ndarray]], cache_size: int = _REFERENCE_CACHE) -> None:
        self.rec = reconstruction
        self.ids = {img.name: int(i) for i, img in reconstruction.images.items() if _has_pose(img)}
        self.keypoints = keypoints
        self.cache_size = cache_size
        self._cache: "OrderedDict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]" = OrderedDict()

    def pose(self, name: str) -> pycolmap.Rigid3d:
        return self.rec.images[self.ids[name]].cam_from_world()

    def get(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keypoints (K, 2) hloc, point3D id per keypoint (K,) or -1, xyz per keypoint (K, 3))."""
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
                raise _Failure(f"reference image {name!r} has no keypoints")
            kps = np.asarray(self.keypoints[name], np.float64).reshape(-1, 2)
            if len(kps) != n:
                raise ValueError(f"reference image {name!r}: {len(kps)} keypoints but the model has {n} points2D; "
                                 "the keypoints (database / features) do not belong to this model")
            if len(obs):
                err = np.abs(kps[obs] + 0.5 - xy_obs).max()
                if err > _KEYPOINT_TOLERANCE:
                    if np.abs(kps[obs] - xy_obs).max() <= _KEYPOINT_TOLERANCE:
                        raise ValueError(f"reference image {name!r}: the keypoints are in COLMAP's convention "
                                         "(they equal the model's points2D); pass hloc-convention keypoints "
                                         "(points2D - 0.5), e.g. from colmap_db.existing_keypoints")
                    raise ValueError(f"reference image {name!r}: keypoints differ from the model's points2D by "
                                     f"up to {err:.3g} px; the keypoints do not belong to this model")
        return kps, pid, xyz


def covisibility_clusters(reconstruction: pycolmap.Reconstruction, names: Sequence[str],
                          point_ids: Optional[Mapping[str, np.ndarray]] = None) -> List[List[str]]:
    """Connected components of ``names`` (reference images) linked by shared 3D points.

    Components are sorted by size (largest first), then by first appearance; images keep the order of
    ``names`` inside a component. ``point_ids`` ({name: ids}) avoids re-reading the model.
    """
    names = list(dict.fromkeys(names))
    if not names:
        return []
    if point_ids is None:
        by_name = {img.name: img for img in reconstruction.images.values()}
        point_ids = {}
        for n in names:
            img = by_name[n]
            pts = img.points2D
            point_ids[n] = np.array([pts[int(i)].point3D_id for i in img.get_observation_point2D_idxs()], np.int64)
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: Dict[int, int] = {}
    for i, n in enumerate(names):
        ids = np.unique(np.asarray(point_ids[n], np.int64))
        for p in ids[ids >= 0].tolist():
            j = owner.setdefault(p, i)
            if j != i:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    groups: Dict[int, List[str]] = {}
    for i, n in enumerate(names):
        groups.setdefault(find(i), []).append(n)
    return sorted(groups.values(), key=lambda g: (-len(g), names.index(g[0])))


def pairs_from_covisibility(reconstruction: pycolmap.Reconstruction, k: int) -> List[Tuple[str, str]]:
    """hloc's ``pairs_from_covisibility``: each registered image with its ``k`` most covisible images.

    Covisibility is the number of shared 3D points. Neighbours are ranked by that count (descending), ties
    by image id; images sharing no point are never paired. The result lists, for every image in image-id
    order, ``(image, neighbour)`` best first, without repeats: a pair already listed in the other order is
    dropped (hloc's file keeps both orders; the matches would be the same).
    """
    if isinstance(k, bool) or int(k) < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    image_ids = sorted(i for i, img in reconstruction.images.items() if _has_pose(img))
    names = [reconstruction.images[i].name for i in image_ids]
    rows, cols = [], []
    for r, i in enumerate(image_ids):
        img = reconstruction.images[i]
        pts = img.points2D
        ids = np.unique([int(pts[int(j)].point3D_id) for j in img.get_observation_point2D_idxs()])
        rows.append(np.full(len(ids), r, np.int64))
        cols.append(ids.astype(np.int64))
    if not rows or not sum(len(c) for c in cols):
        logger.warning("pairs_from_covisibility: the model has no 3D points, no pairs")
        return []
    all_cols = np.concatenate(cols)
    uniq, col_idx = np.unique(all_cols, return_inverse=True)
    m = sparse.csr_matrix((np.ones(len(all_cols), np.float64), (np.concatenate(rows), col_idx)),
                          shape=(len(image_ids), len(uniq)))
    cov = (m @ m.T).tocsr()
    pairs: List[Tuple[str, str]] = []
    seen: set = set()
    lonely = 0
    for r in range(len(image_ids)):
        start, end = cov.indptr[r], cov.indptr[r + 1]
        nb, cnt = cov.indices[start:end], cov.data[start:end]
        keep = (nb != r) & (cnt > 0)
        nb, cnt = nb[keep], cnt[keep]
        if len(nb) == 0:
            lonely += 1
            continue
        order = np.lexsort((nb, -cnt))[:k]
        for j in nb[order].tolist():
            key = (min(r, j), max(r, j))
            if key not in seen:
                seen.add(key)
                pairs.append((names[r], names[j]))
    if lonely:
        logger.warning("pairs_from_covisibility: %d image(s) share no 3D point with any other", lonely)
    logger.info("pairs_from_covisibility(k=%d): %d images -> %d pairs", k, len(image_ids), len(pairs))
    return pairs


@locks_database("database")
def triangulate_reference(reference: pycolmap.Reconstruction | str | os.PathLike, image_dir: str | os.PathLike,
                          database: str | os.PathLike, matcher: Any, pairs: Sequence[Tuple[str, str]],
                          output_dir: str | os.PathLike,
                          keypoints: KeypointConfig = KeypointConfig(),
                          store_path: Optional[str | os.PathLike] = None,
                          progress: bool = True) -> pycolmap.Reconstruction:
    """A map from known poses: match ``pairs`` of reference images, then triangulate (hloc's triangulation).

    The database gets the cameras and images of ``reference`` with the same ids
    (:func:`~.mapping.database_from_reconstruction`), then consolidated keypoints (quantised, capped by
    ``keypoints.max_kps``) and matches, verified two-view geometries, and the points are triangulated
    with the reference poses (:func:`~.mapping.triangulate`). Raw matches go through a resumable
    :class:`~.store.MatchStore` (default beside the database) and pairs already in the database are
    skipped, so an interrupted run can be started again; a database in use by another run raises ValueError
    (:func:`~.lock.database_lock`). Returns the triangulated model (also written to ``output_dir``).
    """
    from . import mapping
    from .pipeline import match_into_database

    rec = reference if isinstance(reference, pycolmap.Reconstruction) else _load_reference(Path(reference))
    ids = mapping.database_from_reconstruction(rec, database)
    unknown = sorted({n for p in pairs for n in p if n not in ids})
    if unknown:
        raise ValueError(f"{len(unknown)} image(s) of the pairs are not in the reference model: {unknown[:5]}")
    match_into_database(database, ids, pairs, matcher, keypoints, store_path, progress)
    return mapping.triangulate(rec, database, image_dir, output_dir)


# ----------------------------------------------------------------------------------------------
# localisation
# ----------------------------------------------------------------------------------------------


def _camera_for(name: str, camera: Optional[pycolmap.Camera], image_dir: Optional[Path],
                conf: LocalizationConfig) -> Tuple[pycolmap.Camera, bool]:
    """The query camera (a copy) and whether its focal length must be estimated."""
    size = None
    if image_dir is not None:
        from .images import ImageLoadError, read_image_size

        try:
            size = read_image_size(image_dir / name)
        except ImageLoadError as exc:
            raise _Failure(f"unreadable query image: {exc}") from None
    if camera is not None:
        cam = copy.copy(camera)
        if size is not None and (cam.width, cam.height) != size:
            logger.warning("%s: intrinsics are for %dx%d but the image is %dx%d; rescaling the camera",
                           name, cam.width, cam.height, *size)
            cam.rescale(int(size[0]), int(size[1]))
        return cam, False
    if size is None:
        raise _Failure("no intrinsics and no image folder to read the image size from")
    w, h = size
    cam = pycolmap.Camera.create_from_model_name(0, conf.estimated_camera_model, conf.focal_prior * max(w, h), w, h)
    return cam, True


def _absolute_pose(points2D: np.ndarray, points3D: np.ndarray, camera: pycolmap.Camera, estimate_focal: bool,
                   conf: LocalizationConfig) -> Optional[Dict[str, Any]]:
    est = pycolmap.AbsolutePoseEstimationOptions()
    est.ransac.max_error = float(conf.ransac_thresh)
    est.ransac.random_seed = int(conf.seed)
    est.estimate_focal_length = bool(estimate_focal)
    ref = pycolmap.AbsolutePoseRefinementOptions()
    ref.refine_focal_length = bool(estimate_focal and conf.refine_focal_length)
    cam = copy.copy(camera)  # pycolmap writes the estimated focal length into the camera
    ret = pycolmap.estimate_and_refine_absolute_pose(points2D, points3D, cam, est, ref)
    if ret is None:
        return None
    ret = dict(ret)
    ret["camera"] = cam
    return ret


def _correspondences(query: str, matches: Sequence[IndexMatches], ref: _Reference
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Dict[str, int]]:
    """2D-3D correspondences (query keypoint index, point3D id, xyz, db index) and matches per db image."""
    iq_all, pid_all, xyz_all, db_all = [], [], [], []
    per_db: Dict[str, int] = {}
    for k, m in enumerate(matches):
        idx = m.matches
        if m.name0 != query:
            idx = idx[:, ::-1]
        db = m.name1 if m.name0 == query else m.name0
        per_db[db] = len(idx)
        _, pid, xyz = ref.get(db)
        ok = pid[idx[:, 1]] >= 0
        iq_all.append(idx[ok, 0])
        pid_all.append(pid[idx[ok, 1]])
        xyz_all.append(xyz[idx[ok, 1]])
        db_all.append(np.full(int(ok.sum()), k, np.int64))
    if not iq_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0, np.int64), per_db
    return (np.concatenate(iq_all), np.concatenate(pid_all), np.concatenate(xyz_all), np.concatenate(db_all),
            per_db)


def _match_query(matcher: Any, pairs: List[Tuple[str, str]], store: Any) -> List[PairMatches]:
    if store is None:
        return list(matcher.match_pairs(pairs))
    todo = [p for p in pairs if p not in store]
    for pm in matcher.match_pairs(todo):
        store.put(pm)
    return list(store.get_many(pairs))


def _localize_one(name: str, camera: Optional[pycolmap.Camera], retrieved: List[str], ref: _Reference,
                  matcher: Any, image_dir: Optional[Path], conf: LocalizationConfig, store: Any,
                  result: QueryResult) -> None:
    """Fill ``result`` in place; raises :class:`_Failure` (or anything) when the query cannot be localised."""
    t0 = time.perf_counter()
    cam, estimate_focal = _camera_for(name, camera, image_dir, conf)
    result.camera, result.focal_estimated = cam, estimate_focal
    usable = []
    for db in retrieved:
        if db not in ref.ids:
            logger.debug("%s: retrieved image %s is not registered in the reference model, skipped", name, db)
            continue
        try:
            ref.get(db)  # loads and checks the reference image
        except (ValueError, _Failure) as exc:
            logger.warning("%s: reference image %s skipped: %s", name, db, exc)
            continue
        usable.append(db)
    if not usable:
        raise _Failure("none of the retrieved images is registered in the reference model (with usable keypoints)")

    raw = _match_query(matcher, [(name, db) for db in usable], store)
    result.times["matching"] = time.perf_counter() - t0
    fixed = {db: ref.get(db)[0] for db in usable}
    kps, matches = consolidate(raw, conf.keypoints, fixed=fixed, unquantized={name})
    iq, pid, xyz, db_idx, per_db = _correspondences(name, matches, ref)
    result.matches_per_db = {db: per_db.get(db, 0) for db in usable}
    result.num_matches = int(sum(result.matches_per_db.values()))
    if result.num_matches == 0:
        raise _Failure("no matches with the retrieved images")
    # one query keypoint may see several 3D points (all kept, as hloc does); exact repeats are dropped
    if len(iq):
        _, first = np.unique(np.stack([iq, pid], 1), axis=0, return_index=True)
        first = np.sort(first)
        iq, pid, xyz, db_idx = iq[first], pid[first], xyz[first], db_idx[first]
    query_kps = kps[name].keypoints if name in kps else np.zeros((0, 2))
    points2D = query_kps[iq] + 0.5  # COLMAP convention for pycolmap
    match_names = [m.name1 if m.name0 == name else m.name0 for m in matches]
    counts = np.bincount(db_idx, minlength=len(match_names))
    result.correspondences_per_db = {db: int(counts[match_names.index(db)]) if db in match_names else 0
                                     for db in usable}

    t1 = time.perf_counter()
    if conf.covisibility_clustering:
        point_ids = {db: ref.get(db)[1] for db in usable}
        result.clusters = covisibility_clusters(ref.rec, usable, point_ids)
    else:
        result.clusters = [list(usable)]
    best: Optional[Dict[str, Any]] = None
    n_corr_best = 0
    for c, cluster in enumerate(result.clusters):
        members = {match_names.index(db) for db in cluster if db in match_names}
        sel = np.flatnonzero(np.isin(db_idx, list(members)))
        if len(sel) < _MIN_CORRESPONDENCES:
            continue
        ret = _absolute_pose(points2D[sel], xyz[sel], cam, estimate_focal, conf)
        if ret is not None and (best is None or ret["num_inliers"] > best["num_inliers"]):
            best, n_corr_best, result.best_cluster = ret, len(sel), c
    result.times["pose"] = time.perf_counter() - t1
    result.num_correspondences = n_corr_best if best is not None else int(len(iq))
    if best is None:
        if len(iq) < _MIN_CORRESPONDENCES:
            raise _Failure(f"too few 2D-3D correspondences ({len(iq)}) from {result.num_matches} matches")
        raise _Failure(f"absolute pose estimation failed on {len(iq)} 2D-3D correspondences")
    result.cam_from_world = best["cam_from_world"]
    result.num_inliers = int(best["num_inliers"])
    result.inlier_mask = np.asarray(best["inlier_mask"], bool)
    result.camera = best["camera"]
    result.success = True


def localize(queries: Mapping[str, Optional[pycolmap.Camera]], retrieval: Mapping[str, Sequence[str]],
             reference: pycolmap.Reconstruction, ref_keypoints: Optional[Mapping[str, np.ndarray]], matcher: Any,
             image_dir: Optional[str | os.PathLike] = None, conf: LocalizationConfig = LocalizationConfig(),
             store: Any = None, progress: bool = False) -> Dict[str, QueryResult]:
    """Localise every query against ``reference``; never raises for a single query.

    Args:
        queries: ``{name: camera}`` (COLMAP convention), ``None`` to estimate the focal length (the image
            size is then read from ``image_dir``). Results follow this order; with a matcher that has a
            ``cache_size``, queries are processed in the order of :func:`~.matching.schedule.schedule_groups`
            (queries sharing reference images together, so those are encoded fewer times).
        retrieval: ``{query: [reference image, ...]}``, best first (e.g. :func:`read_retrieval`).
        reference: the reference model (registered images and their 3D points).
        ref_keypoints: ``{reference image: (K, 2)}`` in hloc's convention, index-aligned with the model's
            points2D (e.g. ``colmap_db.existing_keypoints`` of the database the model was triangulated
            from, or an hloc features.h5); ``None`` takes them from the model's points2D.
        matcher: anything with ``match_pairs(pairs) -> Iterator[PairMatches]``; pairs are ``(query, ref)``.
        image_dir: the image root; when given, every query file is checked before matching.
        conf: see :class:`LocalizationConfig`.
        store: an optional :class:`~.store.MatchStore`; raw query matches are kept there and reused.
        progress: show a progress bar.

    Returns:
        ``{query: QueryResult}``. A failed query gets the pose of its first retrieved registered
        reference image (identity if none), ``success=False`` and a ``reason``, with a warning.

    Raises:
        ValueError: the reference keypoints do not belong to the model (checked on the first retrieved
            image before any matching), e.g. keypoints in COLMAP's convention.
    """
    from tqdm import tqdm

    ref = _Reference(reference, ref_keypoints)
    image_root = Path(image_dir) if image_dir is not None else None
    for q in queries:  # a wrong keypoint source is a bad input, not a per-query failure
        first = next((db for db in retrieval.get(q, ()) if db in ref.ids
                      and (ref_keypoints is None or db in ref_keypoints)), None)
        if first is not None:
            ref.get(first)
            break
    retrieved_of = {name: [db for db in dict.fromkeys(retrieval.get(name, ())) if db != name] for name in queries}
    order = list(queries)
    cache_size = getattr(matcher, "cache_size", None)
    if cache_size:  # queries that share reference images are matched one after the other
        order = schedule_groups({q: [(q, db) for db in retrieved_of[q]] for q in order}, cache_size)
    results: Dict[str, QueryResult] = {}
    for name in tqdm(order, desc="localizing", unit="query", disable=not progress):
        camera = queries[name]
        t0 = time.perf_counter()
        retrieved = retrieved_of[name]
        fallback = next((db for db in retrieved if db in ref.ids), None)
        result = QueryResult(name=name, success=False, retrieved=retrieved,
                             cam_from_world=ref.pose(fallback) if fallback else pycolmap.Rigid3d())
        try:
            if not retrieved:
                raise _Failure("no retrieved reference images")
            _localize_one(name, camera, retrieved, ref, matcher, image_root, conf, store, result)
        except Exception as exc:  # noqa: BLE001 - one query never stops the run
            reason = str(exc) if isinstance(exc, _Failure) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, _Failure):
                logger.debug("%s failed", name, exc_info=True)
            result.success, result.reason, result.fallback = False, reason, fallback
            result.cam_from_world = ref.pose(fallback) if fallback else pycolmap.Rigid3d()
            result.inlier_mask = None
            logger.warning("query %s not localised (%s); using %s", name, reason,
                           f"the pose of {fallback}" if fallback else "the identity pose")
        result.times["total"] = time.perf_counter() - t0
        if result.success:
            logger.debug("query %s: %d/%d inliers from %d matches%s", name, result.num_inliers,
                         result.num_correspondences, result.num_matches,
                         " (focal estimated)" if result.focal_estimated else "")
        results[name] = result
    results = {name: results[name] for name in queries}
    ok = sum(r.success for r in results.values())
    logger.info("localised %d / %d queries", ok, len(results))
    return results


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------


def logs_path(results_path: str | os.PathLike) -> Path:
    """Where the per-query logs of a results file go: ``<stem>_logs.jsonl`` beside it."""
    p = Path(results_path)
    return p.with_name(p.stem + "_logs.jsonl")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(path: str | os.PathLike, results: Mapping[str, QueryResult], full_names: bool = False) -> Path:
    """Write ``name qw qx qy qz tx ty tz`` lines (cam_from_world, w first) in the order of ``results``.

    ``name`` is the basename (the visuallocalization.net format) unless ``full_names``.
    """
    path = Path(path)
    lines, seen = [], set()
    for name, r in results.items():
        out_name = name if full_names else PurePosixPath(name).name
        if out_name in seen:
            logger.warning("two queries are written as %r; use full names to tell them apart", out_name)
        seen.add(out_name)
        lines.append(" ".join([out_name] + [repr(float(v)) for v in (*r.qvec, *r.tvec)]))
    _atomic_write(path, "\n".join(lines) + ("\n" if lines else ""))
    logger.info("wrote %d poses to %s", len(lines), path)
    return path


def write_logs(path: str | os.PathLike, results: Mapping[str, QueryResult]) -> Path:
    """Write one JSON object per query (:meth:`QueryResult.log_entry`) per line."""
    path = Path(path)
    _atomic_write(path, "".join(json.dumps(r.log_entry()) + "\n" for r in results.values()))
    return path


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .matching.matcher import add_cli_arguments
    from .matching.matcher import confs as matcher_confs
    from .model.checkpoint import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(
        prog="python -m mast3r_colmap.localize",
        description="Localise query images against a reference COLMAP model with MASt3R matches and PnP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="image root (query and reference names are relative)")
    p.add_argument("--reference", type=Path, required=True, help="reference COLMAP model folder (.bin or .txt)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--database", type=Path, help="COLMAP database the reference model was triangulated from")
    src.add_argument("--features", type=Path, help="hloc features.h5 with the reference keypoints")
    p.add_argument("--queries", type=Path, nargs="+", default=None,
                   help="query list(s): 'name MODEL W H params...' per line, or just 'name' to estimate the focal; "
                        "default: the queries of --pairs, focal estimated")
    p.add_argument("--pairs", type=Path, required=True, help="query pairs file 'query ref' per line, best first")
    p.add_argument("--num-loc", type=int, default=None, help="use the first N retrieved images per query (default all)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="MASt3R checkpoint (.pth, hub folder or hub id)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--preset", choices=[c for c in ("default", "hires") if c in matcher_confs], default="default",
                   help="default: one 512-px pass; hires: coarse-to-fine matching at full resolution (as MASt3R's "
                        "visloc --coarse_to_fine)")
    add_cli_arguments(p)
    p.add_argument("--ransac-thresh", type=float, default=12.0, help="PnP RANSAC max reprojection error (px)")
    p.add_argument("--max-error", type=float, default=None,
                   help="px radius for snapping reference-side matches to map keypoints (default: the cell size, 4)")
    p.add_argument("--covisibility-clustering", action="store_true",
                   help="PnP per covisibility cluster of the retrieved images; keep the best")
    p.add_argument("--full-names", action="store_true", help="write full query names instead of basenames")
    p.add_argument("--output", type=Path, required=True, help="results file (logs go beside it)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def matcher_config(args: argparse.Namespace):
    """The matcher configuration of the command line (``--preset`` maps to the matcher's preset)."""
    from .matching.matcher import cli_overrides, get_config

    return get_config(args.preset, **cli_overrides(args))


def build_matcher(args: argparse.Namespace) -> Any:
    """Load the network and build the MASt3R matcher of the command line (after input validation)."""
    from .matching.matcher import Matcher
    from .model.checkpoint import load_model

    model = load_model(args.checkpoint, device=args.device)
    return Matcher(model, matcher_config(args), image_dir=args.images, checkpoint=str(args.checkpoint))


def _load_reference(path: Path) -> pycolmap.Reconstruction:
    if not path.is_dir():
        raise ValueError(f"reference model {str(path)!r} is not a folder")
    for stem in ("cameras", "images", "points3D"):
        if not ((path / f"{stem}.bin").is_file() or (path / f"{stem}.txt").is_file()):
            raise ValueError(f"reference model {str(path)!r} has no {stem}.bin or {stem}.txt")
    try:
        return pycolmap.Reconstruction(str(path))
    except Exception as exc:  # noqa: BLE001 - pycolmap raises RuntimeError/ValueError on bad files
        raise ValueError(f"cannot read the reference model {str(path)!r}: {exc}") from None


def _load_keypoints(args: argparse.Namespace) -> Dict[str, np.ndarray]:
    if args.database is not None:
        from .export.colmap_db import existing_keypoints

        if not args.database.is_file():
            raise ValueError(f"database {str(args.database)!r} does not exist")
        return existing_keypoints(args.database)
    from .export.hloc_h5 import read_features

    if not args.features.is_file():
        raise ValueError(f"features file {str(args.features)!r} does not exist")
    try:
        return {n: k.keypoints for n, k in read_features(args.features).items()}
    except (OSError, KeyError) as exc:
        raise ValueError(f"cannot read the features file {str(args.features)!r}: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    if not args.images.is_dir():
        raise ValueError(f"image folder {str(args.images)!r} does not exist or is not a folder")
    if not args.pairs.is_file():
        raise ValueError(f"pairs file {str(args.pairs)!r} does not exist")
    if args.num_loc is not None and args.num_loc < 1:
        raise ValueError(f"--num-loc must be >= 1, got {args.num_loc}")
    if args.output.is_dir():
        raise ValueError(f"output {str(args.output)!r} is a folder, expected a file")
    check_writable(args.output.parent)
    retrieval = read_retrieval(args.pairs, args.num_loc)
    queries = read_queries(args.queries) if args.queries else {q: None for q in retrieval}
    if not queries:
        raise ValueError("no queries")
    without = [q for q in queries if q not in retrieval]
    if len(without) == len(queries):
        raise ValueError(f"none of the {len(queries)} queries has a pair in {str(args.pairs)!r}")
    if without:
        logger.warning("%d queries have no retrieved images and will get the identity pose: %s",
                       len(without), without[:5])
    reference = _load_reference(args.reference)
    ref_keypoints = _load_keypoints(args)
    conf = LocalizationConfig(ransac_thresh=args.ransac_thresh, covisibility_clustering=args.covisibility_clustering,
                              keypoints=KeypointConfig(max_kps=None, max_error=args.max_error))
    matcher_config(args)  # a bad preset / batch size fails before loading the network
    matcher = build_matcher(args)
    results = localize(queries, retrieval, reference, ref_keypoints, matcher, image_dir=args.images, conf=conf,
                       progress=not args.no_progress)
    write_results(args.output, results, full_names=args.full_names)
    log_file = write_logs(logs_path(args.output), results)
    ok = sum(r.success for r in results.values())
    print(f"localised {ok} / {len(results)} queries; results: {args.output}; logs: {log_file}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point; bad input gives a message and exit code 2."""
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    setup_logging(args.verbose)
    return run_cli(_run, args)


if __name__ == "__main__":
    sys.exit(main())
