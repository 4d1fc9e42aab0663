"""Structure from motion on a prepared COLMAP database (pycolmap 4.x).

The database must hold verified two-view geometries with a real configuration (see
:func:`mast3r_colmap.verification.verify_matches`); UNDEFINED ones are ignored by pycolmap 4.x.

* :func:`incremental`: ``pycolmap.incremental_mapping``; the largest model is written to ``output_dir``.
* :func:`global_mapping`: ``pycolmap.global_mapping`` (GLOMAP); the largest model is written likewise.
* :func:`triangulate`: points from known poses (``pycolmap.triangulate_points``) on a database made by
  :func:`database_from_reconstruction`, whose ids equal the reference model's.

Every mapper writes ``summary.json`` (see :func:`summary`) beside the model and logs it. Runs are seeded
(``pycolmap.set_random_seed`` and every ``random_seed`` option) so results are repeatable.

Output folder: never deletes or overwrites what this tool did not write, and never leaves stale files
that look current.

* A marker, ``mast3r-colmap.json`` (:data:`MARKER_FILE`), lists the files of the folder that are ours
  and the state of the last run (``ok``, ``failed``, or ``writing`` while files are swapped in). If the
  folder holds model files (``*.bin``, ``*.txt`` models, ``models/``, ``summary.json``) the marker does
  not list, the mappers raise ValueError before running; :func:`check_output` does the same check for
  callers that want to fail before matching.
* pycolmap writes into a scratch folder ``.mast3r-colmap-tmp-<pid>-*`` inside the output folder (its
  per-model subfolders too). Only on success are the new files moved into place, each with an atomic
  rename; our previous files are moved aside first and removed after the new ones are in place. Scratch
  folders are removed on every exit; those of killed runs (dead pid) at the next run.
* A failed mapping (an error, Ctrl-C, no model, or fewer than 2 registered images) leaves our previous
  model files untouched but marks them as not current: ``summary.json`` becomes
  ``{"status": "failed", "reason": ..., "previous": <summary of the model still there, or null>}`` and
  the marker says ``failed``. A successful run's ``summary.json`` is exactly :func:`summary` of the model.
* COLMAP's messages go to the ``mast3r_colmap.colmap`` logger (:func:`~.utils.colmap_log_to_python`);
  nothing is written outside the output folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap
from tqdm import tqdm

from . import __version__
from .export import focal_priors
from .export.colmap_db import open_database
from .options import build as build_options
from .utils import colmap_log_to_python

__all__ = [
    "DEFAULT_SEED",
    "MARKER_FILE",
    "camera_focals",
    "check_output",
    "database_from_reconstruction",
    "default_output_dir",
    "global_mapping",
    "incremental",
    "load_reference",
    "summary",
    "triangulate",
    "write_summary",
]

logger = logging.getLogger(__name__)

#: Seed used when the caller gives none.
DEFAULT_SEED = 0
SUMMARY_FILE = "summary.json"
#: Marks an output folder as written by this tool and lists the files of it that are ours (JSON).
MARKER_FILE = "mast3r-colmap.json"
_MODEL_FILES = ("cameras.bin", "images.bin", "points3D.bin", "rigs.bin", "frames.bin")
#: Names that hold (or could hold) a model: overwritten or removed only when the marker lists them.
_MODEL_NAMES = (*_MODEL_FILES, "cameras.txt", "images.txt", "points3D.txt", "rigs.txt", "frames.txt",
                "models", SUMMARY_FILE)
_SCRATCH_PREFIX = ".mast3r-colmap-tmp-"


def _images_present(db_path: str | os.PathLike, image_dir: str | os.PathLike | None) -> bool:
    """True if every image of the database exists under ``image_dir`` (needed for colours)."""
    if image_dir is None or not Path(image_dir).is_dir():
        return False
    with open_database(db_path) as db:
        names = [img.name for img in db.read_all_images()]
    return bool(names) and all((Path(image_dir) / n).is_file() for n in names)


def _image_path(image_dir: str | os.PathLike | None, fallback: Path) -> str:
    """pycolmap checks that the image folder exists even when it reads no image."""
    return str(image_dir) if image_dir is not None and Path(image_dir).is_dir() else str(fallback)


def _check_db(db_path: str | os.PathLike) -> None:
    if not Path(db_path).is_file():
        raise ValueError(f"database {str(db_path)!r} does not exist")


def default_output_dir(db_path: str | os.PathLike) -> Path:
    """Where the model of a database goes when no output folder is given: ``sparse`` beside it."""
    return Path(db_path).parent / "sparse"


def _owned(out: Path) -> set[str]:
    """Names listed by the marker of ``out`` (empty without a valid marker)."""
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(marker, dict) or marker.get("tool") != "mast3r-colmap":
        return set()
    return {str(n) for n in marker.get("files", [])} & set(_MODEL_NAMES)


def check_output(output_dir: str | os.PathLike) -> None:
    """Raise ValueError if ``output_dir`` is a file or holds model files this tool did not write (the
    mappers never overwrite or delete those). A missing folder is fine."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} is a file")
    if not out.is_dir():
        return
    owned = _owned(out)
    foreign = [name for name in _MODEL_NAMES if name not in owned and os.path.lexists(out / name)]
    if foreign:
        raise ValueError(
            f"output folder {str(out)!r} already holds {', '.join(foreign)}, not written by mast3r-colmap "
            f"(no {MARKER_FILE} lists them); they are never overwritten: choose another output folder or "
            "move them away")


def _prepare_output(output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir)
    check_output(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output folder {str(out)!r}: {exc}") from exc
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


@contextmanager
def _scratch(out: Path) -> Iterator[Path]:
    """A fresh folder inside ``out`` for pycolmap and the new files; removed on every exit. Scratch
    folders of runs that were killed (their pid is gone) are removed first."""
    for old in out.glob(_SCRATCH_PREFIX + "*"):
        pid = old.name[len(_SCRATCH_PREFIX):].split("-")[0]
        if old.is_dir() and not old.is_symlink() and pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing %s, left by an interrupted run", old)
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=out))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _put_json(out: Path, tmp: Path, name: str, data: Any) -> None:
    """Write ``out/name`` atomically (through ``tmp``, on the same file system)."""
    (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp / name, out / name)


def _marker(status: str, kind: str, files: set[str]) -> dict[str, Any]:
    return {"tool": "mast3r-colmap", "version": __version__, "status": status, "mapper": kind,
            "files": sorted(files), "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _publish(rec: pycolmap.Reconstruction, out: Path, tmp: Path, kind: str) -> None:
    """Write ``rec`` and its summary into ``tmp`` and move them (and ``tmp/models`` if any) into ``out``,
    replacing our previous files."""
    rec.write(str(tmp))
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary(rec), indent=2) + "\n")
    new = [name for name in (*_MODEL_FILES, "models") if (tmp / name).exists()] + [SUMMARY_FILE]
    owned = _owned(out)
    old = owned - set(new)
    _put_json(out, tmp, MARKER_FILE, _marker("writing", kind, owned | set(new)))
    trash = Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-old-", dir=out))
    try:
        for name in sorted(old) + [n for n in new if (tmp / n).is_dir()]:
            if os.path.lexists(out / name):
                os.replace(out / name, trash / name)  # folders cannot be replaced in one step
        for name in new:  # summary.json last
            os.replace(tmp / name, out / name)
        _put_json(out, tmp, MARKER_FILE, _marker("ok", kind, set(new)))
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _record_failure(out: Path, tmp: Path, kind: str, reason: str) -> None:
    """Mark our previous model in ``out`` (left untouched) as not current: see the module docstring."""
    owned = _owned(out)
    previous = None
    if SUMMARY_FILE in owned:
        try:
            previous = json.loads((out / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            pass
        if isinstance(previous, dict) and previous.get("status") == "failed":
            previous = previous.get("previous")
    try:
        _put_json(out, tmp, SUMMARY_FILE, {"status": "failed", "mapper": kind, "reason": reason,
                                           "previous": previous})
        _put_json(out, tmp, MARKER_FILE, _marker("failed", kind, owned | {SUMMARY_FILE}))
    except OSError as exc:
        logger.error("could not record the failed mapping in %s: %s", out, exc)
    kept = " (the model files there are those of an earlier run, not current)" if previous else ""
    logger.warning("%s mapping failed: %s; %s says so%s", kind, reason, out / SUMMARY_FILE, kept)


@contextmanager
def _mapping_run(out: Path, kind: str) -> Iterator[Path]:
    """Scratch folder around a mapper; any error is recorded as a failure."""
    with _scratch(out) as tmp:
        try:
            yield tmp
        except BaseException as exc:
            _record_failure(out, tmp, kind, "interrupted" if isinstance(exc, KeyboardInterrupt)
                            else f"{type(exc).__name__}: {exc}")
            raise


def _pick_largest(models: Mapping[int, pycolmap.Reconstruction], out: Path, tmp: Path,
                  kind: str) -> pycolmap.Reconstruction | None:
    """Publish the model with the most registered images; None (recorded as a failure) if it has < 2."""
    if not models:
        _record_failure(out, tmp, kind, "pycolmap reconstructed no model")
        return None
    best_idx = max(models, key=lambda k: (models[k].num_reg_images(), models[k].num_points3D()))
    best = models[best_idx]
    logger.info("%s mapping: %d model(s); largest #%d with %d registered images", kind, len(models),
                best_idx, best.num_reg_images())
    if best.num_reg_images() < 2:
        _record_failure(out, tmp, kind, f"the largest model registers {best.num_reg_images()} image(s)")
        return None
    _publish(best, out, tmp, kind)
    _log_summary(best, out)
    return best


class _RegistrationProgress:
    """Progress of ``pycolmap.incremental_mapping`` from its callbacks: a bar over the database's images,
    advanced by 2 when a model starts from its initial pair and by 1 for each next image. Registrations
    of a model that COLMAP discards count too, so the bar is capped at the number of images."""

    def __init__(self, total: int, progress: bool = True):
        self.total = total
        self.registered = 0  # registrations seen, all models of the run together
        self.models = 0
        self.bar = tqdm(total=total, desc="mapping", unit="img", disable=not progress)

    def initial_pair(self) -> None:
        self.models += 1
        logger.debug("incremental mapping: model %d starts from an initial pair", self.models)
        self._advance(2)

    def next_image(self) -> None:
        self._advance(1)

    def _advance(self, n: int) -> None:
        self.registered += n
        logger.debug("incremental mapping: %d image registrations (%d images in the database)", self.registered,
                     self.total)
        self.bar.update(max(0, min(self.registered, self.total) - self.bar.n))
        if self.models > 1:
            self.bar.set_postfix(models=self.models)

    def close(self) -> None:
        self.bar.close()


def _num_db_images(db_path: str | os.PathLike) -> int:
    with open_database(db_path) as db:
        return int(db.num_images())


def _seed(seed: int | None) -> int:
    seed = DEFAULT_SEED if seed is None else int(seed)
    pycolmap.set_random_seed(seed)
    return seed


# ----------------------------------------------------------------------------------------------
# mappers
# ----------------------------------------------------------------------------------------------


def incremental(
    db_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    options: Mapping[str, Any] | pycolmap.IncrementalPipelineOptions | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> pycolmap.Reconstruction | None:
    """Incremental SfM (``pycolmap.incremental_mapping``).

    All models go to ``output_dir/models/<k>``; the largest (most registered images) is also written to
    ``output_dir`` itself with ``summary.json``, and returned (``None`` if nothing was reconstructed or
    fewer than 2 images were registered). ``options`` overrides ``IncrementalPipelineOptions``; colours are
    extracted only if every database image exists under ``image_dir``, unless ``extract_colors`` is given.
    Output folder rules (model files of others, failures): see the module docstring. ``progress``: a bar
    over the registered images (pycolmap's registration callbacks; also logged at DEBUG level).
    """
    _check_db(db_path)
    out = _prepare_output(output_dir)
    seed = _seed(seed)
    defaults: dict[str, Any] = {"extract_colors": _images_present(db_path, image_dir)}
    opts = build_options(pycolmap.IncrementalPipelineOptions, options, defaults, seed)
    with _mapping_run(out, "incremental") as tmp:
        (tmp / "models").mkdir()
        bar = _RegistrationProgress(_num_db_images(db_path), progress)
        try:
            with colmap_log_to_python(tmp):
                models = pycolmap.incremental_mapping(str(db_path), _image_path(image_dir, out),
                                                      str(tmp / "models"), options=opts,
                                                      initial_image_pair_callback=bar.initial_pair,
                                                      next_image_callback=bar.next_image)
        finally:
            bar.close()
        return _pick_largest(models, out, tmp, "incremental")


def global_mapping(
    db_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    options: Mapping[str, Any] | pycolmap.GlobalPipelineOptions | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> pycolmap.Reconstruction | None:
    """Global SfM (GLOMAP, ``pycolmap.global_mapping``); output as in :func:`incremental`.

    GPU solvers are switched off unless pycolmap was built with CUDA. pycolmap has no colour switch
    here; without the image files pycolmap logs a warning per image and colours stay black.
    pycolmap 4.2.1 gives global mapping no progress callback: its start and end are logged (``progress``
    is accepted for symmetry with :func:`incremental` and unused).
    """
    _check_db(db_path)
    out = _prepare_output(output_dir)
    seed = _seed(seed)
    defaults: dict[str, Any] = {}
    if not pycolmap.has_cuda:
        defaults["mapper"] = {"global_positioning": {"use_gpu": False},
                              "bundle_adjustment": {"ceres": {"use_gpu": False}}}
    opts = build_options(pycolmap.GlobalPipelineOptions, options, defaults, seed)
    # pycolmap needs an existing folder; without the images it warns per image and colours stay black.
    image_path = str(image_dir) if _images_present(db_path, image_dir) else str(out)
    with _mapping_run(out, "global") as tmp:
        (tmp / "models").mkdir()
        logger.info("global mapping of %d images started (no progress reports from pycolmap until it ends)",
                    _num_db_images(db_path))
        start = time.perf_counter()
        with colmap_log_to_python(tmp):
            models = pycolmap.global_mapping(str(db_path), image_path, str(tmp / "models"), options=opts)
        logger.info("global mapping finished in %.1f s", time.perf_counter() - start)
        return _pick_largest(models, out, tmp, "global")


#: Short alias.


def database_from_reconstruction(
    reference: pycolmap.Reconstruction | str | os.PathLike, db_path: str | os.PathLike
) -> dict[str, int]:
    """Write the cameras, rigs, frames and images of ``reference`` into a database with the same ids.

    Keypoints and matches are then added with :mod:`mast3r_colmap.export.colmap_db` using the returned
    ``{name: image_id}``. Re-running on a database made this way is a no-op; a database whose images
    disagree with the reference (same id, other name or camera) raises :class:`ValueError`.
    """
    rec = load_reference(reference)
    ids = {img.name: int(img_id) for img_id, img in rec.images.items()}
    with open_database(db_path) as db:
        stored = {int(img.image_id): img for img in db.read_all_images()}
        if stored:
            for img_id, img in rec.images.items():
                s = stored.get(int(img_id))
                if s is None or s.name != img.name or int(s.camera_id) != int(img.camera_id):
                    raise ValueError(f"database {str(db_path)!r} already holds images that do not match the "
                                     f"reference (image id {img_id}, {img.name!r})")
            extra = set(stored) - set(ids.values())
            if extra:
                logger.warning("database has %d images that are not in the reference", len(extra))
            return ids
        with pycolmap.DatabaseTransaction(db):
            for cam_id, cam in rec.cameras.items():
                db.write_camera(cam, use_camera_id=True)
            for rig in rec.rigs.values():
                db.write_rig(rig, use_rig_id=True)
            for frame in rec.frames.values():
                db.write_frame(frame, use_frame_id=True)
            for img_id, img in rec.images.items():
                db.write_image(pycolmap.Image(name=img.name, camera_id=img.camera_id, image_id=img_id),
                               use_image_id=True)
    logger.info("database_from_reconstruction: %d cameras, %d images written to %s",
                len(rec.cameras), len(ids), db_path)
    return ids


def load_reference(reference: pycolmap.Reconstruction | str | os.PathLike) -> pycolmap.Reconstruction:
    """``reference`` itself, or the model read from a folder (``.bin`` or ``.txt``).

    Raises ValueError for a missing folder, a missing cameras/images/points3D file or an unreadable model.
    """
    if isinstance(reference, pycolmap.Reconstruction):
        return reference
    path = Path(reference)
    if not path.is_dir():
        raise ValueError(f"reference model {str(path)!r} is not a folder")
    for stem in ("cameras", "images", "points3D"):
        if not ((path / f"{stem}.bin").is_file() or (path / f"{stem}.txt").is_file()):
            raise ValueError(f"reference model {str(path)!r} has no {stem}.bin or {stem}.txt")
    try:
        return pycolmap.Reconstruction(str(path))
    except Exception as exc:  # noqa: BLE001 - pycolmap raises RuntimeError/ValueError on bad files
        raise ValueError(f"cannot read the reference model {str(path)!r}: {exc}") from None


def triangulate(
    reference: pycolmap.Reconstruction | str | os.PathLike,
    db_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    options: Mapping[str, Any] | pycolmap.IncrementalPipelineOptions | None = None,
    refine_intrinsics: bool = False,
    seed: int | None = None,
) -> pycolmap.Reconstruction:
    """Triangulate points with the known poses of ``reference`` (``pycolmap.triangulate_points``).

    The database must come from :func:`database_from_reconstruction` (same image ids and names) and hold
    verified two-view geometries. Existing 3D points of the reference are dropped. The model and
    ``summary.json`` are written to ``output_dir`` (rules as for :func:`incremental`; a model without
    points is still the current result and is published, with a warning).
    """
    _check_db(db_path)
    rec = pycolmap.Reconstruction(load_reference(reference))  # never modify the caller's model
    with open_database(db_path) as db:
        for img_id, img in rec.images.items():
            if not db.exists_image(int(img_id)) or db.read_image(int(img_id)).name != img.name:
                raise ValueError(f"database {str(db_path)!r} does not match the reference: image id {img_id} "
                                 f"({img.name!r}); build it with database_from_reconstruction")
        if db.num_verified_image_pairs() == 0:
            logger.warning("database %s has no verified two-view geometries: nothing to triangulate", db_path)
    out = _prepare_output(output_dir)
    seed = _seed(seed)
    defaults: dict[str, Any] = {"extract_colors": _images_present(db_path, image_dir)}
    opts = build_options(pycolmap.IncrementalPipelineOptions, options, defaults, seed)
    with _mapping_run(out, "triangulation") as tmp:
        with colmap_log_to_python(tmp):
            result = pycolmap.triangulate_points(rec, str(db_path), _image_path(image_dir, out), str(tmp),
                                                 clear_points=True, options=opts,
                                                 refine_intrinsics=refine_intrinsics)
        _publish(result, out, tmp, "triangulation")
    if result.num_points3D() == 0:
        logger.warning("triangulation: no 3D points (are the two-view geometries verified?)")
    _log_summary(result, out)
    return result


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------


def summary(reconstruction: pycolmap.Reconstruction, database: str | os.PathLike | None = None) -> dict[str, Any]:
    """Headline numbers of a model (plain JSON-able values); with the ``database`` it was made from, also
    ``cameras``: the prior and refined focal of each camera (:func:`camera_focals`)."""
    rec = reconstruction
    track_lengths = [p.track.length() for p in rec.points3D.values()]
    out = {
        "num_images": int(rec.num_images()),
        "num_registered_images": int(rec.num_reg_images()),
        "num_cameras": int(rec.num_cameras()),
        "num_points3D": int(rec.num_points3D()),
        "num_observations": int(sum(track_lengths)),
        "mean_track_length": float(np.mean(track_lengths)) if track_lengths else 0.0,
        "mean_reprojection_error": float(rec.compute_mean_reprojection_error()) if track_lengths else 0.0,
    }
    if database is not None:
        out["cameras"] = camera_focals(rec, database)
    return out


def camera_focals(reconstruction: pycolmap.Reconstruction, database: str | os.PathLike) -> list[dict[str, Any]]:
    """Per camera of the model (by id): ``camera_id``, ``model``, ``width``, ``height``, the focal the mapper
    started from (``prior_focal``, the database's camera) and where it came from (``prior_source``:
    ``"network"``, MASt3R's pointmaps, see :mod:`~.export.focal_priors`; ``"exif-or-intrinsics"``, a prior
    COLMAP was given otherwise; ``"default"``, COLMAP's ``1.2 * max(W, H)`` guess), and the focal of the
    model (``refined_focal``). Focals are mean focal lengths in pixels; a camera the database lacks has no
    prior fields."""
    estimated = focal_priors.read(database)
    out = []
    with open_database(database) as db:
        for camera_id in sorted(reconstruction.cameras):
            cam = reconstruction.cameras[camera_id]
            entry: dict[str, Any] = {"camera_id": int(camera_id), "model": cam.model.name, "width": int(cam.width),
                                     "height": int(cam.height)}
            if db.exists_camera(int(camera_id)):
                initial = db.read_camera(int(camera_id))
                entry["prior_focal"] = float(initial.mean_focal_length())
                entry["prior_source"] = ("network" if int(camera_id) in estimated else
                                         "exif-or-intrinsics" if initial.has_prior_focal_length else "default")
            entry["refined_focal"] = float(cam.mean_focal_length())
            out.append(entry)
    return out


def write_summary(reconstruction: pycolmap.Reconstruction, output_dir: str | os.PathLike) -> Path:
    """Write :func:`summary` to ``output_dir/summary.json``, log it and return the path."""
    path = Path(output_dir) / SUMMARY_FILE
    path.write_text(json.dumps(summary(reconstruction), indent=2) + "\n")
    _log_summary(reconstruction, output_dir)
    return path


def _log_summary(reconstruction: pycolmap.Reconstruction, output_dir: str | os.PathLike) -> None:
    s = summary(reconstruction)
    logger.info("model %s: %d/%d images registered, %d points, track length %.2f, reprojection error %.3f px",
                output_dir, s["num_registered_images"], s["num_images"], s["num_points3D"],
                s["mean_track_length"], s["mean_reprojection_error"])
