"""Geometric verification of the matches in a COLMAP database, pair by pair, on all cores.

:func:`verify_matches` estimates each pair's two-view geometry with ``pycolmap.estimate_two_view_geometry``
(what ``pycolmap.verify_matches`` does, without its space-separated pairs file, so any image name works)
and writes it with a real configuration, as the 4.x mapper needs. Pairs that already have a two-view
geometry are skipped, so re-running is cheap and idempotent.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pycolmap

from .export.colmap_db import DbLike, id_of, image_ids, use_database
from .options import build as build_options

__all__ = ["DEFAULT_VERIFICATION_OPTIONS", "verification_options", "verify_matches"]

logger = logging.getLogger(__name__)

#: hloc's RANSAC settings, with a fixed seed so that verification is reproducible whatever the thread order.
DEFAULT_VERIFICATION_OPTIONS: dict[str, Any] = {"ransac": {"max_num_trials": 20000, "min_inlier_ratio": 0.1,
                                                        "random_seed": 0}}


def verification_options(options: Mapping[str, Any] | pycolmap.TwoViewGeometryOptions | None
                          ) -> pycolmap.TwoViewGeometryOptions:
    return build_options(pycolmap.TwoViewGeometryOptions, options, DEFAULT_VERIFICATION_OPTIONS)


def verify_matches(
    db_path: DbLike,
    pairs: Iterable[tuple[str, str]] | None = None,
    options: Mapping[str, Any] | pycolmap.TwoViewGeometryOptions | None = None,
    num_threads: int | None = None,
) -> dict[tuple[str, str], int]:
    """Geometrically verify matched pairs, pair by pair, with ``pycolmap.estimate_two_view_geometry``.

    This is what ``pycolmap.verify_matches`` does (same estimator, options, keypoints in COLMAP's convention
    and pair orientation, so the same fixed RANSAC seed gives the same inliers and configuration), without
    its pairs file: any image name works. Every verified pair gets a two-view geometry with a real
    configuration (CALIBRATED, UNCALIBRATED, PLANAR, ... or DEGENERATE), never UNDEFINED, so the 4.x
    mapper uses it; a pair with fewer than ``min_num_inliers`` inliers is DEGENERATE without inliers,
    as COLMAP writes it. The raw matches are left as they are.

    The estimation runs on ``num_threads`` threads (pycolmap releases the GIL while it estimates);
    the database is read and written by the calling thread only, in transactions of
    :data:`_VERIFY_COMMIT_EVERY` pairs, so an interrupted call keeps what it committed (a re-run skips
    the pairs that already have a two-view geometry).

    Args:
        db_path: open database or its path.
        pairs: ``(name0, name1)`` pairs, estimated in that orientation (as COLMAP does for a pairs file).
            ``None`` verifies every pair with at least one match, smaller image id first (as
            ``pycolmap.geometric_verification`` does). Pairs without matches or with a two-view geometry
            already are skipped.
        options: ``TwoViewGeometryOptions`` or a dict merged over :data:`DEFAULT_VERIFICATION_OPTIONS`.
        num_threads: estimation threads; ``None`` or < 1 uses every core available to the process.

    Returns:
        ``{(name0, name1): number of inlier matches}`` for the requested pairs (0 if rejected).
    """
    opts = verification_options(options)
    with use_database(db_path) as d:
        ids = image_ids(d)
        if pairs is None:
            names = {v: k for k, v in ids.items()}
            pair_list = [tuple(names[int(i)] for i in pycolmap.pair_id_to_image_pair(int(p)))
                         for p in d.read_num_matches()[0]]
        else:
            pair_list = [(str(a), str(b)) for a, b in pairs]
        todo, seen = [], set()
        for n0, n1 in pair_list:
            id0, id1 = id_of(ids, n0), id_of(ids, n1)
            key = frozenset((id0, id1))
            if key in seen:
                continue
            seen.add(key)
            if not d.exists_matches(id0, id1):
                logger.warning("verify_matches: pair %s / %s has no matches, skipped", n0, n1)
            elif not d.exists_two_view_geometry(id0, id1):
                todo.append((id0, id1))
        if todo:
            _verify_pairs(d, todo, opts, _effective_threads(num_threads))
        out: dict[tuple[str, str], int] = {}
        for n0, n1 in pair_list:
            id0, id1 = ids[n0], ids[n1]
            if d.exists_two_view_geometry(id0, id1):
                out[(n0, n1)] = int(len(d.read_two_view_geometry(id0, id1).inlier_matches))
            else:
                out[(n0, n1)] = 0
    verified = sum(v > 0 for v in out.values())
    logger.info("verify_matches: %d pairs verified now, %d/%d pairs with inliers", len(todo), verified, len(out))
    return out


#: :func:`verify_matches` commits its results every this many pairs.
_VERIFY_COMMIT_EVERY = 256
#: Keypoint arrays :func:`verify_matches` keeps in memory (most recently used images).
_VERIFY_CACHED_IMAGES = 256


def _effective_threads(num_threads: int | None) -> int:
    if num_threads is not None and num_threads > 0:
        return int(num_threads)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _estimate_pair(camera0: pycolmap.Camera, points0: np.ndarray, camera1: pycolmap.Camera, points1: np.ndarray,
                   matches: np.ndarray, options: pycolmap.TwoViewGeometryOptions) -> pycolmap.TwoViewGeometry:
    """One pair, as COLMAP's verifier: fewer than ``min_num_inliers`` inliers is a DEGENERATE pair."""
    tvg = pycolmap.estimate_two_view_geometry(camera0, points0, camera1, points1, matches, options)
    if len(tvg.inlier_matches) < options.min_num_inliers:
        tvg = pycolmap.TwoViewGeometry(config=pycolmap.TwoViewGeometryConfiguration.DEGENERATE)
    return tvg


def _verify_pairs(d: pycolmap.Database, todo: Sequence[tuple[int, int]], options: pycolmap.TwoViewGeometryOptions,
                  num_threads: int) -> None:
    """Estimate ``todo`` (image id pairs, in that orientation) on a thread pool and write the geometries.

    Reads and writes stay in this thread; at most ``4 * num_threads`` pairs are in flight, so memory does
    not grow with the number of pairs.
    """
    cameras = {int(c.camera_id): c for c in d.read_all_cameras()}
    camera_of = {int(img.image_id): int(img.camera_id) for img in d.read_all_images()}
    points: OrderedDict[int, np.ndarray] = OrderedDict()

    def points_of(image_id: int) -> np.ndarray:  # x, y in COLMAP's convention, as COLMAP reads them
        if image_id in points:
            points.move_to_end(image_id)
        else:
            points[image_id] = np.asarray(d.read_keypoints(image_id), np.float64)[:, :2].copy()
            if len(points) > _VERIFY_CACHED_IMAGES:
                points.popitem(last=False)
        return points[image_id]

    done: list[tuple[int, int, pycolmap.TwoViewGeometry]] = []

    def commit() -> None:
        with pycolmap.DatabaseTransaction(d):
            for id0, id1, tvg in done:
                d.write_two_view_geometry(id0, id1, tvg)
        done.clear()

    in_flight: deque[tuple[int, int, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="verify")
    try:
        for k, (id0, id1) in enumerate(todo):
            args = (cameras[camera_of[id0]], points_of(id0), cameras[camera_of[id1]], points_of(id1),
                    np.asarray(d.read_matches(id0, id1), np.uint32))
            in_flight.append((id0, id1, pool.submit(_estimate_pair, *args, options)))
            while in_flight and (len(in_flight) >= 4 * num_threads or k == len(todo) - 1):
                id0, id1, future = in_flight.popleft()
                done.append((id0, id1, future.result()))
                if len(done) >= _VERIFY_COMMIT_EVERY:
                    commit()
        commit()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
