"""Write cameras, images, keypoints and matches into a COLMAP database through ``pycolmap.Database``.

Conventions
-----------
* Image names are paths relative to the image folder with POSIX separators (hloc's names).
* Keypoints handed in and out of this module are in hloc's convention ((0, 0) is the centre of the
  top-left pixel); the database holds COLMAP's convention ((0, 0) is the top-left corner), so
  :func:`write_keypoints` adds 0.5 and :func:`existing_keypoints` subtracts it.
* Every function accepts an open :class:`pycolmap.Database` or a path. Writes run inside one
  ``pycolmap.DatabaseTransaction`` per call, so do not call them from inside a transaction of your own.

Idempotence (re-running on an existing database)
------------------------------------------------
* :func:`import_images` reuses images that are already present (matched by name) and returns their ids;
  only new names get new cameras/images. New images of an existing camera group (``single`` or
  ``per-folder``) share that group's existing camera.
* :func:`write_keypoints` never replaces keypoints: an image whose keypoints are already stored is
  skipped if they are the same (same count, coordinates within :data:`KEYPOINT_TOLERANCE` px), and a
  :class:`ValueError` is raised if they differ, because stored matches index the stored keypoints.
* :func:`write_matches` skips pairs that already have matches (in either order).

Cameras (sizes, EXIF priors, grouping) come from :mod:`mast3r_colmap.cameras`; geometric verification of
the stored matches is :mod:`mast3r_colmap.verification`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import pycolmap

from ..cameras import (DEFAULT_FOCAL_LENGTH_FACTOR, ImageInfo, camera_group_key, make_camera,
                       normalise_camera_mode, parse_intrinsics, read_image_info)
from ..structures import ImageKeypoints, IndexMatches

__all__ = [
    "KEYPOINT_TOLERANCE",
    "existing_keypoints",
    "existing_pairs",
    "image_ids",
    "images_with_keypoints",
    "import_images",
    "id_of",
    "open_database",
    "read_pair_matches",
    "write_keypoints",
    "use_database",
    "write_matches",
]

logger = logging.getLogger(__name__)

DbLike = Union[pycolmap.Database, str, os.PathLike]

#: Stored keypoints count as unchanged when every coordinate is within this many pixels.
KEYPOINT_TOLERANCE = 1e-2



# ----------------------------------------------------------------------------------------------
# database access
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_database(path: str | os.PathLike) -> Iterator[pycolmap.Database]:
    """Open (creating if needed) the COLMAP database at ``path`` and close it on exit.

    Raises:
        ValueError: if the folder does not exist or is not writable, or the file cannot be opened.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"database path {str(path)!r} is a directory")
    if not folder.is_dir():
        raise ValueError(f"cannot create database {str(path)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"database path {str(path)!r} is not writable")
    try:
        db = pycolmap.Database.open(str(path))
    except Exception as exc:  # pycolmap raises RuntimeError/ValueError from its C++ checks
        raise ValueError(f"cannot open database {str(path)!r}: {exc}") from exc
    try:
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def use_database(db: DbLike) -> Iterator[pycolmap.Database]:
    """Yield ``db`` itself if it is open, else open the path for the duration of the block."""
    if isinstance(db, pycolmap.Database):
        yield db
    else:
        with open_database(db) as opened:
            yield opened


def image_ids(db: DbLike) -> dict[str, int]:
    """Map every image name in the database to its id."""
    with use_database(db) as d:
        return {img.name: int(img.image_id) for img in d.read_all_images()}


def _resolve_ids(d: pycolmap.Database, ids: Mapping[str, int] | None) -> dict[str, int]:
    return dict(ids) if ids is not None else image_ids(d)


def id_of(ids: Mapping[str, int], name: str) -> int:
    try:
        return int(ids[name])
    except KeyError:
        raise ValueError(f"unknown image name {name!r}: not in the database / image id map") from None


# ----------------------------------------------------------------------------------------------
# images and cameras
# ----------------------------------------------------------------------------------------------


def import_images(
    db: DbLike,
    image_dir: str | os.PathLike,
    names: Iterable[str],
    camera_mode: str = "single",
    camera_model: str = "SIMPLE_RADIAL",
    intrinsics: str | Sequence[float] | None = None,
    default_focal_length_factor: float = DEFAULT_FOCAL_LENGTH_FACTOR,
    options: Mapping | pycolmap.ImageReaderOptions | None = None,
    cameras: Mapping[str, pycolmap.Camera | None] | None = None,
    estimated_cameras: Iterable[int] = (),
) -> dict[str, int]:
    """Add cameras, rigs, frames and images for ``names`` (relative to ``image_dir``).

    Args:
        db: open database or its path (created if missing).
        image_dir: folder the names are relative to; the files must exist (sizes are read from them).
        names: image names (POSIX relative paths); duplicates are ignored.
        camera_mode: ``"auto"`` (same size and EXIF focal), ``"single"`` (one camera for all images),
            ``"per-folder"`` (one per parent folder) or ``"per-image"``, or a ``pycolmap.CameraMode``.
            Images sharing a camera must have the same size.
        camera_model: a COLMAP camera model name.
        intrinsics: comma-separated parameters of ``camera_model`` used for every new camera
            (sets ``has_prior_focal_length``). Without it the focal comes from EXIF (prior) or is
            ``default_focal_length_factor * max(W, H)`` (no prior) and the principal point is the centre.
        options: a ``pycolmap.ImageReaderOptions`` (or its dict), as hloc passes to ``pycolmap.import_images``:
            its ``camera_model``, ``camera_params`` and ``default_focal_length_factor`` take the place of
            the three arguments above (giving both, different, is a ValueError), and ``existing_camera_id``
            puts every new image on that database camera. Masks are not used (no features are extracted).
            ``pycolmap.import_images`` itself is not called: it has neither our EXIF focal rules and
            ``auto`` grouping nor their re-run camera reuse, nor per-image ``cameras``.
        cameras: ``{name: pycolmap.Camera}`` (e.g. from :func:`~mast3r_colmap.cameras.read_camera_list` of
            an hloc ``name MODEL W H params...`` list): each listed new image gets exactly that camera
            (its size must be the image's; images listed with the same camera share one), outside the
            ``camera_mode`` groups; a listed image already in the database must have that camera.
            ``None`` entries are ignored.
        estimated_cameras: ids of database cameras whose focal prior an earlier run estimated with the
            network (:func:`.focal_priors.read`): in ``auto`` mode they group like cameras without a prior,
            so new images without an EXIF focal join them as they would have in one run over all images.

    Returns:
        ``{name: image_id}`` for every requested name, existing images included.

    Raises:
        ValueError: unknown camera mode or model, wrong number of intrinsics, a missing or unreadable
            image file, or images of different sizes that would share a camera.
    """
    mode = normalise_camera_mode(camera_mode)
    camera_model, intrinsics, default_focal_length_factor, existing_camera_id = _reader_settings(
        options, camera_model, intrinsics, default_focal_length_factor)
    params = parse_intrinsics(intrinsics)
    listed = {str(n): c for n, c in (cameras or {}).items() if c is not None}
    estimated_cameras = {int(c) for c in estimated_cameras}
    image_dir = Path(image_dir)
    names = list(dict.fromkeys(str(n) for n in names))

    with use_database(db) as d:
        existing = {img.name: img for img in d.read_all_images()}
        if existing_camera_id is not None and not d.exists_camera(existing_camera_id):
            raise ValueError(f"existing_camera_id {existing_camera_id}: no such camera in the database")
        # Existing group cameras, so that re-runs add new images to the same camera.
        group_camera: dict[str, int] = {}
        listed_camera: dict[tuple, int] = {}
        for name, img in existing.items():
            if name in listed:  # a camera of the list: not a group camera; it must be the listed one
                cam = d.read_camera(img.camera_id)
                if not _same_camera(cam, listed[name]):
                    raise ValueError(f"image {name!r} is already in the database with camera {cam}, not the "
                                     f"listed {listed[name]}; start a new database (overwrite)")
                listed_camera.setdefault(_camera_key(cam), int(img.camera_id))
                continue
            if mode == "auto":
                cam = d.read_camera(img.camera_id)
                estimated = int(img.camera_id) in estimated_cameras
                prior = cam.mean_focal_length() if cam.has_prior_focal_length and not estimated else None
                group_camera.setdefault((cam.width, cam.height, prior), int(img.camera_id))
            else:
                group_camera.setdefault(camera_group_key(mode, name), int(img.camera_id))
        new = [n for n in names if n not in existing]
        infos: dict[str, ImageInfo] = {}
        for name in new:
            path = image_dir / name
            if not path.is_file():
                raise ValueError(f"unknown image name {name!r}: no file {str(path)!r}")
            infos[name] = read_image_info(path)
        use_frames = d.num_frames() > 0 or d.num_images() == 0

        result = {n: int(existing[n].image_id) for n in names if n in existing}
        with pycolmap.DatabaseTransaction(d):
            camera_rig: dict[int, int | None] = {}
            for name in new:
                info = infos[name]
                key = camera_group_key(mode, name, info)
                cam_id = group_camera.get(key) if existing_camera_id is None else existing_camera_id
                if name in listed:
                    cam = listed[name]
                    if (cam.width, cam.height) != (info.width, info.height):
                        raise ValueError(f"image {name!r} is {info.width}x{info.height} but its listed camera "
                                         f"is {cam.width}x{cam.height}")
                    cam_id = listed_camera.get(_camera_key(cam))
                    if cam_id is None:
                        cam = pycolmap.Camera(model=cam.model, width=cam.width, height=cam.height,
                                              params=cam.params, has_prior_focal_length=True)
                        cam_id = listed_camera[_camera_key(cam)] = int(d.write_camera(cam))
                        logger.debug("camera %d for %s from the list: %s", cam_id, name, cam)
                elif cam_id is None:
                    cam = make_camera(camera_model, info, params, default_focal_length_factor)
                    cam_id = int(d.write_camera(cam))
                    group_camera[key] = cam_id
                    logger.debug("camera %d for group %r: %s (prior focal: %s)", cam_id, key, cam,
                                 info.focal_source if params is None else "intrinsics")
                else:
                    cam = d.read_camera(cam_id)
                    if (cam.width, cam.height) != (info.width, info.height):
                        how = (f"existing_camera_id {cam_id}" if existing_camera_id is not None
                               else f"camera_mode {mode!r}; use 'per-image'")
                        raise ValueError(
                            f"image {name!r} is {info.width}x{info.height} but shares camera {cam_id} "
                            f"({cam.width}x{cam.height}) in {how}")
                image_id = int(d.write_image(pycolmap.Image(name=name, camera_id=cam_id)))
                result[name] = image_id
                if use_frames:
                    rig_id = camera_rig.get(cam_id, -1)
                    if rig_id == -1:
                        rig_id = _rig_of_camera(d, cam_id)
                        camera_rig[cam_id] = rig_id
                    if rig_id is not None:
                        frame = pycolmap.Frame(rig_id=rig_id)
                        frame.add_data_id(pycolmap.data_t(_camera_sensor(cam_id), image_id))
                        d.write_frame(frame)
        logger.info("import_images: %d new, %d existing images; %d cameras in the database",
                    len(new), len(names) - len(new), d.num_cameras())
        return {n: result[n] for n in names}


def _reader_settings(options: Mapping | pycolmap.ImageReaderOptions | None, camera_model: str,
                     intrinsics: str | Sequence[float] | None, focal_factor: float
                     ) -> tuple[str, str | Sequence[float] | None, float, int | None]:
    """``(camera_model, intrinsics, default_focal_length_factor, existing_camera_id)`` of
    :func:`import_images`: its arguments, with the fields of ``ImageReaderOptions`` ``options`` (all of
    an object's, the given keys of a dict) in their place; an argument already set otherwise conflicts."""
    if options is None:
        return camera_model, intrinsics, focal_factor, None
    if isinstance(options, pycolmap.ImageReaderOptions):
        given = options.todict()
    elif isinstance(options, Mapping):
        given = dict(options)
        defaults = pycolmap.ImageReaderOptions().todict()
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"unknown ImageReaderOptions option(s) {unknown}; known: {', '.join(sorted(defaults))}")
    else:
        raise ValueError(f"image options must be a dict or a pycolmap.ImageReaderOptions, got "
                         f"{type(options).__name__}")
    out = {"camera_model": camera_model, "intrinsics": intrinsics, "focal": float(focal_factor)}
    plain = {"camera_model": "SIMPLE_RADIAL", "intrinsics": None, "focal": DEFAULT_FOCAL_LENGTH_FACTOR}
    for ours, theirs in (("camera_model", "camera_model"), ("intrinsics", "camera_params"),
                         ("focal", "default_focal_length_factor")):
        if theirs not in given:
            continue
        value = given[theirs]
        value = (value or None) if ours == "intrinsics" else float(value) if ours == "focal" else str(value)
        if out[ours] != plain[ours] and value != out[ours] and value != plain[ours]:
            raise ValueError(f"ImageReaderOptions.{theirs} = {value!r} conflicts with {ours} = {out[ours]!r}: "
                             "give it once")
        if value != plain[ours] or out[ours] == plain[ours]:
            out[ours] = value
    for key in ("mask_path", "camera_mask_path"):
        if str(given.get(key, ".")) not in (".", ""):
            logger.warning("ImageReaderOptions.%s is not used: MASt3R matching reads no masks", key)
    camera_id = int(given.get("existing_camera_id", -1))
    return out["camera_model"], out["intrinsics"], out["focal"], None if camera_id < 0 else camera_id


def _camera_key(cam: pycolmap.Camera) -> tuple:
    return (cam.model.name, int(cam.width), int(cam.height), tuple(np.round(np.asarray(cam.params, float), 9)))


def _same_camera(a: pycolmap.Camera, b: pycolmap.Camera) -> bool:
    return (a.model == b.model and (a.width, a.height) == (b.width, b.height)
            and np.allclose(np.asarray(a.params), np.asarray(b.params), rtol=1e-9, atol=1e-9))


def _camera_sensor(camera_id: int) -> pycolmap.sensor_t:
    return pycolmap.sensor_t(type=pycolmap.SensorType.CAMERA, id=int(camera_id))


def _rig_of_camera(d: pycolmap.Database, camera_id: int) -> int | None:
    """The trivial rig of a camera, written if missing (as ``pycolmap.import_images`` does)."""
    rig = d.read_rig_with_sensor(_camera_sensor(camera_id))
    if rig is not None:
        return int(rig.rig_id)
    rig = pycolmap.Rig()
    rig.add_ref_sensor(_camera_sensor(camera_id))
    return int(d.write_rig(rig))


# ----------------------------------------------------------------------------------------------
# keypoints and matches
# ----------------------------------------------------------------------------------------------


def write_keypoints(db: DbLike, image_ids: Mapping[str, int] | None,
                    keypoints: Mapping[str, ImageKeypoints]) -> int:
    """Write keypoints (hloc convention) into the database (COLMAP convention, +0.5).

    Images that already have keypoints are skipped when the stored ones are the same; if they differ
    (count, or any coordinate by more than :data:`KEYPOINT_TOLERANCE` px) a :class:`ValueError` is raised,
    since stored matches refer to the stored keypoints. ``image_ids=None`` reads the ids from ``db``.

    Returns:
        The number of images whose keypoints were written.
    """
    with use_database(db) as d, pycolmap.DatabaseTransaction(d):
        return _write_keypoints(d, _resolve_ids(d, image_ids), keypoints)


def _write_keypoints(d: pycolmap.Database, ids: Mapping[str, int], keypoints: Mapping[str, ImageKeypoints]) -> int:
    written = 0
    for name, kp in keypoints.items():
        image_id = id_of(ids, name)
        kps = np.asarray(kp.keypoints, np.float64) + 0.5
        if d.exists_keypoints(image_id):
            stored = np.asarray(d.read_keypoints(image_id))[:, :2]
            if stored.shape[0] != kps.shape[0]:
                raise ValueError(f"image {name!r} already has {stored.shape[0]} keypoints in the "
                                 f"database, refusing to replace them with {kps.shape[0]}")
            if kps.size and np.abs(stored - kps).max() > KEYPOINT_TOLERANCE:
                raise ValueError(f"image {name!r} already has different keypoints in the database "
                                 f"(max difference {np.abs(stored - kps).max():.3g} px)")
            logger.debug("keypoints of %s already stored, skipped", name)
            continue
        d.write_keypoints(image_id, kps.astype(np.float32))
        written += 1
    logger.info("write_keypoints: %d written, %d already present", written, len(keypoints) - written)
    return written


def write_matches(db: DbLike, image_ids: Mapping[str, int] | None, matches: Iterable[IndexMatches]) -> int:
    """Write raw (unverified) matches; pairs already in the database are skipped.

    The keypoints of both images must be in the database already; indices are checked against them.
    The pair may be given in either order: pycolmap stores it with the smaller image id first and
    swaps the columns itself. A pair repeated in ``matches`` (in any order) is written once. A pair with
    no matches is written too (empty), so that :func:`existing_pairs` records it as done.

    Returns:
        The number of pairs written.
    """
    with use_database(db) as d, pycolmap.DatabaseTransaction(d):
        return _write_matches(d, _resolve_ids(d, image_ids), matches)


def _write_matches(d: pycolmap.Database, ids: Mapping[str, int], matches: Iterable[IndexMatches]) -> int:
    written = skipped = 0
    counts: dict[int, int] = {}

    def num_kps(name: str, image_id: int) -> int:
        if image_id not in counts:
            if not d.exists_keypoints(image_id):
                raise ValueError(f"image {name!r} has no keypoints in the database; write them first")
            counts[image_id] = int(d.num_keypoints_for_image(image_id))
        return counts[image_id]

    for m in matches:
        id0, id1 = id_of(ids, m.name0), id_of(ids, m.name1)
        if id0 == id1:
            raise ValueError(f"pair {m.name0!r}/{m.name1!r} matches an image with itself")
        if d.exists_matches(id0, id1):
            skipped += 1
            continue
        idx = np.asarray(m.matches, np.int64).reshape(-1, 2)
        for col, (name, image_id) in enumerate(((m.name0, id0), (m.name1, id1))):
            n = num_kps(name, image_id)
            if idx.size and (idx[:, col].min() < 0 or idx[:, col].max() >= n):
                raise ValueError(f"pair {m.name0!r}/{m.name1!r}: keypoint index out of range "
                                 f"[0, {n}) for image {name!r}")
        d.write_matches(id0, id1, idx.astype(np.uint32))
        written += 1
    logger.info("write_matches: %d pairs written, %d already present", written, skipped)
    return written


def write_features_and_matches(db: DbLike, image_ids: Mapping[str, int] | None,
                               keypoints: Mapping[str, ImageKeypoints], matches: Iterable[IndexMatches]) -> int:
    """:func:`write_keypoints` then :func:`write_matches` in ONE transaction: after a crash the database
    holds either all of them or none. Returns the number of pairs written.

    Both are consumed one item at a time, so ``keypoints`` may be a mapping that reads each image's keypoints on
    access and ``matches`` an iterator (e.g. :class:`~mast3r_colmap.keypoints.DiskConsolidation`): memory then
    stays bounded whatever the collection (SQLite spills a large transaction to its journal)."""
    with use_database(db) as d, pycolmap.DatabaseTransaction(d):
        ids = _resolve_ids(d, image_ids)
        _write_keypoints(d, ids, keypoints)
        return _write_matches(d, ids, matches)


def existing_pairs(db: DbLike) -> set[frozenset[str]]:
    """Pairs of image names that already have (raw) matches in the database."""
    with use_database(db) as d:
        names = {int(img.image_id): img.name for img in d.read_all_images()}
        pair_ids, _ = d.read_num_matches()
        out = set()
        for pid in pair_ids:
            i, j = pycolmap.pair_id_to_image_pair(int(pid))
            out.add(frozenset((names[int(i)], names[int(j)])))
        return out


def read_pair_matches(db: DbLike, image_ids: Mapping[str, int] | None, name0: str, name1: str) -> np.ndarray:
    """The raw matches of ``(name0, name1)`` as (M, 2) int64 ``[idx0, idx1]``, in COLMAP's row order
    whichever way round the pair was written. ValueError if the pair was never matched."""
    with use_database(db) as d:
        ids = _resolve_ids(d, image_ids)
        id0, id1 = id_of(ids, name0), id_of(ids, name1)
        if not d.exists_matches(id0, id1):
            raise ValueError(f"pair {name0!r}/{name1!r} has no matches in the database")
        return np.asarray(d.read_matches(id0, id1), np.int64).reshape(-1, 2)


def existing_keypoints(db: DbLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Stored keypoints per image name, as (K, 2) float64 arrays in hloc's convention (-0.5); only those of
    ``names`` when given (names without keypoints or not in the database are left out)."""
    wanted = None if names is None else set(names)
    with use_database(db) as d:
        out = {}
        for img in d.read_all_images():
            if (wanted is None or img.name in wanted) and d.exists_keypoints(img.image_id):
                out[img.name] = np.asarray(d.read_keypoints(img.image_id), np.float64)[:, :2] - 0.5
        return out


def images_with_keypoints(db: DbLike) -> set[str]:
    """Names of the images that have keypoints in the database (without reading them)."""
    with use_database(db) as d:
        return {img.name for img in d.read_all_images() if d.exists_keypoints(img.image_id)}
