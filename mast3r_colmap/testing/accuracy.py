"""How accurate are the keypoints that consolidation builds? The same raw matches, several routes, one scene.

The benchmark ``benchmarks/bench_sfm_accuracy.py`` and the CI test ``tests/test_sfm_accuracy.py`` share this
module. A synthetic scene with known geometry (:mod:`.synthetic`) is matched once by the production
:class:`~mast3r_colmap.matching.matcher.Matcher` (FRM, coarse-to-fine) through a
:class:`~mast3r_colmap.store.MatchStore`, as the pipeline does. The stored raw matches then go through each
route, which turns them into per-image keypoints and one-to-one index matches:

* :func:`ours`: :func:`mast3r_colmap.keypoints.consolidate` with a :class:`~mast3r_colmap.keypoints.KeypointConfig`
  (the default one unless given), i.e. whatever the package does;
* :func:`hloc_aggregation`: hloc's own ``aggregate_matches`` and ``assign_matches`` (``hloc.match_dense``),
  called as hloc's ``match_and_assign`` calls them, on the raw matches written the way hloc's
  ``match_dense`` writes them; the caller passes the imported ``match_dense`` module and one of its
  ``confs`` (load it with :func:`load_match_dense`);
* :func:`lattice_keypoints`: one keypoint per pixel of the lattice each match was sampled on (the network
  image for the coarse pass, the full-resolution crop pixels for coarse-to-fine), no cap, matches shared
  by pixel index: what the official MASt3R COLMAP export does.

:func:`map_and_score` writes a route's result into a fresh COLMAP database, verifies and maps it with the
same options and seed for every route, and scores the model against the scene: registered images, points,
track length, reprojection error, rotation and camera-centre errors after similarity alignment
(:func:`~.synthetic.pose_errors`) and the distance of the 3D points to the true surfaces
(:func:`surface_distance`), in units of the scene size like the centre error.

Only the consolidation itself is timed as "consolidation" (for hloc: ``load_keypoints`` +
``aggregate_matches`` + ``assign_matches``, which read the raw matches from the HDF5 file hloc's matcher wrote).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..export import colmap_db
from ..images import LoadedImage
from ..keypoints import KeypointConfig, consolidate
from ..mapping import incremental, summary
from ..matching.schedule import schedule_pairs
from ..store import MatchStore, config_key
from ..structures import ImageKeypoints, IndexMatches, PairMatches
from ..verification import verify_matches
from .synthetic import SyntheticScene, pose_errors

__all__ = ["Consolidated", "RouteResult", "collect_matches", "hloc_aggregation", "lattice_keypoints",
           "load_match_dense", "map_and_score", "ours", "surface_distance"]

logger = logging.getLogger(__name__)

#: hloc's default cap of keypoints per image (``match_dense.main`` / ``match_and_assign``).
HLOC_MAX_KPS = 8192

#: A coordinate counts as sampled on a lattice when it is this close (in that lattice's pixels) to a node.
#: Raw matches are stored as float32, which moves a 2000-px coordinate by 1e-4 px at most.
LATTICE_TOLERANCE = 1e-3

_PLACEHOLDERS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


@dataclass
class Consolidated:
    """A route's output: keypoints of every image, one-to-one matches of every pair, seconds it took."""

    keypoints: Dict[str, ImageKeypoints]
    matches: List[IndexMatches]
    seconds: float


# ------------------------------------------------------------------------------------------------
# Raw matches
# ------------------------------------------------------------------------------------------------

def collect_matches(matcher: Any, pairs: Sequence[Tuple[str, str]], store_path: str | os.PathLike,
                    image_dir: str | os.PathLike) -> List[PairMatches]:
    """The raw matches of ``pairs`` through a :class:`~mast3r_colmap.store.MatchStore` at ``store_path`` (keyed
    by the matcher's settings and the image files, as the pipeline keys it): pairs already stored are reused,
    the others are matched in the order of :func:`~mast3r_colmap.matching.schedule.schedule_pairs`."""
    with MatchStore(store_path, config_key(matcher.settings()), image_dir) as store:
        done = store.done_pairs()
        todo = [p for p in pairs if frozenset(p) not in done]
        if todo:
            started = time.perf_counter()
            for pm in matcher.match_pairs(schedule_pairs(todo, matcher.cache_size)):
                store.put(pm)
            logger.info("matched %d pairs in %.1f s (%d were stored)", len(todo), time.perf_counter() - started,
                        len(pairs) - len(todo))
        return list(store.get_many(pairs))


# ------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------

def ours(pair_matches: Sequence[PairMatches], conf: KeypointConfig = KeypointConfig()) -> Consolidated:
    """:func:`mast3r_colmap.keypoints.consolidate` (the package's consolidation) with ``conf``."""
    started = time.perf_counter()
    keypoints, matches = consolidate(pair_matches, conf)
    return Consolidated(keypoints, matches, time.perf_counter() - started)


def load_match_dense() -> types.ModuleType:
    """``hloc.match_dense``, imported from wherever ``hloc`` is importable (put its folder on ``sys.path`` first).

    ``match_dense`` imports ``torchvision.transforms.functional`` at module level, only for the image
    resizing of its own LoFTR matcher, which the aggregation routes here never call. Where torchvision
    cannot be imported (no build for this torch: it is absent, or raises at import), empty placeholder
    modules for exactly those three names stand in while ``match_dense`` is imported, and are removed
    again afterwards.
    """
    if "hloc.match_dense" in sys.modules:
        return sys.modules["hloc.match_dense"]
    try:
        importlib.import_module("torchvision.transforms.functional")
    except Exception as exc:  # ImportError, or RuntimeError from a torchvision built for another torch
        logger.debug("torchvision is not usable (%s: %s): placeholders for hloc.match_dense's import",
                     type(exc).__name__, exc)
    else:
        return importlib.import_module("hloc.match_dense")
    saved = {name: sys.modules.get(name) for name in _PLACEHOLDERS}
    parent = None
    for name in _PLACEHOLDERS:
        module = types.ModuleType(name, "placeholder: torchvision is not usable here (see load_match_dense)")
        if parent is not None:
            setattr(parent, name.rsplit(".", 1)[1], module)
        sys.modules[name] = parent = module
    try:
        return importlib.import_module("hloc.match_dense")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _write_raw_h5(path: Path, pair_matches: Sequence[PairMatches], names_to_pair: Callable[[str, str], str]) -> None:
    """The raw matches as hloc's ``match_dense`` writes them: a group per pair with float32 ``keypoints0``,
    ``keypoints1`` (hloc's pixel convention, as ours) and ``scores``."""
    import h5py

    with h5py.File(str(path), "w") as fd:
        for pm in pair_matches:
            grp = fd.create_group(names_to_pair(pm.name0, pm.name1))
            grp.create_dataset("keypoints0", data=pm.xy0.astype(np.float32))
            grp.create_dataset("keypoints1", data=pm.xy1.astype(np.float32))
            grp.create_dataset("scores", data=pm.scores.astype(np.float32))


def hloc_aggregation(pair_matches: Sequence[PairMatches], match_dense: types.ModuleType, conf: Mapping[str, Any],
                     workdir: str | os.PathLike, max_kps: Optional[int] = HLOC_MAX_KPS) -> Consolidated:
    """hloc's keypoints and matches for the raw matches: ``load_keypoints``, ``aggregate_matches`` and (with
    ``max_kps``) ``assign_matches`` of ``match_dense``, as its ``match_and_assign`` runs them after matching.

    Args:
        pair_matches: raw matches, one per pair (hloc's matcher writes one group per pair).
        match_dense: the ``hloc.match_dense`` module (:func:`load_match_dense`).
        conf: one of ``match_dense.confs`` (its ``cell_size`` and ``max_error`` are used).
        workdir: an empty folder for hloc's ``matches.h5`` / ``features.h5``.
        max_kps: hloc's keypoint cap (its default 8192; None: no cap and no re-assignment).
    """
    import h5py

    names_to_pair = match_dense.names_to_pair      # hloc's pair keys, as match_dense imports them
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    match_path, feature_path = workdir / "matches.h5", workdir / "features.h5"
    pairs = [(pm.name0, pm.name1) for pm in pair_matches]
    if len(set(map(frozenset, pairs))) != len(pairs):
        raise ValueError("hloc's aggregation takes each pair once")
    _write_raw_h5(match_path, pair_matches, names_to_pair)   # what hloc's matcher writes: not timed
    required = set(name for pair in pairs for name in pair)
    started = time.perf_counter()
    cpdict, bindict = match_dense.load_keypoints(conf, [], quantize=required)
    cpdict = match_dense.aggregate_matches(conf, pairs, match_path, feature_path=feature_path,
                                           required_queries=required, max_kps=max_kps, cpdict=cpdict,
                                           bindict=bindict)
    if max_kps is not None:
        match_dense.assign_matches(pairs, match_path, cpdict, max_error=conf["max_error"])
    seconds = time.perf_counter() - started

    keypoints: Dict[str, ImageKeypoints] = {}
    with h5py.File(str(feature_path), "r") as fd:
        for name in sorted(required):
            keypoints[name] = ImageKeypoints(name, fd[name]["keypoints"][()].astype(np.float64),
                                             fd[name]["score"][()].astype(np.float32))
    matches = []
    with h5py.File(str(match_path), "r") as fd:
        for name0, name1 in pairs:
            grp = fd[names_to_pair(name0, name1)]
            m0 = grp["matches0"][()].astype(np.int64)
            idx0 = np.flatnonzero(m0 >= 0)
            matches.append(IndexMatches(name0, name1, np.stack([idx0, m0[idx0]], 1),
                                        grp["matching_scores0"][()][idx0].astype(np.float32)))
    return Consolidated(keypoints, matches, seconds)


def _lattice_keys(xy: np.ndarray, image: LoadedImage) -> Tuple[np.ndarray, int]:
    """Integer key of the lattice node each original-pixel coordinate was sampled at, and how many were on no
    lattice (those are put on the nearest network pixel).

    Full-resolution pixels (coarse-to-fine crops are cut at full resolution) come first, so that a point on
    both lattices has one key; then network pixels. Keys: ``y * W + x`` on the original lattice (W, H the
    original size), ``W * H + y * w + x`` on the network lattice (w the network width).
    """
    W, H = image.original_size
    w, h = image.network_size
    node = np.rint(xy)
    on_orig = (np.abs(xy - node) <= LATTICE_TOLERANCE).all(1)
    net = image.to_network(xy)
    net_node = np.rint(net)
    on_net = (np.abs(net - net_node) <= LATTICE_TOLERANCE).all(1) & ~on_orig
    off = int((~on_orig & ~on_net).sum())
    ox = np.clip(node[:, 0], 0, W - 1).astype(np.int64)
    oy = np.clip(node[:, 1], 0, H - 1).astype(np.int64)
    nx = np.clip(net_node[:, 0], 0, w - 1).astype(np.int64)
    ny = np.clip(net_node[:, 1], 0, h - 1).astype(np.int64)
    return np.where(on_orig, oy * W + ox, W * H + ny * w + nx), off


def _key_positions(keys: np.ndarray, image: LoadedImage) -> np.ndarray:
    """Original-pixel positions (hloc convention) of the lattice nodes of :func:`_lattice_keys`."""
    W, H = image.original_size
    w = image.network_size[0]
    out = np.empty((len(keys), 2), np.float64)
    orig = keys < W * H
    out[orig] = np.stack([keys[orig] % W, keys[orig] // W], 1)
    rest = keys[~orig] - W * H
    out[~orig] = image.to_original(np.stack([rest % w, rest // w], 1).astype(np.float64))
    return out


def _best_one_to_one(i0: np.ndarray, i1: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Rows kept by "best score per idx0, then best per idx1" (ties: first row): one-to-one."""
    order = np.lexsort((np.arange(len(s)), -s.astype(np.float64)))
    _, first0 = np.unique(i0[order], return_index=True)
    rows = order[np.sort(first0)]
    _, first1 = np.unique(i1[rows], return_index=True)
    return np.sort(rows[first1])


def lattice_keypoints(pair_matches: Sequence[PairMatches], image_of: Callable[[str], LoadedImage]) -> Consolidated:
    """One keypoint per (image, sampled pixel), no cap: each raw match maps back to the pixel it was sampled at
    (:meth:`LoadedImage.to_network`, or the full-resolution pixel of a coarse-to-fine crop), whose centre in
    original pixels becomes the keypoint, shared by every pair that sampled it. Matches are those pixel
    indices, made one-to-one by best score per keypoint of image 0, then of image 1.

    ``image_of(name)`` gives the image as the matcher loaded it (``Matcher.image``).
    """
    started = time.perf_counter()
    keys: Dict[str, List[np.ndarray]] = {}
    sides = []
    off = 0
    for pm in pair_matches:
        ks = []
        for name, xy in ((pm.name0, pm.xy0), (pm.name1, pm.xy1)):
            k, n_off = _lattice_keys(xy, image_of(name))
            off += n_off
            keys.setdefault(name, []).append(k)
            ks.append(k)
        sides.append(ks)
    if off:
        logger.warning("lattice keypoints: %d observations on no lattice, put on the nearest network pixel", off)
    lookup: Dict[str, np.ndarray] = {}
    votes: Dict[str, np.ndarray] = {}
    for name, parts in keys.items():
        lookup[name] = np.unique(np.concatenate(parts))
        votes[name] = np.zeros(len(lookup[name]))
    matches = []
    for pm, (k0, k1) in zip(pair_matches, sides):
        i0 = np.searchsorted(lookup[pm.name0], k0)
        i1 = np.searchsorted(lookup[pm.name1], k1)
        w = np.maximum(pm.scores.astype(np.float64), 0.0)
        votes[pm.name0] += np.bincount(i0, w, minlength=len(votes[pm.name0]))
        votes[pm.name1] += np.bincount(i1, w, minlength=len(votes[pm.name1]))
        rows = _best_one_to_one(i0, i1, pm.scores)
        matches.append(IndexMatches(pm.name0, pm.name1, np.stack([i0[rows], i1[rows]], 1), pm.scores[rows]))
    keypoints = {name: ImageKeypoints(name, _key_positions(lookup[name], image_of(name)), votes[name])
                 for name in sorted(lookup)}
    return Consolidated(keypoints, matches, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------
# Mapping and scores
# ------------------------------------------------------------------------------------------------

def surface_distance(scene: SyntheticScene, X: np.ndarray) -> np.ndarray:
    """Distance of world points (N, 3) to the nearest of the scene's surfaces (its rectangles).

    The rectangles of the scenes have perpendicular sides, so clamping the point's in-plane coordinates to
    [0, 1] gives the nearest point of each.
    """
    X = np.asarray(X, np.float64).reshape(-1, 3)
    best = np.full(len(X), np.inf)
    for rect in scene.surfaces:
        d = X - rect.origin
        a = np.clip(d @ rect.u / (rect.u @ rect.u), 0.0, 1.0)
        b = np.clip(d @ rect.v / (rect.v @ rect.v), 0.0, 1.0)
        nearest = rect.origin + a[:, None] * rect.u + b[:, None] * rect.v
        best = np.minimum(best, np.linalg.norm(X - nearest, axis=1))
    return best


@dataclass
class RouteResult:
    """Scores of one route's model (errors of the centres and points are in units of the scene size)."""

    route: str
    num_images: int
    registered: int
    points: int
    track_length: float
    reprojection_px: float
    median_rotation_deg: float
    max_rotation_deg: float
    median_center: float
    max_center: float
    median_point: float
    keypoints_per_image: float
    matches: int
    consolidation_s: float
    verification_s: float
    mapping_s: float

    def asdict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def map_and_score(route: str, result: Consolidated, scene: SyntheticScene, image_dir: str | os.PathLike,
                  workdir: str | os.PathLike, pairs: Iterable[Tuple[str, str]],
                  mapper_options: Optional[Mapping[str, Any]] = None, seed: int = 0,
                  progress: bool = False) -> RouteResult:
    """Write ``result`` into a fresh database under ``workdir`` (one PINHOLE camera for all images, focal
    unknown, as the pipeline with ``camera_model="PINHOLE"``), verify ``pairs``
    (:func:`~mast3r_colmap.verification.verify_matches`, default options), map with
    :func:`~mast3r_colmap.mapping.incremental` (``mapper_options``, ``seed``; ``progress``: its bar) and
    score the model."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "database.db"
    if database.exists():
        raise ValueError(f"{database} exists: map_and_score needs a fresh folder")
    names = list(scene.names)
    with colmap_db.open_database(database) as db:
        ids = colmap_db.import_images(db, image_dir, names, camera_mode="single", camera_model="PINHOLE")
    keypoints = dict(result.keypoints)
    for name in names:
        keypoints.setdefault(name, ImageKeypoints(name, np.zeros((0, 2))))
    colmap_db.write_features_and_matches(database, ids, keypoints, result.matches)
    started = time.perf_counter()
    verify_matches(database, list(pairs))
    verification_s = time.perf_counter() - started
    started = time.perf_counter()
    rec = incremental(database, image_dir, workdir / "sparse", options=mapper_options, seed=seed,
                      progress=progress)
    mapping_s = time.perf_counter() - started
    nan = float("nan")
    kpi = float(np.mean([len(k) for k in keypoints.values()]))
    n_matches = int(sum(len(m) for m in result.matches))
    if rec is None:
        return RouteResult(route, len(names), 0, 0, nan, nan, nan, nan, nan, nan, nan, kpi, n_matches,
                           result.seconds, verification_s, mapping_s)
    info = summary(rec)
    err = pose_errors(rec, scene)
    point_err = nan
    if err["sim3"] is not None and rec.num_points3D():
        s, R, t = err["sim3"]
        X = np.stack([p.xyz for p in rec.points3D.values()])
        point_err = float(np.median(surface_distance(scene, s * X @ R.T + t)) / scene.scene_size)
    return RouteResult(route, len(names), len(err["registered"]), info["num_points3D"], info["mean_track_length"],
                       info["mean_reprojection_error"], err["median_rotation_deg"], err["max_rotation_deg"],
                       err["median_center_rel"], err["max_center_rel"], point_err, kpi, n_matches,
                       result.seconds, verification_s, mapping_s)
