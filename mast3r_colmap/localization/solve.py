"""Localising queries against a reference model (hloc's ``localize_sfm`` with any pipeline matcher).

For each query (:func:`localize`):

1. match it to its retrieved reference images (``matcher.match_pairs([(query, ref), ...])``);
2. turn the raw matches into keypoint matches with :func:`~mast3r_colmap.keypoints.consolidate`: the query
   is *unquantised* (every raw position is a keypoint) and every reference image is *fixed* to the
   keypoints of the map (raw positions snap to the nearest map keypoint within ``keypoints.radius`` px);
3. lift the matches to 2D-3D correspondences through the reference model (``points2D[i].point3D_id``,
   :class:`~.reference.ReferenceCache`);
4. estimate the pose with ``pycolmap.estimate_and_refine_absolute_pose`` (LO-RANSAC, ``ransac_thresh`` px,
   then refinement), with the given intrinsics, or with the focal length estimated from a prior of
   ``1.2 * max(W, H)`` (:data:`~mast3r_colmap.cameras.DEFAULT_FOCAL_LENGTH_FACTOR`); optionally per
   covisibility cluster of the retrieved images (best by inliers).

The query's 2D points get +0.5 before PnP (hloc's convention to COLMAP's). A query that cannot be
localised (unreadable image, no matches, too few correspondences, PnP failure, any error of the matcher)
still gets a result: the pose of its first retrieved reference image, as hloc does, with a warning and a
``reason``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pycolmap

from ..cameras import DEFAULT_FOCAL_LENGTH_FACTOR
from ..keypoints import KeypointConfig, consolidate
from ..matching.schedule import schedule_groups
from ..structures import IndexMatches, PairMatches
from .covisibility import covisibility_clusters
from .reference import ReferenceCache
from .results import QueryFailure, QueryResult

__all__ = ["LocalizationConfig", "MIN_CORRESPONDENCES", "localize"]

logger = logging.getLogger(__name__)

#: Fewest 2D-3D correspondences PnP is tried on.
MIN_CORRESPONDENCES = 4


@dataclass(frozen=True)
class LocalizationConfig:
    """Settings of :func:`localize`."""

    ransac_thresh: float = 12.0          # px, RANSAC max reprojection error (hloc's default)
    covisibility_clustering: bool = False
    keypoints: KeypointConfig = field(default_factory=lambda: KeypointConfig(max_kps=None))
    focal_prior: float = DEFAULT_FOCAL_LENGTH_FACTOR  # x max(W, H), for queries without intrinsics
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


def _camera_for(name: str, camera: Optional[pycolmap.Camera], image_dir: Optional[Path],
                conf: LocalizationConfig) -> Tuple[pycolmap.Camera, bool]:
    """The query camera (a copy) and whether its focal length must be estimated."""
    size = None
    if image_dir is not None:
        from ..images import ImageLoadError, read_image_size

        try:
            size = read_image_size(image_dir / name)
        except ImageLoadError as exc:
            raise QueryFailure(f"unreadable query image: {exc}") from None
    if camera is not None:
        cam = copy.copy(camera)
        if size is not None and (cam.width, cam.height) != size:
            logger.warning("%s: intrinsics are for %dx%d but the image is %dx%d; rescaling the camera",
                           name, cam.width, cam.height, *size)
            cam.rescale(int(size[0]), int(size[1]))
        return cam, False
    if size is None:
        raise QueryFailure("no intrinsics and no image folder to read the image size from")
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


def _correspondences(query: str, matches: Sequence[IndexMatches], ref: ReferenceCache
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


def _localize_one(name: str, camera: Optional[pycolmap.Camera], retrieved: List[str], ref: ReferenceCache,
                  matcher: Any, image_dir: Optional[Path], conf: LocalizationConfig, store: Any,
                  result: QueryResult) -> None:
    """Fill ``result`` in place; raises :class:`QueryFailure` (or anything) when the query cannot be localised."""
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
        except (ValueError, QueryFailure) as exc:
            logger.warning("%s: reference image %s skipped: %s", name, db, exc)
            continue
        usable.append(db)
    if not usable:
        raise QueryFailure("none of the retrieved images is registered in the reference model (with usable keypoints)")

    raw = _match_query(matcher, [(name, db) for db in usable], store)
    result.times["matching"] = time.perf_counter() - t0
    fixed = {db: ref.get(db)[0] for db in usable}
    kps, matches = consolidate(raw, conf.keypoints, fixed=fixed, unquantized={name})
    iq, pid, xyz, db_idx, per_db = _correspondences(name, matches, ref)
    result.matches_per_db = {db: per_db.get(db, 0) for db in usable}
    result.num_matches = int(sum(result.matches_per_db.values()))
    if result.num_matches == 0:
        raise QueryFailure("no matches with the retrieved images")
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
        if len(sel) < MIN_CORRESPONDENCES:
            continue
        ret = _absolute_pose(points2D[sel], xyz[sel], cam, estimate_focal, conf)
        if ret is not None and (best is None or ret["num_inliers"] > best["num_inliers"]):
            best, n_corr_best, result.best_cluster = ret, len(sel), c
    result.times["pose"] = time.perf_counter() - t1
    result.num_correspondences = n_corr_best if best is not None else int(len(iq))
    if best is None:
        if len(iq) < MIN_CORRESPONDENCES:
            raise QueryFailure(f"too few 2D-3D correspondences ({len(iq)}) from {result.num_matches} matches")
        raise QueryFailure(f"absolute pose estimation failed on {len(iq)} 2D-3D correspondences")
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
            ``cache_size``, queries are processed in the order of
            :func:`~mast3r_colmap.matching.schedule.schedule_groups` (queries sharing reference images
            together, so those are encoded fewer times).
        retrieval: ``{query: [reference image, ...]}``, best first (e.g. :func:`~.parsing.read_retrieval`).
        reference: the reference model (registered images and their 3D points).
        ref_keypoints: ``{reference image: (K, 2)}`` in hloc's convention, index-aligned with the model's
            points2D (e.g. ``colmap_db.existing_keypoints`` of the database the model was triangulated
            from, or an hloc features.h5); ``None`` takes them from the model's points2D.
        matcher: anything with ``match_pairs(pairs) -> Iterator[PairMatches]``; pairs are ``(query, ref)``.
        image_dir: the image root; when given, every query file is checked before matching.
        conf: see :class:`LocalizationConfig`.
        store: an optional :class:`~mast3r_colmap.store.MatchStore`; raw query matches are kept there and
            reused.
        progress: show a progress bar.

    Returns:
        ``{query: QueryResult}``. A failed query gets the pose of its first retrieved registered
        reference image (identity if none), ``success=False`` and a ``reason``, with a warning.

    Raises:
        ValueError: the reference keypoints do not belong to the model (checked on the first retrieved
            image before any matching), e.g. keypoints in COLMAP's convention.
    """
    from tqdm import tqdm

    ref = ReferenceCache(reference, ref_keypoints)
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
                raise QueryFailure("no retrieved reference images")
            _localize_one(name, camera, retrieved, ref, matcher, image_root, conf, store, result)
        except Exception as exc:  # noqa: BLE001 - one query never stops the run
            reason = str(exc) if isinstance(exc, QueryFailure) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, QueryFailure):
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
