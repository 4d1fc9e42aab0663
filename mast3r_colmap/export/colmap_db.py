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
* :func:`verify_matches` skips pairs that already have a two-view geometry. It commits every
  :data:`_VERIFY_COMMIT_EVERY` pairs rather than once per call, so that long runs keep their progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Union

import numpy as np
import pycolmap
from PIL import Image as PILImage

from ..options import build as build_options
from ..structures import ImageKeypoints, IndexMatches

__all__ = [
    "CAMERA_MODES",
    "DEFAULT_FOCAL_LENGTH_FACTOR",
    "DEFAULT_VERIFICATION_OPTIONS",
    "KEYPOINT_TOLERANCE",
    "ImageInfo",
    "existing_keypoints",
    "existing_pairs",
    "image_ids",
    "import_images",
    "open_database",
    "read_image_info",
    "read_pair_matches",
    "verify_matches",
    "write_keypoints",
    "write_matches",
]

logger = logging.getLogger(__name__)

DbLike = Union[pycolmap.Database, str, os.PathLike]

#: Accepted ``camera_mode`` values (``_`` may be used instead of ``-``).
#: "auto": images of the same size and EXIF focal share a camera (COLMAP's AUTO); "single": one camera
#: for all images (they must have one size); "per-folder": one per parent folder; "per-image".
CAMERA_MODES: tuple[str, ...] = ("auto", "single", "per-folder", "per-image")
#: Focal length of a camera without a prior, as a multiple of max(W, H) (COLMAP's default).
DEFAULT_FOCAL_LENGTH_FACTOR = 1.2
#: Stored keypoints count as unchanged when every coordinate is within this many pixels.
KEYPOINT_TOLERANCE = 1e-2
#: hloc's RANSAC settings, with a fixed seed so that verification is reproducible whatever the thread order.
DEFAULT_VERIFICATION_OPTIONS: dict[str, Any] = {"ransac": {"max_num_trials": 20000, "min_inlier_ratio": 0.1,
                                                        "random_seed": 0}}

_DIAGONAL_35MM = 43.27  # mm, the constant COLMAP uses (hypot(36, 24) = 43.267)
_EXIF_IFD = 0x8769
_TAG_ORIENTATION = 0x0112
_TAG_FOCAL_LENGTH = 0x920A
_TAG_FOCAL_LENGTH_35MM = 0xA405


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
def _use_db(db: DbLike) -> Iterator[pycolmap.Database]:
    """Yield ``db`` itself if it is open, else open the path for the duration of the block."""
    if isinstance(db, pycolmap.Database):
        yield db
    else:
        with open_database(db) as opened:
            yield opened


def image_ids(db: DbLike) -> dict[str, int]:
    """Map every image name in the database to its id."""
    with _use_db(db) as d:
        return {img.name: int(img.image_id) for img in d.read_all_images()}


def _resolve_ids(d: pycolmap.Database, ids: Mapping[str, int] | None) -> dict[str, int]:
    return dict(ids) if ids is not None else image_ids(d)


def _id_of(ids: Mapping[str, int], name: str) -> int:
    try:
        return int(ids[name])
    except KeyError:
        raise ValueError(f"unknown image name {name!r}: not in the database / image id map") from None


# ----------------------------------------------------------------------------------------------
# images and cameras
# ----------------------------------------------------------------------------------------------


class ImageInfo:
    """Size (after EXIF orientation) and EXIF focal prior of one image file."""

    __slots__ = ("width", "height", "focal", "focal_source")

    def __init__(self, width: int, height: int, focal: float | None, focal_source: str) -> None:
        self.width = width
        self.height = height
        self.focal = focal              # pixels, or None without an EXIF prior
        self.focal_source = focal_source  # "exif-35mm", "exif-sensor", or "none"

    def __repr__(self) -> str:
        return f"ImageInfo({self.width}x{self.height}, focal={self.focal}, source={self.focal_source})"


def _rational(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def read_image_info(path: str | os.PathLike) -> ImageInfo:
    """Read an image's size and focal prior from its header without decoding the pixels.

    The size is the one after applying the EXIF orientation (the frame in which keypoints live).
    The focal prior, in pixels, comes from

    1. ``FocalLengthIn35mmFilm``: ``f35 * hypot(W, H) / 43.27`` (COLMAP's diagonal rule), or
    2. ``FocalLength`` in mm plus the sensor width from COLMAP's camera database, through
       ``pycolmap.infer_camera_from_image`` (which does read the file), or
    3. nothing (``focal is None``).
    """
    path = Path(path)
    try:
        with PILImage.open(path) as im:
            width, height = im.size
            exif = im.getexif()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc
    if exif.get(_TAG_ORIENTATION) in (5, 6, 7, 8):
        width, height = height, width
    sub = exif.get_ifd(_EXIF_IFD) if exif else {}
    f35 = _rational(sub.get(_TAG_FOCAL_LENGTH_35MM, exif.get(_TAG_FOCAL_LENGTH_35MM)))
    if f35 is not None:
        return ImageInfo(width, height, f35 * float(np.hypot(width, height)) / _DIAGONAL_35MM, "exif-35mm")
    if _rational(sub.get(_TAG_FOCAL_LENGTH, exif.get(_TAG_FOCAL_LENGTH))) is not None:
        try:
            cam = pycolmap.infer_camera_from_image(str(path))
        except Exception as exc:  # noqa: BLE001 - an unreadable file only loses the prior
            logger.debug("infer_camera_from_image failed for %s: %s", path, exc)
        else:
            if cam.has_prior_focal_length:
                # COLMAP's focal is focal_mm / sensor_mm * max(W, H): independent of the orientation.
                return ImageInfo(width, height, float(cam.mean_focal_length()), "exif-sensor")
    return ImageInfo(width, height, None, "none")


def _normalise_mode(camera_mode: str) -> str:
    mode = str(camera_mode).strip().lower().replace("_", "-")
    if mode not in CAMERA_MODES:
        raise ValueError(f"unknown camera_mode {camera_mode!r}; expected one of {', '.join(CAMERA_MODES)}")
    return mode


def _parse_intrinsics(intrinsics: str | Sequence[float] | None) -> list[float] | None:
    if intrinsics is None:
        return None
    if isinstance(intrinsics, str):
        try:
            params = [float(p) for p in intrinsics.replace(" ", "").split(",") if p]
        except ValueError:
            raise ValueError(f"intrinsics {intrinsics!r} must be comma-separated numbers") from None
    else:
        params = [float(p) for p in intrinsics]
    if not params or not all(np.isfinite(params)):
        raise ValueError(f"intrinsics {intrinsics!r} must be non-empty finite numbers")
    return params


def _make_camera(model: str, info: ImageInfo, params: list[float] | None,
                 focal_factor: float) -> pycolmap.Camera:
    if model not in pycolmap.CameraModelId.__members__ or model == "INVALID":
        raise ValueError(f"unknown camera_model {model!r}")
    focal = info.focal if info.focal is not None else focal_factor * max(info.width, info.height)
    cam = pycolmap.Camera.create_from_model_name(0, model, float(focal), info.width, info.height)
    cam.has_prior_focal_length = info.focal is not None
    if params is not None:
        if len(params) != len(cam.params):
            raise ValueError(f"intrinsics: camera model {model} takes {len(cam.params)} parameters "
                             f"({cam.params_info}), got {len(params)}")
        cam.params = params
        cam.has_prior_focal_length = True
    return cam


def _group_key(mode: str, name: str, info: ImageInfo | None = None) -> Any:
    if mode == "auto":
        return None if info is None else (info.width, info.height, info.focal)
    if mode == "single":
        return ""
    if mode == "per-folder":
        return str(PurePosixPath(name).parent)
    return name


def import_images(
    db: DbLike,
    image_dir: str | os.PathLike,
    names: Iterable[str],
    camera_mode: str = "single",
    camera_model: str = "SIMPLE_RADIAL",
    intrinsics: str | Sequence[float] | None = None,
    default_focal_length_factor: float = DEFAULT_FOCAL_LENGTH_FACTOR,
) -> dict[str, int]:
    """Add cameras, rigs, frames and images for ``names`` (relative to ``image_dir``).

    Args:
        db: open database or its path (created if missing).
        image_dir: folder the names are relative to; the files must exist (sizes are read from them).
        names: image names (POSIX relative paths); duplicates are ignored.
        camera_mode: ``"single"`` (one camera for all images), ``"per-folder"`` (one per parent folder)
            or ``"per-image"``. Images sharing a camera must have the same size.
        camera_model: a COLMAP camera model name.
        intrinsics: comma-separated parameters of ``camera_model`` used for every new camera
            (sets ``has_prior_focal_length``). Without it the focal comes from EXIF (prior) or is
            ``default_focal_length_factor * max(W, H)`` (no prior) and the principal point is the centre.

    Returns:
        ``{name: image_id}`` for every requested name, existing images included.

    Raises:
        ValueError: unknown camera mode or model, wrong number of intrinsics, a missing or unreadable
            image file, or images of different sizes that would share a camera.
    """
    mode = _normalise_mode(camera_mode)
    params = _parse_intrinsics(intrinsics)
    image_dir = Path(image_dir)
    names = list(dict.fromkeys(str(n) for n in names))

    with _use_db(db) as d:
        existing = {img.name: img for img in d.read_all_images()}
        # Existing group cameras, so that re-runs add new images to the same camera.
        group_camera: dict[str, int] = {}
        for name, img in existing.items():
            if mode == "auto":
                cam = d.read_camera(img.camera_id)
                prior = cam.mean_focal_length() if cam.has_prior_focal_length else None
                group_camera.setdefault((cam.width, cam.height, prior), int(img.camera_id))
            else:
                group_camera.setdefault(_group_key(mode, name), int(img.camera_id))
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
                key = _group_key(mode, name, info)
                cam_id = group_camera.get(key)
                if cam_id is None:
                    cam = _make_camera(camera_model, info, params, default_focal_length_factor)
                    cam_id = int(d.write_camera(cam))
                    group_camera[key] = cam_id
                    logger.debug("camera %d for group %r: %s (prior focal: %s)", cam_id, key, cam,
                                 info.focal_source if params is None else "intrinsics")
                else:
                    cam = d.read_camera(cam_id)
                    if (cam.width, cam.height) != (info.width, info.height):
                        raise ValueError(
                            f"image {name!r} is {info.width}x{info.height} but shares camera {cam_id} "
                            f"({cam.width}x{cam.height}) in camera_mode {mode!r}; use 'per-image'")
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
    with _use_db(db) as d, pycolmap.DatabaseTransaction(d):
        return _write_keypoints(d, _resolve_ids(d, image_ids), keypoints)


def _write_keypoints(d: pycolmap.Database, ids: Mapping[str, int], keypoints: Mapping[str, ImageKeypoints]) -> int:
    written = 0
    for name, kp in keypoints.items():
        image_id = _id_of(ids, name)
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
    with _use_db(db) as d, pycolmap.DatabaseTransaction(d):
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
        id0, id1 = _id_of(ids, m.name0), _id_of(ids, m.name1)
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
    holds either all of them or none. Returns the number of pairs written."""
    with _use_db(db) as d, pycolmap.DatabaseTransaction(d):
        ids = _resolve_ids(d, image_ids)
        _write_keypoints(d, ids, keypoints)
        return _write_matches(d, ids, matches)


def existing_pairs(db: DbLike) -> set[frozenset[str]]:
    """Pairs of image names that already have (raw) matches in the database."""
    with _use_db(db) as d:
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
    with _use_db(db) as d:
        ids = _resolve_ids(d, image_ids)
        id0, id1 = _id_of(ids, name0), _id_of(ids, name1)
        if not d.exists_matches(id0, id1):
            raise ValueError(f"pair {name0!r}/{name1!r} has no matches in the database")
        return np.asarray(d.read_matches(id0, id1), np.int64).reshape(-1, 2)


def existing_keypoints(db: DbLike) -> dict[str, np.ndarray]:
    """Stored keypoints per image name, as (K, 2) float64 arrays in hloc's convention (-0.5)."""
    with _use_db(db) as d:
        out = {}
        for img in d.read_all_images():
            if d.exists_keypoints(img.image_id):
                out[img.name] = np.asarray(d.read_keypoints(img.image_id), np.float64)[:, :2] - 0.5
        return out


# ----------------------------------------------------------------------------------------------
# geometric verification
# ----------------------------------------------------------------------------------------------


def _verification_options(options: Mapping[str, Any] | pycolmap.TwoViewGeometryOptions | None
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
    :data:`_VERIFY_COMMIT_EVERY` pairs, so an interrupted call keeps what it committed.

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
    opts = _verification_options(options)
    with _use_db(db_path) as d:
        ids = image_ids(d)
        if pairs is None:
            names = {v: k for k, v in ids.items()}
            pair_list = [tuple(names[int(i)] for i in pycolmap.pair_id_to_image_pair(int(p)))
                         for p in d.read_num_matches()[0]]
        else:
            pair_list = [(str(a), str(b)) for a, b in pairs]
        todo, seen = [], set()
        for n0, n1 in pair_list:
            id0, id1 = _id_of(ids, n0), _id_of(ids, n1)
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
